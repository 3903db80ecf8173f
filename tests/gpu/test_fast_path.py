"""The CUDA fast path (skipped without CUDA): every family in bf16 against transformers in bf16
(tiny and 8B-wide random models), CUDA-graph replay against eager, the attention backends
against each other, the streaming pipeline, and the memory-derived token budget.

Tolerance rule (flash-attention's): per output, rmserve's largest bf16 error over the batch against
the fp32 reference must be at most twice transformers' own largest bf16 error against it, plus a
floor for outputs where transformers happens to be nearly exact: 1e-2 times the output's magnitude
(1 + max |reference|), as bf16 rounds relative to the value (an ArmoRM reward of 4 has a bf16 ulp of
0.03). Element by element with an absolute floor, one ulp apart at an element transformers rounded
right fails: on CPU, ArmoRM, QRM and URM failed that in 28 of 30 seeds; this rule in 1 of 200 (URM's
score, 6 samples) and 0 of 100 with 12 samples, the count the tiny models use.
"""
import random

import pytest
import torch

from rmserve import Engine
from rmserve.cuda_graphs import choose_bucket
from rmserve.model.attention import attention_ref, available_backends, select_attention
from rmserve.packing import pack

from ..helpers import FAMILIES, random_conversation
from ..reference import Reference, head_ref, hf_hidden

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

FLOOR = 1e-2
# Attention outputs are convex mixes of N(0, 1) values; bf16 rounding of inputs and output
# gives ~1e-2 at most.
ATTN_ATOL = 2e-2
# Graph replay versus the same engine's eager path on unpadded inputs: the GEMMs see other row
# counts (padding), so cuBLAS may pick other kernels: bf16 rounding differences only.
GRAPH_ATOL = 3e-2


def assert_within_rule(got: list[dict], ref32: list[dict], ref16: list[dict], what: str) -> None:
    """One dict of outputs per sample: rmserve's, the fp32 reference's, transformers' bf16 path's."""
    for key in ref32[0]:
        want = torch.stack([r[key].float().cpu().reshape(-1) for r in ref32])
        g = torch.stack([torch.as_tensor(o[key], dtype=torch.float32).reshape(-1) for o in got])
        plain = torch.stack([r[key].float().cpu().reshape(-1) for r in ref16])
        assert torch.isfinite(g).all(), f"{what} {key}: not finite"
        err, err_plain = (g - want).abs().max().item(), (plain - want).abs().max().item()
        bound = 2 * err_plain + FLOOR * (1 + want.abs().max().item())
        assert err <= bound, f"{what} {key}: error {err:.3g} over bound {bound:.3g} (transformers {err_plain:.3g})"


def ref_outputs(ref: Reference, ids: list, gate) -> dict:
    """The oracle with its backbone on CUDA and the spec head on CPU (where its tensors live)."""
    hidden = hf_hidden(ref.model, ids).cpu()
    return head_ref(ref.cfg, ref.tensors, hidden[-1], None if gate is None else hidden[gate], ref.dtype)


def score_against_transformers(path: str, rng: random.Random, n: int = 12, **settings) -> None:
    engine = Engine.from_pretrained(path, dtype="bfloat16", device="cuda", share_prefix=False, **settings)
    ref32 = Reference(path, dtype=torch.float32, device="cuda")
    ref16 = Reference(path, dtype=torch.bfloat16, device="cuda")
    convs = [random_conversation(rng) for _ in range(n)]
    got, want32, want16 = [], [], []
    for enc, res in zip(engine.encode(convs), engine.score(convs)):
        assert res.ok, res.error
        ids = list(enc.ids)
        want32.append(ref_outputs(ref32, ids, enc.gate))
        want16.append(ref_outputs(ref16, ids, enc.gate))
        got.append({k: getattr(res, k) for k in want32[-1]})
    assert_within_rule(got, want32, want16, engine.family)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_against_transformers_tiny(tiny_model, family, rng):
    score_against_transformers(tiny_model(family), rng)


