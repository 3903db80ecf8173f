"""The Llama-3.2, Qwen3 and Qwen2 backbones (Skywork-Reward-V2, Qwen2.5-Math-RM) in fp32 on tiny
checkpoints in the real on-disk format: BT models against transformers' own
XForSequenceClassification logits (from_pretrained on the checkpoint directory, no remote code),
Qwen2ForRewardModel against transformers' Qwen2Model hidden states plus a plain head from the spec;
packed batches with shared prompts, the Triton kernels in the interpreter, the CUDA-graph runner with
the fake capture of tests/test_cuda_graphs.py. Then the pitfalls: BOS (none for Qwen, one for Llama),
templates that render today's date, Qwen3's think blocks, and the strict config and loader."""
import datetime
import json
import os

import pytest
import torch

from rmserve import CheckpointError, ConfigError, Engine, EngineConfig
from rmserve.config import load_spec, spec_from_dict
from rmserve.inputs import Preprocessor
from rmserve.kernels.dispatch import interpreting
from rmserve.loader import load_model

from .helpers import random_conversation, random_text
from .reference import Reference
from .test_loader import copy_checkpoint, edit_config, edit_tensors

# fp32 on CPU: packing, prefix sharing and the fused kernels reorder a few sums; the spec's bar.
RTOL, ATOL = 1e-5, 1e-5

# name -> (family, tiny settings): the three new backbones and the new family.
MODELS = {
    "qwen3": ("bt", {"backbone": "qwen3"}),          # Qwen3ForSequenceClassification, head_dim 32 x 4 != hidden 64
    "llama32": ("bt", {"backbone": "llama32"}),      # LlamaForSequenceClassification, tied, date preamble
    "qwen2": ("bt", {"backbone": "qwen2"}),          # Qwen2ForSequenceClassification (q/k/v biases)
    "qwen2_rm": ("qwen2_rm", {}),                    # Qwen2ForRewardModel (score MLP)
}
CONV = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]


@pytest.fixture(scope="module")
def paths(tiny_model):
    return {name: tiny_model(family, **settings) for name, (family, settings) in MODELS.items()}


@pytest.fixture(scope="module")
def engines(paths):
    """One fp32 engine (PyTorch references) per model, shared by the module's tests."""
    return {name: Engine.from_pretrained(p, dtype="float32", device="cpu", kernels="torch", max_batch_tokens=600)
            for name, p in paths.items()}


def workload(rng) -> list:
    """Random conversations, one prompt with three answers and a preference pair (shared prompts)."""
    convs = [random_conversation(rng, max_turns=2, hi=12) for _ in range(4)]
    prompt = [{"role": "user", "content": random_text(rng, 20, 30)}]   # 20+ tokens: over share_min_tokens
    convs += [prompt + [{"role": "assistant", "content": random_text(rng, 1, 8)}] for _ in range(3)]
    pair = random_conversation(rng, max_turns=2, hi=20)
    pair[-2]["content"] += " " + random_text(rng, 20, 20)
    convs += [pair, pair[:-1] + [{"role": "assistant", "content": random_text(rng, 1, 8)}]]
    return convs


def score_recording(engine, convs, groups=None):
    """engine.score, and for each batch the backbone ran, whether it ran a shared prompt (kv_idx set)."""
    backbone = engine.model.backbone
    shared, forward = [], backbone.forward
    backbone.forward = lambda batch: (shared.append(batch.kv_idx is not None), forward(batch))[1]
    try:
        return engine.score(convs, groups), shared
    finally:
        del backbone.forward


def test_specs_are_the_backbones_differences(paths):
    q3, l32, q2, rm = (load_spec(paths[n]) for n in ("qwen3", "llama32", "qwen2", "qwen2_rm"))
    assert (q3.model_type, q3.qk_norm, q3.qkv_bias, q3.head_dim, q3.q_size, q3.hidden_size) == \
        ("qwen3", True, False, 32, 128, 64)
    assert (q3.rope.theta, q3.rope.llama3_factor, q3.rms_norm_eps) == (1e6, None, 1e-6)
    assert (l32.model_type, l32.qk_norm, l32.qkv_bias, l32.rope.llama3_factor, l32.rope.theta) == \
        ("llama", False, False, 32.0, 500000.0)
    assert (q2.qkv_bias, q2.qk_norm, q2.head_dim, q2.rope.theta) == (True, False, 16, 10000.0)
    assert rm.family == "qwen2_rm" and rm.qkv_bias and rm.head.vhead_prefix == "score"
    assert rm.head.vhead_num_neurons == rm.hidden_size and rm.head.vhead_outputs == 1


