"""RL trainers' reward clients against a real `rmserve serve`: verl's vLLM (/classify) and SGLang
(/v1/embeddings) request shapes, OpenRLHF's /get_reward, the TRL reward function in URL mode (with
TRL's own GRPOTrainer) and the verl reward manager. Every number is checked against Engine.score
on the same conversation.
"""
import asyncio
import inspect
import math
import sys
import threading
import types

import pytest

# The `server` extra: where it is not installed (the GPU image has no fastapi or uvicorn) this module skips.
for _extra in ("fastapi", "uvicorn", "pydantic", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

from rmserve import Engine  # noqa: E402
from rmserve.integrations import RewardFunction  # noqa: E402
from rmserve.server.pooling import activate  # noqa: E402
from rmserve.tiny import write_tiny_checkpoint  # noqa: E402

from .helpers import random_conversation  # noqa: E402
from .test_server import Server  # noqa: E402

RTOL = 1e-5   # server batches vs Engine.score alone: fp32 BLAS last bits
BOS = "<|begin_of_text|>"
LONG = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ".join(["reward"] * 200)}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, engine, path): one tiny Bradley-Terry model behind `rmserve serve` (served under its
    path, --model) and in this process."""
    path = write_tiny_checkpoint(str(tmp_path_factory.mktemp("bt")), "bt")
    server = Server(path, tmp_path_factory.mktemp("log") / "server.log", "--max-length", "256")
    yield server, Engine.from_pretrained(path, dtype="float32", device="cpu", max_length=256), path
    server.stop()


def verl_text(engine, conv) -> str:
    """What verl's reward loop sends: the RM's chat template applied, its BOS text stripped
    (verl-project/verl 1dda039b9c6311889a9c9a26040677e1254814f9, reward_loop.py _preprocess_reward_inputs)."""
    text = engine.preprocessor.render(conv)
    return text[len(BOS):] if text.startswith(BOS) else text


def test_classify_answers_verls_vllm_request(served, rng):
    server, engine, model = served
    convs = [random_conversation(rng, max_turns=2, hi=10) for _ in range(4)]
    want = engine.score(convs)
    for conv, w in zip(convs, want):
        text = verl_text(engine, conv)
        assert not text.startswith(BOS)
        for flag in ("use_activation", "activation"):   # verl's spelling since / before vLLM 0.11.2
            out = httpx.post(server.url + "/classify", json={"model": model, "input": text, flag: False},
                             timeout=60).json()
            assert out["data"][-1]["probs"][-1] == pytest.approx(w.score, rel=RTOL, abs=RTOL)
        # the same text with its BOS kept gets one BOS, not two: same tokens, same score
        with_bos = httpx.post(server.url + "/classify", json={"model": model, "input": BOS + text,
                                                              "use_activation": False}, timeout=60).json()
        assert with_bos["data"][0]["probs"] == out["data"][0]["probs"]
        assert with_bos["usage"]["prompt_tokens"] == out["usage"]["prompt_tokens"] == w.num_tokens
    assert set(out) == {"id", "object", "created", "model", "data", "usage"} and out["id"].startswith("classify-")
    assert out["object"] == "list" and out["model"] == model and isinstance(out["created"], int)
    assert out["data"] == [{"index": 0, "label": "LABEL_0", "probs": out["data"][0]["probs"], "num_classes": 1}]
    assert out["usage"] == {"prompt_tokens": w.num_tokens, "total_tokens": w.num_tokens, "completion_tokens": 0,
                            "prompt_tokens_details": None}


def test_classify_batches_token_ids_chat_and_activation(served, rng):
    server, engine, _ = served
    convs = [random_conversation(rng, max_turns=2, hi=10) for _ in range(3)]
    want = [w.score for w in engine.score(convs)]
    texts = [verl_text(engine, c) for c in convs]
    ids = [list(e.ids) for e in engine.encode(convs)]
    assert all(i[0] == engine.preprocessor.bos_id for i in ids)
    for body in ({"input": texts}, {"input": [i[1:] for i in ids]}, {"input": ids}):   # ids: BOS policy too
        out = httpx.post(server.url + "/classify", json={**body, "use_activation": False}, timeout=60).json()
        assert [d["index"] for d in out["data"]] == [0, 1, 2]
        assert [d["probs"][0] for d in out["data"]] == pytest.approx(want, rel=RTOL, abs=RTOL)
    one = httpx.post(server.url + "/classify", json={"input": ids[0][1:], "use_activation": False}, timeout=60).json()
    assert one["data"][0]["probs"][0] == pytest.approx(want[0], rel=RTOL, abs=RTOL)
    chat = httpx.post(server.url + "/classify", json={"messages": convs[1]}, timeout=60).json()
    # activation on (the default): vLLM's default for a 1-label classifier is the sigmoid
    assert chat["data"][0]["probs"][0] == pytest.approx(1 / (1 + math.exp(-want[1])), rel=RTOL, abs=RTOL)


def test_sglang_embeddings_as_verl_reads_them(served, rng):
    server, engine, model = served
    conv = random_conversation(rng, max_turns=2, hi=10)
    out = httpx.post(server.url + "/v1/embeddings", json={"model": model, "input": verl_text(engine, conv)},
                     timeout=60).json()
    assert out["data"][-1]["embedding"][-1] == pytest.approx(engine.score([conv])[0].score, rel=RTOL, abs=RTOL)
    assert out["object"] == "list" and out["data"][0]["object"] == "embedding" and out["data"][0]["index"] == 0


@pytest.mark.parametrize("path, body, status, fragment", [
    ("/classify", {"model": "other", "input": "x"}, 404, "--served-model-name"),
    ("/classify", {"input": "x", "activation": False, "use_activation": True}, 422, "disagree"),
    ("/classify", {"input": "x", "truncate_prompt_tokens": 8}, 422, "truncate_prompt_tokens is not supported"),
    ("/classify", {"input": "x", "messages": [{"role": "user", "content": "x"}]}, 422, "exactly one"),
    ("/classify", {}, 422, "exactly one"),
    ("/classify", {"input": ["ok", " "]}, 422, "input[1] is empty"),
    ("/classify", {"input": [[1, 2], []]}, 422, "input[1] cannot be scored: no tokens"),
    ("/classify", {"input": [1, True]}, 422, "input"),
    ("/classify", {"input": "x", "temperature": 1}, 422, "temperature"),
    ("/classify", {"messages": LONG[:1]}, 422, "last message must be the assistant"),
    ("/v1/embeddings", {"input": ["fine", "reward " * 200]}, 422, "input[1] cannot be scored: "),
    ("/v1/embeddings", {"input": "x", "encoding_format": "base64"}, 422, "encoding_format"),
])
def test_pooling_refusals(served, path, body, status, fragment):
    resp = httpx.post(served[0].url + path, json=body, timeout=60)
    assert resp.status_code == status, resp.text
    assert fragment in resp.json()["error"]["message"]


def test_activation_follows_vllm():
    assert activate([0.0], None) == [0.5]
    assert activate([1.0, 1.0], None) == [0.5, 0.5]                          # 2+ labels: softmax
    assert activate([1.0, 1.0], "multi_label_classification") == pytest.approx([1 / (1 + math.exp(-1))] * 2)
    assert activate([3.0, -2.0], "regression") == [3.0, -2.0]
    assert activate([-800.0], None) == [0.0] and activate([800.0], None) == [1.0]   # no overflow


def test_openrlhf_sends_one_query_per_request(served, rng):
    """OpenRLHF/OpenRLHF 3c3be6234e0cb353e76bb8019947db9dfe99fca7 openrlhf/utils/agent.py
    SingleTurnAgentExecutor: one decoded prompt+response per request, read `scores`, else `rewards`."""
    server, engine, _ = served
    convs = [random_conversation(rng, max_turns=2, hi=10) for _ in range(6)]
    want = [w.score for w in engine.score(convs)]

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            bodies = [{"query": [BOS + verl_text(engine, c)], "prompts": [c[-2]["content"]], "labels": [None]}
                      for c in convs]
            return await asyncio.gather(*(client.post(server.url + "/get_reward", json=b) for b in bodies))

    for resp, w in zip(asyncio.run(run()), want):
        info = resp.json()
        score = info.get("scores")
        score = info.get("rewards") if score is None else score
        assert resp.status_code == 200 and score[0] == pytest.approx(w, rel=RTOL, abs=RTOL)


# ---------------------------------------------------------------------------------------------
# TRL


def test_reward_function_url_mode_call_shapes(served, rng):
    server, engine, _ = served
    reward = RewardFunction(server.url)
    convs = [random_conversation(rng, max_turns=1, hi=10) for _ in range(5)]
    want = [w.score for w in engine.score(convs)]
    # conversational, with the extra keyword arguments TRL passes
    prompts, completions = [c[:-1] for c in convs], [c[-1:] for c in convs]
    got = reward(prompts=prompts, completions=completions, completion_ids=[[1]] * 5, trainer_state=None,
                 log_extra=None, log_metric=None, answer=["a"] * 5)
    assert got == pytest.approx(want, rel=RTOL, abs=RTOL)
    # standard (strings): the prompt is one user turn, the completion the answer
    plain = [c for c in convs if len(c) == 2]
    got = reward([c[0]["content"] for c in plain], [c[1]["content"] for c in plain])
    assert got == pytest.approx([w for c, w in zip(convs, want) if len(c) == 2], rel=RTOL, abs=RTOL)
    # samples that cannot be scored get None; the others are unaffected
    bad = [[{"role": "assistant", "content": " "}], [{"role": "tool", "content": "42"}], LONG[1:], completions[0]]
    got = reward([prompts[0], prompts[0], LONG[:1], prompts[0]], bad)
    assert got[:3] == [None, None, None] and got[3] == pytest.approx(want[0], rel=RTOL, abs=RTOL)
    # concurrent calls from threads (TRL's sync path) and the coroutine form (its async path)
    results = [None] * 4

    def call(k):
        results[k] = reward(prompts=prompts, completions=completions)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == pytest.approx(want, rel=RTOL, abs=RTOL) for r in results)
    as_async = reward.as_async()
    assert inspect.iscoroutinefunction(as_async) and as_async.__name__ == "rmserve"

    async def both():
        return await asyncio.gather(as_async(prompts=prompts, completions=completions, completion_ids=None),
                                    as_async(prompts=prompts[:2], completions=completions[:2]))

    first, second = asyncio.run(both())
    assert first == pytest.approx(want, rel=RTOL, abs=RTOL) and second == pytest.approx(want[:2], rel=RTOL, abs=RTOL)
    reward.close()


class Recording(RewardFunction):
    """RewardFunction that keeps every call's inputs and outputs."""

    def __init__(self, source, name):
        super().__init__(source, name=name)
        self.calls = []

    def __call__(self, prompts, completions, completion_ids=None, **columns):
        out = super().__call__(prompts, completions, completion_ids, **columns)
        self.calls.append((prompts, completions, sorted(columns), out))
        return out


