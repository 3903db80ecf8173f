"""The default configuration on CUDA (skipped without it): shared-prompt batches replaying CUDA
graphs, a process reward model's step slots, an fp16 engine, a sample over the batch budget and
one over the memory limit, a model with the exact Llama-3.1-8B layer shape, score_stream with the
default settings, and an engine on the last CUDA device. Each is compared to the fp32 reference
engine on CPU (rmserve with share_prefix off, itself checked against transformers in
tests/test_exact.py).

Tolerances. The rule (flash-attention's): an engine's largest error against the fp32 reference,
per output, is at most twice the largest error of the same dtype's plain PyTorch path (an eager
engine with share_prefix off, torch kernels) plus a floor for a path that happens to be nearly
exact; and directly at most ATOL. Both scale with the output's magnitude (1 + max |reference|):
the tiny models' outputs reach ~4 (ArmoRM rewards, URM means), and bf16 rounds relative to the
value (8 significant bits: ~4e-3 a rounding; a plain bf16 URM score of 2.5 is off by ~0.06 on CPU).
Floors: bf16 1e-2, fp16 2e-3 (3 more bits). ATOL: bf16 4e-2 (the spec's published cross-engine
bar for fp16 8B models, on O(1) scores), fp16 1e-2.

Budgets are small (<= 1,024 tokens) so each engine captures its ladder in about a second.
"""
import math

import pytest
import torch

from rmserve import Engine
from rmserve.cuda_graphs import bucket_for
from rmserve.prefix import plan_samples

from ..helpers import FAMILIES, random_conversation, random_text
from ..test_prefix import make_samples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

FLOOR = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
ATOL = {torch.bfloat16: 4e-2, torch.float16: 1e-2}
FIELDS = ("score", "rewards", "gating", "coefficients", "reward_quantiles", "means", "spreads", "weights")


def outputs(results, fields=FIELDS) -> dict[str, torch.Tensor]:
    """Every float output of a list of results, one row per result."""
    out = {}
    for f in fields:
        values = [getattr(r, f) for r in results]
        if values and values[0] is not None:
            out[f] = torch.tensor(values, dtype=torch.float64).reshape(len(values), -1)
    return out


def assert_rule(got, plain, ref, dtype: torch.dtype, what: str) -> None:
    """got/plain/ref: lists of ScoreResult (engine, same-dtype plain eager path, fp32 reference)."""
    assert all(r.ok for r in got), [r.error for r in got if not r.ok]
    g, p, w = outputs(got), outputs(plain), outputs(ref)
    assert set(g) == set(w) and g, what
    for key in w:
        assert torch.isfinite(g[key]).all(), f"{what} {key}: not finite"
        scale = 1 + w[key].abs().max().item()
        err, err_plain = (g[key] - w[key]).abs().max().item(), (p[key] - w[key]).abs().max().item()
        assert err <= 2 * err_plain + FLOOR[dtype] * scale, f"{what} {key}: error {err:.3g}, plain {err_plain:.3g}"
        assert err <= ATOL[dtype] * scale, f"{what} {key}: error {err:.3g}"


def poison(runner) -> None:
    """NaN in every graph's static outputs: a replay that writes nothing shows."""
    with torch.inference_mode():
        for _, outs in runner.graphs.values():
            for t in outs.values():
                t.fill_(math.nan)


def reference(path: str) -> Engine:
    return Engine.from_pretrained(path, dtype="float32", device="cpu", share_prefix=False)


def plain_path(path: str, dtype: str, device: str = "cuda", **settings) -> Engine:
    return Engine.from_pretrained(path, dtype=dtype, device=device, share_prefix=False, enforce_eager=True,
                                  kernels="torch", **settings)