@pytest.mark.parametrize("name", ["qwen3", "llama32", "qwen2"])
def test_bt_matches_transformers_logits(paths, engines, name, rng):
    """Packed, with shared prompts: each score equals transformers' XForSequenceClassification logit."""
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(paths[name], dtype=torch.float32).eval()
    assert type(hf).__name__ == _cfg(paths, name)["architectures"][0]
    engine = engines[name]
    convs = workload(rng)
    results, shared = score_recording(engine, convs, groups=[None] * 4 + ["bon"] * 3 + ["pair"] * 2)
    assert any(shared) and len(shared) < len(convs) // 2, shared   # packed, and the prompts ran once
    for enc, res in zip(engine.encode(convs), results):
        assert res.ok, res.error
        with torch.no_grad():
            want = hf(torch.tensor([list(enc.ids)])).logits[0, 0]
        assert res.score == pytest.approx(want.item(), rel=RTOL, abs=ATOL)


def test_qwen2_rm_matches_qwen2model_and_the_spec_head(paths, engines, rng):
    engine, ref = engines["qwen2_rm"], Reference(paths["qwen2_rm"])
    convs = workload(rng)
    results, shared = score_recording(engine, convs)   # automatic grouping: the default system prompt is shared
    assert any(shared)
    for enc, res in zip(engine.encode(convs), results):
        assert res.ok and res.num_tokens == len(enc)
        assert res.score == pytest.approx(ref.outputs(list(enc.ids), None)["score"].item(), rel=RTOL, abs=ATOL)
    # the head really is score.0 -> ReLU -> score.2 with biases (a missing ReLU or bias would change scores)
    head = engine.model.head
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "ReLU", "Linear"] and head.mlp[2].bias is not None


@pytest.mark.skipif(torch.cuda.is_available() or not interpreting(), reason="runs the kernels in the CPU interpreter")
@pytest.mark.parametrize("name", ["qwen3", "llama32", "qwen2_rm"])
def test_kernel_path_equals_torch_path(paths, engines, name, rng):
    """kernels='triton' (QK-norm fused into RoPE, bias in the fused QKV, fused head) vs the references,
    on short token samples (the interpreter is slow), two of them sharing a 17-token prompt."""
    fused = Engine.from_pretrained(paths[name], dtype="float32", device="cpu", kernels="triton")
    vocab = fused.spec.vocab_size
    tokens = [[rng.randrange(vocab) for _ in range(rng.randint(2, 6))] for _ in range(2)]
    prompt = [rng.randrange(vocab) for _ in range(17)]
    tokens += [prompt + [rng.randrange(vocab) for _ in range(rng.randint(1, 4))] for _ in range(2)]
    for got, want in zip(fused.score(tokens), engines[name].score(tokens)):
        assert got.ok and want.ok
        assert got.score == pytest.approx(want.score, rel=RTOL, abs=ATOL)


@pytest.mark.skipif(torch.cuda.is_available() or not interpreting(), reason="runs the kernels in the CPU interpreter")
def test_qwen2_rm_fused_head_in_bf16(tiny_model, rng):
    """The Qwen2 RM's score MLP (hidden x hidden first layer) through the fused gather-projection in bf16:
    test_kernels_engine's check (fused vs PyTorch head, the 2x rule against the fp32 spec head)."""
    from . import test_kernels_engine

    test_kernels_engine.test_fused_head_in_bf16(tiny_model, "qwen2_rm", rng)


def test_graph_runner_replays_the_new_backbones(engines, rng):
    """The CUDA-graph runner's logic (fake capture, as tests/test_cuda_graphs.py) on Qwen3 and the Qwen2 RM,
    in calls that mix plain samples and a shared prompt: every score is the eager engine's."""
    from rmserve.cuda_graphs import Bucket

    from .test_cuda_graphs import runner_for

    for name in ("qwen3", "qwen2_rm"):
        engine = engines[name]
        convs = workload(rng)
        calls = [[None] * len(convs), [None] * 4 + ["bon"] * 3 + ["pair"] * 2]   # every sample alone; shared prompts
        eager = [engine.score(convs, groups) for groups in calls]
        engine.graphs, recorder = runner_for(engine, [Bucket(tokens=600, max_seqlen=300, seqs=12)])   # one capture
        try:
            graphed = [engine.score(convs, groups) for groups in calls]
        finally:
            engine.graphs = None
        assert recorder.replayed > 0
        for got, want in zip(graphed, eager):
            for a, b in zip(got, want):
                assert a.score == pytest.approx(b.score, rel=RTOL, abs=ATOL)