@pytest.mark.parametrize("family", ["bt", "armorm"])
def test_bf16_against_transformers_8b_wide(tmp_path, family, rng):
    """Llama-3-8B layer shapes (hidden 4096, 32 heads, 8 KV heads, MLP 14336), 2 layers."""
    from rmserve.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(str(tmp_path / family), family, hidden=4096, heads=32, kv_heads=8,
                                 intermediate=14336, layers=2, dtype=torch.bfloat16, gating_hidden_dim=1024)
    score_against_transformers(path, rng)


@pytest.mark.parametrize("family", ["bt", "qrm"])
def test_graph_replay_equals_eager(tiny_model, family, rng):
    engine = Engine.from_pretrained(tiny_model(family), dtype="bfloat16", device="cuda", max_batch_tokens=1024,
                                    share_prefix=False)
    runner = engine.graphs
    assert runner is not None and engine.attention in ("flash_attn", "torch_varlen")
    needs_gate = engine.model.head.needs_gate
    for _ in range(5):
        lens = [rng.randint(1, 200) for _ in range(rng.randint(1, 5))]
        seqs = [[rng.randrange(300) for _ in range(n)] for n in lens]
        batch = pack(seqs, [rng.randrange(n) for n in lens] if needs_gate else None, device="cuda")
        b = choose_bucket(runner.buckets, batch.num_tokens, batch.num_seqs, batch.max_seqlen)
        assert b is not None
        with torch.inference_mode():   # the outputs were made in inference mode (Engine.forward_eager)
            for out in runner.graphs[b][1].values():    # poison the graph's outputs before the replay
                out.fill_(float("nan"))
        got = engine.forward(batch)
        assert runner.replays[b] >= 1
        # the same padded static batch run eagerly: bitwise the same
        same = engine.forward_eager(runner.inputs.view(b))
        for key, value in got.items():
            assert torch.equal(value, same[key][:batch.num_seqs]), key
        # the unpadded batch run eagerly: bf16 rounding only
        plain = engine.forward_eager(batch)
        for key, value in got.items():
            torch.testing.assert_close(value, plain[key], atol=GRAPH_ATOL, rtol=0)


def test_graphs_on_and_off_score_alike(tiny_model, rng):
    path = tiny_model("armorm")
    on = Engine.from_pretrained(path, dtype="bfloat16", device="cuda", share_prefix=False)
    off = Engine.from_pretrained(path, dtype="bfloat16", device="cuda", share_prefix=False, enforce_eager=True)
    assert on.graphs is not None and off.graphs is None
    convs = [random_conversation(rng) for _ in range(12)]
    for a, b in zip(on.score(convs), off.score(convs)):
        assert a.score == pytest.approx(b.score, abs=GRAPH_ATOL)
        torch.testing.assert_close(torch.tensor(a.gating), torch.tensor(b.gating), atol=GRAPH_ATOL, rtol=0)


def test_reference_attention_cannot_be_captured(tiny_model):
    with pytest.raises(ValueError, match="CUDA graph"):
        Engine.from_pretrained(tiny_model("bt"), device="cuda", attention="reference")
    assert Engine.from_pretrained(tiny_model("bt"), device="cuda", attention="reference",
                                  enforce_eager=True).graphs is None


def test_budget_is_capped_and_from_memory(tiny_model):
    engine = Engine.from_pretrained(tiny_model("bt"), device="cuda", max_batch_tokens=3000)
    assert engine.config.max_batch_tokens == 3000 and max(b.tokens for b in engine.graphs.buckets) == 3000
    with pytest.raises(RuntimeError, match="not enough GPU memory"):
        Engine.from_pretrained(tiny_model("bt"), device="cuda", gpu_memory_utilization=1e-6)


