"""Process reward models (Qwen2ForProcessRewardModel, Qwen2.5-Math-PRM) on a tiny checkpoint in the real
on-disk format, fp32: step rewards against transformers' Qwen2Model hidden states plus the score MLP and
the step-reward code of the model card (tests/reference.py), packed with shared prompts (a step token
inside a shared prompt included), through the CUDA-graph runner with the fake capture (step slots,
padding slots, a batch over them), the Triton kernels in the interpreter; the answer's forms (a list of
steps, a separated text, a text already joined), the pitfalls (one step, an empty step, no steps, the
step token in the user's text or inside a step), the aggregation rules, the offline job and the server."""
import json
import math
import os

import pytest
import torch

from rmserve import Engine, EngineConfig
from rmserve.cuda_graphs import Bucket, bucket_ladder, choose_bucket
from rmserve.kernels.dispatch import interpreting
from rmserve.prefix import shared_length
from rmserve.steps import AGGREGATIONS, StepError, StepFormat

from .helpers import random_text
from .reference import Reference

# fp32 on CPU: packing, prefix sharing and the fused kernels reorder a few sums; the spec's bar.
RTOL, ATOL = 1e-5, 1e-5
SYSTEM = {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."}


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("qwen2_prm")


@pytest.fixture(scope="module")
def engine(path):
    return Engine.from_pretrained(path, dtype="float32", device="cpu", kernels="torch", max_batch_tokens=600)


@pytest.fixture(scope="module")
def ref(path):
    return Reference(path)


def steps(rng, n):
    return [random_text(rng, 2, 9) for _ in range(n)]


def conv(problem, answer):
    return [SYSTEM, {"role": "user", "content": problem}, {"role": "assistant", "content": answer}]


def workload(rng):
    """Two solutions to a problem that begin with the same step (whose step token then lies in the
    prompt they share), three to another (one of a single step), and two lone samples.
    -> conversations, group keys."""
    convs, groups = [], []
    problem, first = random_text(rng, 12, 20), steps(rng, 1)
    for answer in (first + steps(rng, 2), first + steps(rng, 3)):
        convs.append(conv(problem, answer))
        groups.append("p")
    problem = random_text(rng, 12, 20)
    for answer in (steps(rng, 2), steps(rng, 3), steps(rng, 1)):
        convs.append(conv(problem, answer))
        groups.append("q")
    for _ in range(2):
        convs.append(conv(random_text(rng, 3, 12), steps(rng, rng.randint(1, 4))))
        groups.append(None)
    return convs, groups


def record_batches(engine, fn):
    """Runs fn(); returns its value and every packed batch the model ran."""
    forward, seen = engine.model_forward.eager, []
    engine.model_forward.eager = lambda batch: (seen.append(batch), forward(batch))[1]
    try:
        return fn(), seen
    finally:
        del engine.model_forward.eager


def test_step_rewards_match_qwen2model_and_the_model_card(engine, ref, rng):
    convs, groups = workload(rng)
    results, batches = record_batches(engine, lambda: engine.score(convs, groups))
    # packed (7 samples in at most 3 batches of 600 tokens: 2 or 3, by the random lengths), prompts shared
    assert any(b.kv_idx is not None for b in batches) and len(batches) <= len(convs) // 2
    encoded = engine.encode(convs)
    # group "p" (samples 0, 1) shares its first step's token: a step row read from the shared prompt
    assert shared_length([encoded[0].ids, encoded[1].ids], [0, 1]) > encoded[0].steps[0]
    step_id = engine.preprocessor.steps.token_id
    for c, enc, res in zip(convs, encoded, results):
        assert res.ok, res.error
        card = ref.step_rewards(list(enc.ids), step_id)
        assert len(res.step_rewards) == len(card) == len(c[-1]["content"]) == len(enc.steps)
        assert res.step_rewards == pytest.approx(card, rel=RTOL, abs=ATOL)
        assert res.score == min(res.step_rewards) and res.num_tokens == len(enc)
    # the stream path (score_stream's windows) gives the same per-step results
    for i, res in engine.score_stream(convs):
        assert res.step_rewards == pytest.approx(results[i].step_rewards, rel=RTOL, abs=ATOL)


def test_the_step_token_in_the_users_text_is_not_a_step(engine, ref, rng):
    """The card's code reads every <extra_0> of the input, so a user who writes one gets an extra step and
    every reward after it shifted; rmserve reads the answer's step tokens only."""
    answer = steps(rng, 3)
    c = conv(f"{random_text(rng, 3, 6)} <extra_0> {random_text(rng, 3, 6)}", answer)
    res = engine.score([c])[0]
    enc = engine.encode([c])[0]
    card = ref.step_rewards(list(enc.ids), engine.preprocessor.steps.token_id)
    assert len(card) == 4 and len(res.step_rewards) == 3
    assert res.step_rewards == pytest.approx(card[1:], rel=RTOL, abs=ATOL)
    # a step may not hold the step token: it could not be told apart from the step boundaries
    bad = engine.score([conv("x", ["a", "b <extra_0> c"]), c])
    assert "step 2 holds the step token <extra_0>" in bad[0].error and bad[1].ok


def test_answer_forms_and_per_sample_errors(engine, path, rng):
    problem, answer = random_text(rng, 4, 8), steps(rng, 3)
    as_list = engine.score([conv(problem, answer)])[0]
    joined = engine.score([conv(problem, "<extra_0>".join(answer) + "<extra_0>")])[0]   # the card's own form
    assert joined.step_rewards == as_list.step_rewards
    split = Engine(engine.model, engine.preprocessor.tokenizer, EngineConfig(step_separator="\n\n"))
    text = "\n\n" + "\n\n\n\n".join(s + "  " for s in answer) + "\n\n"   # surrounding whitespace, empty pieces
    assert split.score([conv(problem, text)])[0].step_rewards == as_list.step_rewards
    one = engine.score([conv(problem, answer[:1])])[0]
    assert len(one.step_rewards) == 1 and one.score == one.step_rewards[0]
    errors = engine.score([conv(problem, ["a", "  ", "b"]), conv(problem, []), conv(problem, "no steps here"),
                           conv(problem, ["a", 3]), conv(problem, "a<extra_0>b"), conv(problem, answer)])
    assert errors[0].error == "step 2 is empty"
    assert errors[1].error == "the answer has no steps"
    assert "give the answer as a list of step strings" in errors[2].error and "step_separator" in errors[2].error
    assert errors[3].error == "step 2 is not a string (got int)"
    assert "after its last step token" in errors[4].error
    assert errors[5].ok and errors[5].step_rewards == as_list.step_rewards
    # pre-tokenized samples: every step token is a step; none is an error
    ids = list(engine.encode([conv(problem, answer)])[0].ids)
    assert engine.score([ids])[0].step_rewards == as_list.step_rewards
    assert "no step token <extra_0>" in engine.score([[1, 2, 3]])[0].error


def test_aggregation_rules(engine, rng):
    c = [conv(random_text(rng, 4, 8), steps(rng, 4))]
    rewards = engine.score(c)[0].step_rewards
    want = {"min": min(rewards), "last": rewards[-1], "product": math.prod(rewards),
            "mean": sum(rewards) / len(rewards)}
    assert set(AGGREGATIONS) == set(want)
    for rule, value in want.items():
        other = Engine(engine.model, engine.preprocessor.tokenizer, EngineConfig(step_aggregation=rule))
        res = other.score(c)[0]
        assert res.step_rewards == rewards and res.score == pytest.approx(value, rel=1e-12)
    assert EngineConfig().step_aggregation == "min"
    with pytest.raises(ValueError, match="step_aggregation must be one of min, last, product, mean"):
        EngineConfig(step_aggregation="max")
    with pytest.raises(ValueError, match="step_separator must be a non-empty string"):
        EngineConfig(step_separator="")


def test_steps_are_for_process_reward_models_only(tiny_model):
    path = tiny_model("qwen2_rm")
    with pytest.raises(ValueError, match="apply to process reward models only; this is a qwen2_rm model"):
        Engine.from_pretrained(path, dtype="float32", device="cpu", step_aggregation="last")
    rm = Engine.from_pretrained(path, dtype="float32", device="cpu")
    got = rm.score([conv("x", ["a", "b"])])[0]
    assert "only process reward models score steps" in got.error


def test_step_format_unit():
    fmt = StepFormat("<s>", 7, None)
    assert fmt.steps_of(["a", "b"]) == (["a", "b"], "a<s>b<s>")
    assert fmt.steps_of("a<s>b<s>\n") == (["a", "b"], "a<s>b<s>\n")
    with pytest.raises(StepError, match="step 1 is empty"):
        fmt.steps_of("<s>b<s>")
    sep = StepFormat("<s>", 7, "||")
    assert sep.steps_of(" a || ||b|| ") == (["a", "b"], "a<s>b<s>")
    with pytest.raises(StepError, match="no steps"):
        sep.steps_of(" || ")


# ------------------------------------------------------------------ CUDA graphs (fake capture), kernels

def test_graph_runner_step_slots(engine, rng):
    """Static step slots: padding slots (row 0) change no real reward and are dropped; a batch with more
    step tokens than its bucket's slots runs eagerly, with the eager rewards."""
    from .test_cuda_graphs import runner_for

    convs, groups = workload(rng)
    calls = [[None] * len(convs), groups]   # every sample alone; shared prompts
    eager = [engine.score(convs, g) for g in calls]
    layout = dict(tokens=600, max_seqlen=300, seqs=12, keys=2400, max_seqlen_k=600)
    for slots in (150, 2):
        engine.graphs, recorder = runner_for(engine, [Bucket(**layout, steps=slots)])
        try:
            graphed = [engine.score(convs, g) for g in calls]
            if slots == 150:   # every batch fits: all replayed, with padding slots
                assert recorder.replayed > 0 and engine.graphs.eager == 0
            else:              # batches of 3+ steps run eagerly
                assert engine.graphs.eager > 0
        finally:
            engine.graphs = None
        for got, want in zip(graphed, eager):
            for a, b in zip(got, want):
                assert a.step_rewards == pytest.approx(b.step_rewards, rel=RTOL, abs=ATOL)
    ladder = bucket_ladder(2048, 4096, key_factor=4, step_spacing=4)
    assert all(b.steps == b.tokens // 4 for b in ladder)
    assert choose_bucket(ladder, 300, 2, 300, steps=75).tokens == 320     # 80 slots
    assert choose_bucket(ladder, 300, 2, 300, steps=90).tokens == 384     # over 320's slots: the next rung
    assert choose_bucket(ladder, 300, 2, 300, steps=513) is None


@pytest.mark.skipif(torch.cuda.is_available() or not interpreting(), reason="runs the kernels in the CPU interpreter")
def test_kernel_path_equals_torch_path(path, engine, rng):
    """kernels='triton': the step rows through the fused gather-projection (variable step counts per sequence,
    one sample's steps in a shared prompt) against the PyTorch references, on short token samples."""
    fused = Engine.from_pretrained(path, dtype="float32", device="cpu", kernels="triton")
    step, vocab = engine.preprocessor.steps.token_id, 300

    def answer(k):
        return [t for _ in range(k) for t in [rng.randrange(vocab) for _ in range(rng.randint(1, 3))] + [step]]

    prompt = [rng.randrange(vocab) for _ in range(17)]
    tokens = [[rng.randrange(vocab) for _ in range(3)] + answer(k) for k in (1, 3, 2)]
    tokens += [prompt + answer(2), prompt + [step] + answer(1)]
    got, want = fused.score(tokens), engine.score(tokens)
    assert [len(r.step_rewards) for r in got] == [1, 3, 2, 2, 2]
    for a, b in zip(got, want):
        assert a.step_rewards == pytest.approx(b.step_rewards, rel=RTOL, abs=ATOL)


@pytest.mark.skipif(torch.cuda.is_available() or not interpreting(), reason="runs the kernels in the CPU interpreter")
def test_fused_step_head_in_bf16(path, rng):
    """The PRM head on bf16 hidden rows at 37 step positions: fused vs PyTorch path, and the fused error
    against the fp32 oracle (the card's math on the same rows) at most 2x the PyTorch path's."""
    from rmserve.kernels.dispatch import TRITON_OPS
    from rmserve.loader import load_model

    from .kernel_cases import check_2x
    from .reference import card_step_rewards, read_checkpoint

    torch_head = load_model(path, dtype=torch.bfloat16).head
    fused_head = load_model(path, dtype=torch.bfloat16).head
    fused_head.use_kernels(TRITON_OPS)
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    T = 61
    hidden = torch.randn(T, torch_head.mlp[0].in_features, generator=g).to(torch.bfloat16)
    step_idx = torch.randint(0, T, (37,), generator=g)
    step_idx[0], step_idx[-1] = T - 1, 0
    last = torch.tensor([T - 1])
    want = torch_head.packed(hidden, last, None, step_idx)["step_rewards"]
    got = fused_head.packed(hidden, last, None, step_idx)["step_rewards"]
    _, tensors = read_checkpoint(path)
    rows = hidden[step_idx].float()
    oracle = torch.tensor(card_step_rewards(tensors, rows, [1] * len(rows), 1))
    assert got.shape == (37,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)   # two bf16 logit ulps through the softmax
    check_2x(got, want, oracle, "prm step_rewards")


# ------------------------------------------------------------------ the job, the server, the preset

def test_offline_job_writes_step_rewards_and_ranks_by_score(tmp_path, monkeypatch):
    """`rmserve score examples/math_steps.jsonl --model tiny:prm` (the job, in process): a steps column as
    the response, best-of-N groups ranked by score; the summary names the rule."""
    from rmserve.offline import JobConfig, ShapeConfig, run_job

    from .offline_helpers import REPO, read_jsonl

    monkeypatch.setenv("RMSERVE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "scores.jsonl"
    shape = ShapeConfig(prompt_field="problem", response_field="steps", group_field="problem_id")
    summary = run_job(JobConfig(os.path.join(REPO, "examples/math_steps.jsonl"), str(out), "tiny:prm", shape=shape,
                                engine=EngineConfig(dtype="float32", device="cpu", step_aggregation="last"),
                                quiet=True))
    assert (summary["rows"], summary["scored"], summary["family"]) == (5, 5, "qwen2_prm")
    assert (summary["step_token"], summary["step_aggregation"], summary["groups"]) == ("<extra_0>", "last", 2)
    rows = read_jsonl(out)
    with open(os.path.join(REPO, "examples/math_steps.jsonl")) as f:
        inputs = [json.loads(line) for line in f]
    for row, given in zip(rows, inputs):
        assert len(row["step_rewards"]) == len(given["steps"]) and row["score"] == row["step_rewards"][-1]
        group = [r["score"] for r in rows if r["problem_id"] == row["problem_id"]]
        assert row["rank"] == 1 + sum(s > row["score"] for s in group)


def test_server_scores_steps(engine):
    from fastapi.testclient import TestClient

    from rmserve.async_engine import AsyncEngine
    from rmserve.server.app import ServerConfig, create_app

    c = conv("What is 2+2?", ["2+2 is 4.", "The answer is \\boxed{4}."])
    with TestClient(create_app(AsyncEngine(engine), ServerConfig(model_name="m"))) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert (card["family"], card["step_token"], card["step_aggregation"], card["step_separator"]) == \
            ("qwen2_prm", "<extra_0>", "min", None)
        body = client.post("/v1/score", json={"conversations": [c, conv("x", ["ok", " "])]}).json()
        assert body["results"][1] == {"index": 1, "error": "step 2 is empty"}
        got = body["results"][0]
        assert client.post("/classify", json={"input": "x<extra_0>"}).status_code == 422
    want = engine.score([c])[0]
    assert got["step_rewards"] == pytest.approx(want.step_rewards, rel=RTOL, abs=ATOL)
    assert got["score"] == pytest.approx(want.score, rel=RTOL, abs=ATOL)