# ------------------------------------------------------------------ BOS, dates, think blocks

@pytest.mark.parametrize("bos", ["one", "template", "tokenizer"])
def test_qwen_gets_no_bos_under_any_policy(engines, bos):
    tok = engines["qwen3"].preprocessor.tokenizer
    assert tok.bos_token_id is None
    pre = Preprocessor(tok, bos=bos, max_length=1000, needs_gate=False)
    enc = pre.encode_many([CONV])[0]
    # exactly the rendered text's tokens: nothing invented in front (config.json's bos_token_id is
    # <|endoftext|>, which must not appear)
    assert list(enc.ids) == tok(pre.render(CONV), add_special_tokens=False)["input_ids"]
    assert enc.ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.convert_tokens_to_ids("<|endoftext|>") not in enc.ids


def test_llama32_gets_exactly_one_bos(engines):
    pre = engines["llama32"].preprocessor
    ids = pre.encode_many([CONV])[0].ids
    assert ids[0] == pre.bos_id and ids.count(pre.bos_id) == 1
    # its template has BOS and its tokenizer adds one: the trap the default policy avoids
    two = Preprocessor(pre.tokenizer, bos="tokenizer", max_length=1000, needs_gate=False).encode_many([CONV])[0]
    assert two.ids[:2] == (pre.bos_id, pre.bos_id)


class FakeClock(datetime.datetime):
    """transformers' strftime_now reads `datetime.now()` of its module: this one says `day`."""
    day = datetime.datetime(2025, 3, 1)

    @classmethod
    def now(cls, tz=None):
        return cls.day


def test_date_template_gives_one_score_on_any_day(engines, monkeypatch):
    import transformers.utils.chat_template_utils as ctu

    monkeypatch.setattr(ctu, "datetime", FakeClock)
    engine = engines["llama32"]
    tok = engine.preprocessor.tokenizer
    seen = []
    for day in (datetime.datetime(2025, 3, 1), datetime.datetime(2031, 11, 30, 23, 59)):
        FakeClock.day = day
        raw = tok.apply_chat_template(CONV, tokenize=False)   # transformers' own render follows the clock
        seen.append((raw, engine.preprocessor.render(CONV), engine.score([CONV])[0].score))
    (raw1, text1, score1), (raw2, text2, score2) = seen
    assert "Today Date: 01 Mar 2025" in raw1 and "Today Date: 30 Nov 2031" in raw2
    assert text1 == text2 and "Today Date: 26 Jul 2024\n" in text1
    assert score1 == score2
    # pinned text = transformers' render on the pinned day
    FakeClock.day = datetime.datetime(2024, 7, 26, 15, 30)
    assert tok.apply_chat_template(CONV, tokenize=False) == text1


def test_template_date_is_settable_and_checked(engines):
    tok = engines["llama32"].preprocessor.tokenizer
    pre = Preprocessor(tok, max_length=1000, needs_gate=False, template_date="2025-01-02")
    assert "Today Date: 02 Jan 2025\n" in pre.render(CONV)
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        EngineConfig(template_date="yesterday")
    # a clock format rmserve cannot evaluate ahead is refused, not left to the day
    with pytest.raises(ValueError, match="not a string literal"):
        Preprocessor(tok, max_length=1000, needs_gate=False,
                     chat_template="{% set f = '%Y' %}{{ strftime_now(f) }}{{ messages[0].content }}")
    # a template that reads no clock is rendered as it is (no macro, no variables)
    plain = engines["qwen3"].preprocessor
    assert plain.template == plain.tokenizer.chat_template and plain.template_vars == {}


def test_qwen3_think_blocks_render_as_its_template_does(engines):
    pre = engines["qwen3"].preprocessor
    think = [{"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "<think>\nThe user greets.\n</think>\n\nHello!"}]
    assert pre.render(think) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nThe user greets.\n"
                                 "</think>\n\nHello!<|im_end|>\n")
    # the last answer always gets a think block, empty if it has none
    assert pre.render(CONV).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nIt is 4.<|im_end|>\n")
    # an earlier turn's reasoning is dropped; the last turn's is kept
    multi = think + [{"role": "user", "content": "And?"},
                     {"role": "assistant", "content": "<think>more</think>Bye."}]
    assert pre.render(multi) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                                 "<|im_start|>user\nAnd?<|im_end|>\n<|im_start|>assistant\n<think>\nmore\n</think>\n\n"
                                 "Bye.<|im_end|>\n")
    ids = pre.encode_many([think])[0].ids
    tok = pre.tokenizer
    assert tok.convert_tokens_to_ids("<think>") in ids and tok.convert_tokens_to_ids("</think>") in ids