def shared_prompts(rng, n_prompts=3) -> list:
    """Prompts with 2-4 answers each (long enough to share their template and question; under 300
    tokens a sample), and plain samples."""
    convs = []
    for _ in range(n_prompts):
        prompt = random_conversation(rng, max_turns=1, hi=12)[:-1]
        prompt[-1]["content"] += " " + random_text(rng, 8, 12)
        convs += [prompt + [{"role": "assistant", "content": random_text(rng, 1, 12)}] for _ in range(rng.randint(2, 4))]
    return convs + [random_conversation(rng, max_turns=1, hi=10) for _ in range(3)]


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompts_replay_graphs(tiny_model, family, rng):
    """The default engine (share_prefix on, graphs on) replays its keyed ladder for shared-prompt
    batches too: prompt gates, one-token suffixes, repeats, groups split by a 600-token budget."""
    path = tiny_model(family)
    engine = Engine.from_pretrained(path, dtype="bfloat16", device="cuda", max_batch_tokens=600)
    runner = engine.graphs
    assert runner is not None and all(b.keys == 4 * b.tokens for b in runner.buckets)
    samples, keys = make_samples(engine, rng)
    ref = reference(path).score(samples)
    plain = plain_path(path, "bfloat16", max_batch_tokens=600).score(samples)
    encoded = list(enumerate(engine.encode(samples)))
    for hints in (keys, None):
        # every batch replays but one gathering over 4x its tokens in keys (tests/test_cuda_graphs.py)
        packed = [p.pack(runner.needs_gate) for p in plan_samples(encoded, hints, engine.limits())]
        fits = [bucket_for(runner.buckets, b) is not None for b in packed]
        assert all(f or b.kv_idx.numel() > 4 * b.num_tokens for f, b in zip(fits, packed))
        poison(runner)
        replays, eager = sum(runner.replays.values()), runner.eager
        got = engine.score(samples, groups=hints)
        assert sum(runner.replays.values()) - replays == sum(fits) > 0 and runner.eager - eager == fits.count(False)
        assert_rule(got, plain, ref, torch.bfloat16, f"{family} groups={'keys' if hints else 'auto'}")