def test_length_limit_comes_from_memory(tiny_model, monkeypatch, rng):
    """A sample longer than one forward may hold beside the graphs is an input error naming
    gpu_memory_utilization; the engine's limit and its preprocessor's agree."""
    import rmserve.memory

    engine = Engine.from_pretrained(tiny_model("bt"), device="cuda")
    assert engine.preprocessor.max_length == engine.config.max_length == engine.spec.max_position_embeddings
    monkeypatch.setattr(rmserve.memory, "cuda_memory_plan", lambda *a, **k: (256, 40))
    small = Engine.from_pretrained(tiny_model("bt"), device="cuda")
    assert small.config.max_batch_tokens == 256 and small.config.max_length == 40
    long = [{"role": "user", "content": "the cat " * 30}, {"role": "assistant", "content": "ok"}]
    bad, good = small.score([long, random_conversation(rng, max_turns=1, hi=3)])
    assert "one forward may hold in GPU memory (gpu_memory_utilization=0.9)" in bad.error
    assert good.ok


def _varlen_batch(g, lens, hq=32, hkv=8, d=128):
    total = sum(lens)
    q = torch.randn(total, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(total, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(total, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return q, k, v, cu


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_attention_backend_agrees_and_captures(backend, rng):
    if backend not in available_backends(torch.device("cuda")):
        pytest.skip(f"{backend} is not installed here")
    _, attn = select_attention(backend, torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(rng.randrange(1 << 30))
    lens = [1, 300, 77, 1024, 5]
    q, k, v, cu = _varlen_batch(g, lens)
    scale = 128 ** -0.5
    want = attention_ref(q.float(), k.float(), v.float(), cu, cu, max(lens), max(lens), scale)
    got = attn(q, k, v, cu, cu, max(lens), max(lens), scale)
    torch.testing.assert_close(got.float(), want, atol=ATTN_ATOL, rtol=0)
    # inside a CUDA graph, with zero-length padding sequences and a bucket's larger max_seqlen
    cu_pad = torch.cat([cu, cu[-1:].repeat(4)])
    out = torch.full_like(q, float("nan"))
    graph = torch.cuda.CUDAGraph()
    attn(q, k, v, cu_pad, cu_pad, 2048, 2048, scale)      # warm-up
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out.copy_(attn(q, k, v, cu_pad, cu_pad, 2048, 2048, scale))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, attn(q, k, v, cu_pad, cu_pad, 2048, 2048, scale))
    torch.testing.assert_close(out.float(), want, atol=ATTN_ATOL, rtol=0)


def test_flash_attn_and_torch_varlen_agree(rng):
    found = available_backends(torch.device("cuda"))
    if not {"flash_attn", "torch_varlen"} <= set(found):
        pytest.skip("needs both flash-attn and torch's varlen attention")
    g = torch.Generator(device="cuda").manual_seed(rng.randrange(1 << 30))
    lens = [rng.randint(1, 700) for _ in range(7)]
    q, k, v, cu = _varlen_batch(g, lens)
    a = select_attention("flash_attn", torch.device("cuda"))[1](q, k, v, cu, cu, max(lens), max(lens), 128 ** -0.5)
    b = select_attention("torch_varlen", torch.device("cuda"))[1](q, k, v, cu, cu, max(lens), max(lens), 128 ** -0.5)
    torch.testing.assert_close(a.float(), b.float(), atol=ATTN_ATOL, rtol=0)


def test_score_stream_on_cuda(tiny_model, rng):
    engine = Engine.from_pretrained(tiny_model("qrm"), dtype="bfloat16", device="cuda", max_batch_tokens=700,
                                    lookahead=10, share_prefix=False)
    convs = [random_conversation(rng) for _ in range(30)] + [[]]
    want = engine.score(convs)
    got = dict(engine.score_stream(iter(convs)))
    assert sorted(got) == list(range(31)) and got[30].error == want[30].error
    for i in range(30):
        assert got[i].num_tokens == want[i].num_tokens
        assert got[i].score == pytest.approx(want[i].score, abs=GRAPH_ATOL)