# ------------------------------------------------------------------ strict config and loader

def test_real_shapes_table_holds_the_new_models():
    """rmserve/shapes.py (what the kernel compile stage runs) parses into the backbones' specs."""
    from rmserve import shapes

    specs = {b: spec_from_dict(shapes.config(b, f)) for b in shapes.BACKBONES for f in shapes.families(b)}
    q06, l1, rm = specs["qwen3-0.6b"], specs["llama-3.2-1b"], specs["qwen2.5-math-rm-72b"]
    assert (q06.architecture, q06.qk_norm, q06.head_dim, q06.q_size, q06.hidden_size) == \
        ("Qwen3ForSequenceClassification", True, 128, 2048, 1024)
    assert (l1.head_dim, l1.rope.llama3_factor) == (64, 32.0) and specs["qwen3-8b"].q_size == 4096
    assert (rm.family, rm.qkv_bias, rm.head.vhead_num_neurons) == ("qwen2_rm", True, 8192)
    with pytest.raises(ValueError, match="no armorm model on a qwen3 backbone"):
        shapes.config("qwen3-8b", "armorm")


def _cfg(paths, name, **changes):
    with open(os.path.join(paths[name], "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("name,changes,message", [
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}, "sliding-window"),
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 0}, "sliding-window"),   # window 4096 < 4097
    ("qwen2", {"layer_types": ["sliding_attention", "full_attention"]}, "sliding-window"),   # no window in effect
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("qwen3", {"model_type": "qwen2"}, "needs model_type 'qwen3'"),
    ("llama32", {"mlp_bias": True}, "mlp_bias"),
    ("qwen3", {"rope_scaling": {"full_attention": {"rope_type": "default"}}}, "per-layer-type RoPE"),
    ("qwen3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("qwen3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
], ids=["qwen3-window", "qwen2-window", "qwen2-layer-types", "qwen3-bias", "model-type", "llama-mlp-bias",
        "nested-rope", "partial-rotary", "yarn"])
def test_config_refusals(paths, name, changes, message):
    cfg = _cfg(paths, name, **changes)
    if name == "qwen2" and "layer_types" not in changes:
        cfg["max_position_embeddings"] = 4097
    with pytest.raises(ConfigError, match=message):
        spec_from_dict(cfg)


def test_config_defaults_and_harmless_keys(paths):
    # transformers' defaults for absent keys: Qwen3's head_dim is 128, not hidden // heads
    q3 = {k: v for k, v in _cfg(paths, "qwen3").items() if k not in ("head_dim", "max_position_embeddings")}
    spec = spec_from_dict(q3)
    assert spec.head_dim == 128 and spec.max_position_embeddings == 32768
    l32 = {k: v for k, v in _cfg(paths, "llama32").items() if k not in ("head_dim", "rms_norm_eps")}
    assert (spec_from_dict(l32).head_dim, spec_from_dict(l32).rms_norm_eps) == (16, 1e-6)
    # a window that covers every position changes nothing; an untaken window neither
    full = spec_from_dict(_cfg(paths, "qwen2"))
    covering = spec_from_dict(_cfg(paths, "qwen2", use_sliding_window=True, max_window_layers=0))
    assert covering == full
    assert spec_from_dict(_cfg(paths, "qwen3", tie_word_embeddings=False)) == spec_from_dict(_cfg(paths, "qwen3"))