def test_trl_grpo_trains_with_rmserve_rewards(served, tmp_path):
    """A few GRPOTrainer steps on CPU: a tiny random policy, rewards from the server (sync, URL) and
    from an in-process engine (async); every reward TRL received is Engine.score's, and TRL logged them."""
    trl = pytest.importorskip("trl")   # in the `test` extra
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    server, engine, path = served
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    url_reward, local_reward = Recording(server.url, "url"), Recording(engine, "local")
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in
                                         ("Hello there", "What is the answer?", "Hi you", "Please answer")],
                              "answer": ["a", "b", "c", "d"]})
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=8, max_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                          save_strategy="no", bf16=False, seed=0)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=[url_reward, local_reward.as_async()], args=args,
                              train_dataset=data, processing_class=tok)
    trainer.train()
    url_reward.close()
    local_reward.close()
    assert len(url_reward.calls) == len(local_reward.calls) == 2
    logged = [h for h in trainer.state.log_history if "rewards/url/mean" in h]
    assert len(logged) == 2
    for (prompts, completions, columns, url_out), (_, _, _, local_out), log in zip(url_reward.calls,
                                                                                  local_reward.calls, logged):
        assert isinstance(prompts[0], list) and completions[0][0]["role"] == "assistant"   # conversational
        assert {"answer", "trainer_state", "log_extra", "log_metric"} <= set(columns)
        want = [r.score if r.ok else None for r in engine.score([p + c for p, c in zip(prompts, completions)])]
        for got in (url_out, local_out):
            assert [g is None for g in got] == [w is None for w in want]
            assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None],
                                                                      rel=RTOL, abs=RTOL)
        scored = [g for g in url_out if g is not None]
        assert log["rewards/url/mean"] == pytest.approx(sum(scored) / len(scored), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# verl


def test_verl_reward_manager_scores_rollouts(served, rng, monkeypatch):
    """rmserve.integrations.verl on verl's data layout (DataProto indexing, `raw_prompt`, response ids
    and attention mask), with the two verl names it imports stubbed: verl pins transformers < 5.11, so
    it is not installed here."""
    import torch

    server, engine, _ = served

    class Base:
        def __init__(self, config, tokenizer, compute_score):
            self.config, self.tokenizer, self.compute_score = config, tokenizer, compute_score

        @property
        def loop(self):
            return asyncio.get_running_loop()

    for name, attrs in (("verl", {"DataProto": object}), ("verl.experimental", {}),
                        ("verl.experimental.reward_loop", {}), ("verl.experimental.reward_loop.reward_manager", {}),
                        ("verl.experimental.reward_loop.reward_manager.base", {"RewardManagerBase": Base})):
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
    monkeypatch.delenv("RMSERVE_URL", raising=False)
    monkeypatch.delitem(sys.modules, "rmserve.integrations.verl", raising=False)
    try:
        from rmserve.integrations.verl import RmserveRewardManager
    finally:   # the module holds the stubs: never leave it imported
        sys.modules.pop("rmserve.integrations.verl", None)

    tok = engine.preprocessor.tokenizer
    conv = random_conversation(rng, max_turns=1, hi=10)
    answer = tok(conv[-1]["content"] + tok.eos_token, add_special_tokens=False)["input_ids"]
    responses = torch.tensor(answer + [tok.pad_token_id] * 3)              # right-padded response
    mask = torch.tensor([0, 1, 1] + [1] * len(answer) + [0] * 3)            # prompt part, then response part

    class Data:   # DataProto's indexing: data[-1:] is a DataProto, data[0] an item
        def __init__(self, items):
            self.items = items

        def __getitem__(self, k):
            return Data(self.items[k]) if isinstance(k, slice) else self.items[k]

    item = types.SimpleNamespace(batch={"responses": responses, "attention_mask": mask},
                                 non_tensor_batch={"raw_prompt": conv[:-1]})
    config = types.SimpleNamespace(reward={"reward_kwargs": {"rmserve_url": server.url}})
    manager = RmserveRewardManager(config=config, tokenizer=tok, compute_score=None, reward_router_address=None,
                                   reward_model_tokenizer=None)
    out = asyncio.run(manager.run_single(Data([item])))
    want = engine.score([conv[:-1] + [{"role": "assistant", "content": tok.decode(answer).replace(tok.eos_token, "")}]])
    assert out == {"reward_score": pytest.approx(want[0].score, rel=RTOL, abs=RTOL), "reward_extra_info": {}}
    with pytest.raises(ValueError, match="rmserve_url"):
        RmserveRewardManager(types.SimpleNamespace(reward={}), tok)


@pytest.mark.parametrize("problem_type", [None, "regression", "multi_label_classification"])
def test_classify_multi_label_outputs_and_labels(tmp_path, rng, problem_type):
    """A 3-label classifier in process: raw logits, vLLM's activation for its problem_type, the label
    from config.json's id2label; the reward function refuses a model with no single score."""
    import json

    from fastapi.testclient import TestClient

    from rmserve.async_engine import AsyncEngine
    from rmserve.server.app import ServerConfig, create_app

    path = write_tiny_checkpoint(str(tmp_path / "bt3"), "bt", num_labels=3)
    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    cfg["id2label"] = {"2": "good", "0": "bad", "1": "ok"}
    if problem_type:
        cfg["problem_type"] = problem_type
    with open(f"{path}/config.json", "w") as f:
        json.dump(cfg, f)
    engine = Engine.from_pretrained(path, dtype="float32", device="cpu")
    assert engine.spec.id2label == ("bad", "ok", "good") and engine.spec.problem_type == problem_type
    conv = random_conversation(rng, max_turns=1, hi=10)
    logits = engine.score([conv])[0].logits
    with TestClient(create_app(AsyncEngine(engine), ServerConfig(model_name="m"))) as client:
        raw = client.post("/classify", json={"messages": conv, "use_activation": False}).json()["data"][0]
        on = client.post("/classify", json={"messages": conv}).json()["data"][0]
        emb = client.post("/v1/embeddings", json={"input": engine.preprocessor.render(conv)}).json()["data"][0]
    assert raw["probs"] == pytest.approx(logits, rel=RTOL, abs=RTOL) and raw["num_classes"] == 3
    assert emb["embedding"] == pytest.approx(logits, rel=RTOL, abs=RTOL)
    if problem_type == "regression":
        want = logits
    elif problem_type == "multi_label_classification":
        want = [1 / (1 + math.exp(-x)) for x in logits]
    else:
        want = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
    assert on["probs"] == pytest.approx(want, rel=RTOL, abs=RTOL)
    assert on["label"] == ("bad", "ok", "good")[max(range(3), key=want.__getitem__)]
    with pytest.raises(ValueError, match="no single score"):
        RewardFunction(engine)