def test_prm_step_rewards_replay_graphs(tiny_model, rng):
    """A process reward model in the default configuration: every bucket has T // 4 step slots, the
    step rows are gathered inside the graphs, best-of-N prompts shared (one shared into a first step);
    each score and step reward by the rule against the fp32 reference (tests/test_prm.py checks that
    one against the model card's code)."""
    from rmserve.results import ScoreResult

    from ..test_prm import workload

    path = tiny_model("qwen2_prm")
    engine = Engine.from_pretrained(path, dtype="bfloat16", device="cuda", max_batch_tokens=600)
    runner = engine.graphs
    assert runner is not None and all(b.steps == max(1, b.tokens // 4) for b in runner.buckets)
    convs, groups = workload(rng)
    ref = reference(path).score(convs)
    plain = plain_path(path, "bfloat16", max_batch_tokens=600).score(convs)
    poison(runner)
    replays = sum(runner.replays.values())
    got = engine.score(convs, groups)
    assert sum(runner.replays.values()) > replays and all(r.ok for r in got), [r.error for r in got]
    assert [len(r.step_rewards) for r in got] == [len(r.step_rewards) for r in ref]

    def flat(results):   # each sample's score, then its step rewards, as one-output results
        return [ScoreResult(score=x) for r in results for x in (r.score, *r.step_rewards)]

    assert_rule(flat(got), flat(plain), flat(ref), torch.bfloat16, "qwen2_prm step rewards and scores")


@pytest.mark.parametrize("family", ["armorm", "urm"])
def test_fp16_engine(tiny_model, family, rng):
    """fp16 under the default configuration (URM's weights MLP is fp16 in every engine dtype)."""
    path = tiny_model(family)
    engine = Engine.from_pretrained(path, dtype="float16", device="cuda", max_batch_tokens=512)
    assert engine.dtype == torch.float16 and engine.graphs is not None
    convs = shared_prompts(rng)
    poison(engine.graphs)
    got = engine.score(convs)
    assert sum(engine.graphs.replays.values()) > 0
    assert_rule(got, plain_path(path, "float16", max_batch_tokens=512).score(convs), reference(path).score(convs),
                torch.float16, f"{family} fp16")


def test_over_the_budget_runs_alone_and_over_memory_is_an_error(tiny_model, monkeypatch, rng):
    """A sample longer than the batch budget (and the ladder) runs eagerly in a batch of its own;
    one longer than a forward may hold in the memory left beside the graphs' pool is an input
    error naming gpu_memory_utilization, the others in the call scored."""
    import rmserve.memory

    path = tiny_model("qrm")
    monkeypatch.setattr(rmserve.memory, "cuda_memory_plan", lambda *a, **k: (256, 700))
    engine = Engine.from_pretrained(path, dtype="bfloat16", device="cuda", max_batch_tokens=256)
    assert engine.config.max_batch_tokens == 256 and engine.config.max_length == 700
    assert engine.graphs.buckets[-1].tokens == 256
    long = [{"role": "user", "content": "the cat " * 100}, {"role": "assistant", "content": "ok " * 20}]   # ~350
    too_long = [{"role": "user", "content": "the cat " * 300}, {"role": "assistant", "content": "ok"}]     # ~950
    convs = [long] + [random_conversation(rng, max_turns=1, hi=6) for _ in range(4)] + [too_long]
    n = [len(e) for e in engine.encode(convs[:-1])]
    assert 256 < n[0] <= 700 and all(k < 256 for k in n[1:])
    poison(engine.graphs)
    results = engine.score(convs)
    assert engine.graphs.eager == 1 and sum(engine.graphs.replays.values()) >= 1
    assert "gpu_memory_utilization" in results[-1].error
    assert_rule(results[:-1], plain_path(path, "bfloat16").score(convs[:-1]), reference(path).score(convs[:-1]),
                torch.bfloat16, "over the budget")


def test_8b_layer_shape(tmp_path, rng):
    """One decoder layer of exactly Llama-3.1-8B's shape (hidden 4096, 32 query / 8 KV heads of 128,
    MLP 14336), bf16 weights, the default configuration: shared prompts through the graphs."""
    from rmserve.engine import EngineConfig, load_tokenizer
    from rmserve.loader import load_model
    from rmserve.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(str(tmp_path / "armorm"), "armorm", hidden=4096, heads=32, kv_heads=8,
                                 intermediate=14336, layers=1, dtype=torch.bfloat16, gating_hidden_dim=1024)
    model, tok = load_model(path, device=torch.device("cuda"), dtype=torch.bfloat16), load_tokenizer(path)
    engine = Engine(model, tok, EngineConfig(max_batch_tokens=512))
    plain = Engine(model, tok, EngineConfig(max_batch_tokens=512, share_prefix=False, enforce_eager=True))
    assert engine.attention == plain.attention and engine.graphs is not None
    convs = shared_prompts(rng, n_prompts=1)
    poison(engine.graphs)
    got = engine.score(convs)
    assert sum(engine.graphs.replays.values()) > 0
    # the same-dtype path here keeps the engine's kernels: the loaded model holds one choice
    assert_rule(got, plain.score(convs), reference(path).score(convs), torch.bfloat16, "8B layer shape")


def test_score_stream_default_settings(tiny_model, rng):
    """score_stream with the default settings (shared prompts in each window, identical samples
    merged, graphs), a small budget: every index once, errors in place, the reference's scores."""
    path = tiny_model("armorm")
    engine = Engine.from_pretrained(path, dtype="bfloat16", device="cuda", max_batch_tokens=1024)
    convs = shared_prompts(rng, n_prompts=4)
    convs += [convs[0], convs[-1], []]
    poison(engine.graphs)
    got = dict(engine.score_stream(iter(convs)))
    assert sorted(got) == list(range(len(convs))) and got[len(convs) - 1].error == "empty conversation"
    assert sum(engine.graphs.replays.values()) > 0
    assert got[len(convs) - 3] == got[0] and got[len(convs) - 3] is not got[0]   # a repeat: an equal copy
    scored = convs[:-1]
    assert_rule([got[i] for i in range(len(scored))], plain_path(path, "bfloat16").score(scored),
                reference(path).score(scored), torch.bfloat16, "score_stream")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_engine_on_the_last_device(tiny_model, rng):
    """cuda:N, N > 0: the memory plan, captures, replays, the pipeline and sampling run there, and
    the caller's current device is left as it was."""
    last = torch.device("cuda", torch.cuda.device_count() - 1)
    path = tiny_model("urm")
    before = torch.cuda.current_device()
    engine = Engine.from_pretrained(path, dtype="bfloat16", device=str(last), max_batch_tokens=512)
    assert engine.device == last and engine.graphs.inputs.tokens.device == last
    convs = shared_prompts(rng)
    poison(engine.graphs)
    got = engine.score(convs, samples=4, seed=3)
    streamed = dict(engine.score_stream(convs))
    assert torch.cuda.current_device() == before
    assert sum(engine.graphs.replays.values()) > 0 and all(len(r.score_samples) == 4 for r in got)
    ref = reference(path).score(convs)
    plain = plain_path(path, "bfloat16", device=str(last)).score(convs)
    assert_rule(got, plain, ref, torch.bfloat16, "last device")
    assert_rule([streamed[i] for i in range(len(convs))], plain, ref, torch.bfloat16, "last device, stream")