def test_covering_sliding_window_is_irrelevant_in_transformers_too(paths, engines, tmp_path):
    """At the boundary rmserve accepts, a window exactly as long as max_position_embeddings (= this sample's
    length) on every layer: transformers' logit equals rmserve's full-attention score. One token shorter,
    transformers' score changes, and rmserve refuses the config."""
    from transformers import AutoModelForSequenceClassification

    ids = list(engines["qwen2"].encode([CONV])[0].ids)
    full = engines["qwen2"].score([ids])[0].score
    logits = {}
    for window in (len(ids), len(ids) - 1):
        path = copy_checkpoint(paths["qwen2"], tmp_path / f"w{window}")
        edit_config(path, use_sliding_window=True, max_window_layers=0, sliding_window=window,
                    max_position_embeddings=len(ids))
        hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        assert set(hf.config.layer_types) == {"sliding_attention"}
        with torch.no_grad():
            logits[window] = hf(torch.tensor([ids])).logits[0, 0].item()
        if window == len(ids):
            assert Engine.from_pretrained(path, dtype="float32", device="cpu").score([ids])[0].score == full
        else:
            with pytest.raises(ConfigError, match="sliding-window"):
                load_spec(path)
    assert logits[len(ids)] == pytest.approx(full, rel=RTOL, abs=ATOL)
    assert abs(logits[len(ids) - 1] - full) > 1e-4


@pytest.mark.parametrize("name,edit,message", [
    ("qwen2", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"), r"model\.layers\.1\.self_attn\.k_proj\.bias"),
    ("qwen3", lambda t: t.pop("model.layers.0.self_attn.k_norm.weight"),
     r"model\.layers\.0\.self_attn\.k_norm\.weight"),
    ("qwen2", lambda t: t.update({"model.layers.0.self_attn.v_proj.bias": torch.zeros(7)}), r"has shape \[7\]"),
    ("qwen2", lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}), "unexpected tensor"),
    ("llama32", lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}), "unexpected tensor"),
    ("llama32", lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}), "unexpected tensor"),
    ("qwen2_rm", lambda t: t.pop("score.2.bias"), r"score\.2\.bias"),
], ids=["qwen2-bias-missing", "qwen3-norm-missing", "bias-shape", "o-bias", "llama-bias", "llama-qk-norm",
        "rm-head-bias"])
def test_loader_is_strict_about_the_new_tensors(paths, tmp_path, name, edit, message):
    path = copy_checkpoint(paths[name], tmp_path / "m")
    edit_tensors(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_loader_fuses_biases_and_loads_norms(paths):
    from safetensors.torch import load_file

    t = load_file(os.path.join(paths["qwen2"], "model.safetensors"))
    attn = load_model(paths["qwen2"]).backbone.layers[1].self_attn
    assert torch.equal(attn.qkv_proj.bias, torch.cat([t[f"model.layers.1.self_attn.{n}_proj.bias"] for n in "qkv"]))
    assert attn.o_proj.bias is None
    t = load_file(os.path.join(paths["qwen3"], "model.safetensors"))
    attn = load_model(paths["qwen3"]).backbone.layers[0].self_attn
    assert torch.equal(attn.k_norm.weight, t["model.layers.0.self_attn.k_norm.weight"])
    assert attn.qkv_proj.bias is None and "lm_head.weight" not in t   # tied: no lm_head on disk


# ------------------------------------------------------------------ presets, job and server metadata

@pytest.mark.parametrize("preset", ["qwen3", "llama32", "qwen2-rm"])
def test_presets_score_the_example_file(preset, tmp_path, monkeypatch):
    """`rmserve score examples/conversations.jsonl --model tiny:X` (the job, in process); the summary
    names the template date."""
    from rmserve.offline import JobConfig, run_job

    from .offline_helpers import REPO, read_jsonl

    monkeypatch.setenv("RMSERVE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "scores.jsonl"
    summary = run_job(JobConfig(os.path.join(REPO, "examples/conversations.jsonl"), str(out), f"tiny:{preset}",
                                engine=EngineConfig(dtype="float32", device="cpu"), quiet=True))
    assert (summary["rows"], summary["scored"], summary["errors"]) == (5, 5, 0)
    assert summary["template_date"] == "2024-07-26"
    assert summary["family"] == ("qwen2_rm" if preset == "qwen2-rm" else "bt")
    assert all(isinstance(r["score"], float) for r in read_jsonl(out))


def test_server_names_the_template_date(paths):
    from fastapi.testclient import TestClient

    from rmserve.async_engine import AsyncEngine
    from rmserve.server.app import ServerConfig, create_app

    engine = Engine.from_pretrained(paths["llama32"], dtype="float32", device="cpu", template_date="2025-05-05")
    with TestClient(create_app(AsyncEngine(engine), ServerConfig(model_name="m"))) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["template_date"] == "2025-05-05" and card["family"] == "bt"
        got = client.post("/v1/score", json={"conversations": [CONV]}).json()["results"][0]["score"]
    assert got == pytest.approx(engine.score([CONV])[0].score, rel=RTOL, abs=ATOL)

