"""The CUDA-graph runner's logic on CPU: the bucket ladder and its cost model, bucket choice,
static-buffer filling for plain and shared-prompt batches (padding never changes a real result),
replay bookkeeping, the padding bound, and the default configuration's shared batches replaying
(prepare_cuda with the stand-in capture), and the memory plan. The capture mechanism is the one
part replaced: `Recorder` re-executes the recorded forward into the same output tensors, as a
graph replay writes into its static outputs. The real CUDA graphs are tested in tests/gpu/."""
import pytest
import torch

from rmserve import Engine
from rmserve.cuda_graphs import (Bucket, GraphRunner, StaticInputs, bucket_ladder, choose_bucket, flops_per_token,
                                 graph_token_limit, launch_tokens, token_rungs)
from rmserve.inputs import Encoded
from rmserve.memory import GRANULARITY, budget_from_memory, longest_sample, probe_batch
from rmserve.packing import pack

from .helpers import FAMILIES, random_conversation

# fp32 on CPU. Padding rows change the row count of every matmul, and the CPU GEMM's blocking
# (hence its summation order) depends on it: about 1e-6 here, 1e-5 is the exactness tests' bar.
# So does the head's row count (padding slots). Zero-length sequences leave the hidden states
# bitwise unchanged, and the padding rows' contents change nothing at all (compared exactly).
RTOL, ATOL = 1e-5, 1e-5


class Recorder:
    """Stand-in for CudaGraphCapture: record runs fn once and keeps its outputs; replay runs fn
    again on the current input buffers and writes into those same output tensors."""

    def __init__(self):
        self.recorded: list = []   # (fn, outputs) per record, in order
        self.replayed = 0

    def record(self, fn):
        out = fn()
        self.recorded.append((fn, out))
        return len(self.recorded) - 1, out

    def replay(self, handle):
        self.replayed += 1
        fn, outputs = self.recorded[handle]
        for key, value in fn().items():
            outputs[key].copy_(value)


def runner_for(engine, buckets):
    recorder = Recorder()
    runner = GraphRunner(engine.forward_eager, buckets, engine.model.head.needs_gate, torch.device("cpu"), recorder,
                         engine.model_forward.step_outputs)
    return runner, recorder


def random_batch(rng, needs_gate, max_len=60, max_seqs=6, vocab=300):
    lens = [rng.randint(1, max_len) for _ in range(rng.randint(1, max_seqs))]
    seqs = [[rng.randrange(vocab) for _ in range(n)] for n in lens]
    return pack(seqs, [rng.randrange(n) for n in lens] if needs_gate else None)


def assert_rows_equal(got, want, exact):
    assert set(got) == set(want)
    for key in want:
        rows = got[key][:want[key].shape[0]]
        if exact:
            assert torch.equal(rows, want[key]), key
        else:
            torch.testing.assert_close(rows, want[key], rtol=RTOL, atol=ATOL)


def test_token_rungs():
    rungs = token_rungs(256, 16384)
    assert rungs[:9] == [256, 320, 384, 448, 512, 640, 768, 896, 1024] and rungs[-1] == 16384
    assert all(b <= 1.25 * a for a, b in zip(rungs, rungs[1:]))          # the padding bound's premise
    assert all(t % 64 == 0 for t in rungs)
    assert token_rungs(256, 3000)[-2:] == [2560, 3000] and token_rungs(100, 100) == [100]


def test_bucket_ladder():
    ladder = bucket_ladder(16384, 131072)
    assert sorted({b.tokens for b in ladder}) == token_rungs(256, 16384)
    for b in ladder:
        assert b.max_seqlen <= b.tokens and b.seqs == min(b.tokens, 16 * b.tokens // b.max_seqlen)
        assert b.keys == 0 and b.max_seqlen_k == 0
    assert {b.max_seqlen for b in ladder if b.tokens == 1024} == {128, 256, 512, 1024}
    assert {b.max_seqlen for b in ladder if b.tokens == 640} == {128, 256, 512, 640}
    # a budget that is not a rung is the top rung; max_length and max_seqs cap L and S
    capped = bucket_ladder(3000, 700, max_seqs=10)
    assert max(b.tokens for b in capped) == 3000
    assert max(b.max_seqlen for b in capped) == 700 and max(b.seqs for b in capped) == 10
    assert bucket_ladder(100, 8192) == [Bucket(100, 100, 16)]
    # the shared-prompt layout: K = 4T key rows, Lk = min(K, max_length)
    keyed = bucket_ladder(2048, 3000, key_factor=4)
    assert all(b.keys == 4 * b.tokens and b.max_seqlen_k == min(b.keys, 3000) for b in keyed)
    # max_seqs samples of a shared batch are up to 2 * max_seqs segments (a prompt per group)
    assert max(b.seqs for b in bucket_ladder(2048, 3000, max_seqs=10, key_factor=4)) == 20
    with pytest.raises(ValueError):
        bucket_ladder(0, 8192)


def test_choose_bucket(rng):
    ladder = bucket_ladder(4096, 8192, key_factor=4)
    for _ in range(300):
        t, s, length = rng.randint(1, 4096), rng.randint(1, 40), rng.randint(1, 4096)
        keys = rng.choice([None, rng.randint(t, 6 * t)])
        lk = None if keys is None else rng.randint(length, max(length, min(keys, 8192)))
        b = choose_bucket(ladder, t, s, length, keys, lk)
        fits = [c for c in ladder if c.tokens >= t and c.seqs >= s and c.max_seqlen >= length
                and (keys is None or (c.keys >= keys and c.max_seqlen_k >= lk))]
        if not fits:
            assert b is None
            continue
        assert b == min(fits)   # fewest tokens, then shortest L
    assert choose_bucket(ladder, 4097, 1, 1) is None
    assert choose_bucket(ladder, 300, 1, 300) == Bucket(320, 320, 16, 1280, 1280)
    assert choose_bucket(ladder, 300, 1, 300, keys=1500, max_seqlen_k=900) == Bucket(384, 384, 16, 1536, 1536)
    # a shared batch has no bucket in a ladder without a key side
    assert choose_bucket(bucket_ladder(4096, 8192), 300, 2, 200, keys=400, max_seqlen_k=300) is None


def test_graph_token_limit(tiny_model):
    """The launch cost model (cuda_graphs docstring): the 8B's ladder stops at 6,144 tokens, where its
    360 launches (the compute of ~103 tokens) are under 2% of a batch; a tiny model's never does."""
    from rmserve import shapes
    from rmserve.config import spec_from_dict

    llama8b = spec_from_dict(shapes.config(shapes.BACKBONES["llama-3.1-8b"], "bt"))
    assert flops_per_token(llama8b) == pytest.approx(13.96e9, rel=1e-3)
    assert launch_tokens(llama8b) == pytest.approx(103.2, abs=0.1)
    assert graph_token_limit(llama8b) == 6144
    assert len(bucket_ladder(6144, 131072, key_factor=4)) == 88
    from rmserve.config import load_spec

    assert graph_token_limit(load_spec(tiny_model("bt"))) > 1 << 20


@pytest.mark.parametrize("family", ["bt", "qrm"])
def test_padding_does_not_change_results(tiny_model, family, rng):
    engine = Engine.from_pretrained(tiny_model(family), dtype="float32", device="cpu")
    needs_gate = engine.model.head.needs_gate
    static = StaticInputs(1024, 64, needs_gate, torch.device("cpu"))
    for _ in range(4):
        batch = random_batch(rng, needs_gate)
        want = engine.forward_eager(batch)
        t, s = batch.num_tokens, batch.num_seqs
        # zero-length sequences and spare slots only (same token rows): the backbone's hidden states
        # are bitwise the same; the head sees more rows (padding slots), see RTOL
        hidden = engine.model.backbone(batch)
        for b in (Bucket(t, batch.max_seqlen, s + 5), Bucket(t, 1024, 64)):
            static.fill(b, batch)
            assert static.cu_seqlens[s + 1:b.seqs + 1].eq(t).all() and static.last_idx[s:b.seqs].eq(0).all()
            assert torch.equal(engine.model.backbone(static.view(b)), hidden)
            assert_rows_equal(engine.forward_eager(static.view(b)), want, exact=False)
        # padding token rows: the GEMMs see more rows (see RTOL), and what those rows hold is irrelevant
        b = Bucket(1024, 128, 16)
        static.fill(b, batch)
        assert static.tokens[t:].eq(0).all() and static.positions[t:].eq(0).all()
        padded = engine.forward_eager(static.view(b))
        assert_rows_equal(padded, want, exact=False)
        static.tokens[t:] = torch.randint(0, 300, (1024 - t,))
        static.positions[t:] = torch.randint(0, 1000, (1024 - t,))
        assert_rows_equal(engine.forward_eager(static.view(b)), {k: v[:s] for k, v in padded.items()}, exact=True)


def random_shared_batch(rng, needs_gate, vocab=300):
    """A packed batch in prefix.py's layout: a prompt shared by a few answers (one of a single token),
    a second group, and plain samples; gates anywhere (in the prompt or in a member's own tokens)."""
    from rmserve.prefix import find_groups, pack_shared

    def tokens(n):
        return [rng.randrange(vocab) for _ in range(n)]

    seqs = []
    for _ in range(2):
        prompt = tokens(rng.randint(16, 60))
        seqs += [prompt + tokens(rng.randint(1, 30)) for _ in range(rng.randint(2, 4))] + [prompt + tokens(1)]
    seqs += [tokens(rng.randint(1, 50)) for _ in range(2)]
    groups = find_groups(seqs, min_shared=16)
    assert any(g.prefix for g in groups)
    order = [m for g in groups for m in g.members]   # pack_shared's rows follow the groups
    gates = [rng.randrange(len(s)) for s in seqs] if needs_gate else None
    return pack_shared(seqs, gates, groups), order


@pytest.mark.parametrize("family", ["bt", "qrm"])
def test_padding_does_not_change_shared_results(tiny_model, family, rng):
    """The key side: a shared batch in a keyed bucket (empty segments, spare slots, spare kv_idx entries)
    gives bitwise the eager hidden states on its rows, whatever the padding rows and entries hold;
    a plain batch in a keyed bucket (identity kv_idx) gives its eager results."""
    engine = Engine.from_pretrained(tiny_model(family), dtype="float32", device="cpu")
    needs_gate = engine.model.head.needs_gate
    static = StaticInputs(1024, 64, needs_gate, torch.device("cpu"), max_keys=4096)
    for _ in range(3):
        batch, _ = random_shared_batch(rng, needs_gate)
        t, s, k = batch.num_tokens, batch.num_seqs, batch.kv_idx.numel()
        hidden = engine.model.backbone(batch)
        want = engine.forward_eager(batch)
        b = Bucket(t, 1024, s + 7, k + 100, 1024)   # same token rows: no GEMM sees another row count
        static.fill(b, batch)
        assert static.kv_idx[k:b.keys].eq(0).all() and static.cu_seqlens_k[s + 1:b.seqs + 1].eq(k).all()
        assert torch.equal(engine.model.backbone(static.view(b))[:t], hidden)
        static.kv_idx[k:b.keys] = torch.randint(0, t, (100,))
        assert torch.equal(engine.model.backbone(static.view(b))[:t], hidden)
        assert_rows_equal(engine.forward_eager(static.view(b)), want, exact=False)
        b = Bucket(1024, 1024, 64, 4096, 4096)   # padding token rows too
        static.fill(b, batch)
        padded = engine.forward_eager(static.view(b))
        assert_rows_equal(padded, want, exact=False)
        static.tokens[t:] = torch.randint(0, 300, (1024 - t,))
        static.positions[t:] = torch.randint(0, 1000, (1024 - t,))
        static.kv_idx[k:] = torch.randint(0, 1024, (4096 - k,))
        rows = batch.last_idx.numel()
        assert_rows_equal(engine.forward_eager(static.view(b)), {key: v[:rows] for key, v in padded.items()},
                          exact=True)
        plain = random_batch(rng, needs_gate)
        static.fill(b, plain)
        assert static.kv_idx[:plain.num_tokens].tolist() == list(range(plain.num_tokens))
        assert_rows_equal(engine.forward_eager(static.view(b)), engine.forward_eager(plain), exact=False)


def test_runner_replays_the_right_bucket(tiny_model, rng):
    engine = Engine.from_pretrained(tiny_model("armorm"), dtype="float32", device="cpu")
    buckets = bucket_ladder(512, engine.config.max_length, min_tokens=128, min_seqlen=64)
    runner, recorder = runner_for(engine, buckets)
    # one capture per bucket, largest first (the first sizes the shared pool)
    assert len(recorder.recorded) == len(buckets)
    assert list(runner.graphs) == sorted(buckets, reverse=True)
    kept = []
    for _ in range(6):
        batch = random_batch(rng, True, max_len=80, max_seqs=5)
        want = engine.forward_eager(batch)
        expected = choose_bucket(buckets, batch.num_tokens, batch.num_seqs, batch.max_seqlen)
        before = runner.replays[expected]
        got = runner(batch)
        assert runner.replays[expected] == before + 1 and runner.eager == 0
        assert all(v.shape[0] == batch.num_seqs for v in got.values())
        assert_rows_equal(got, want, exact=False)
        kept.append((got, {k: v.clone() for k, v in got.items()}))
    # results are copies: later replays do not overwrite what an earlier call returned
    for got, snapshot in kept:
        assert_rows_equal(got, snapshot, exact=True)
    assert recorder.replayed == 6


def test_runner_falls_back_to_eager(tiny_model, rng):
    engine = Engine.from_pretrained(tiny_model("bt"), dtype="float32", device="cpu")
    buckets = [Bucket(128, 64, 4), Bucket(256, 128, 8)]
    runner, recorder = runner_for(engine, buckets)
    too_many = pack([[rng.randrange(300)] * 3 for _ in range(9)])        # 9 sequences > 8 slots
    too_long = pack([[rng.randrange(300) for _ in range(200)]])         # L 200 > 128
    too_big = pack([[rng.randrange(300) for _ in range(100)]] * 3)      # 300 tokens > 256
    for batch in (too_many, too_long, too_big):
        assert runner.bucket_for(batch) is None
        assert_rows_equal(runner(batch), engine.forward_eager(batch), exact=True)
    assert runner.eager == 3 and recorder.replayed == 0 and not runner.replays


def test_engine_dispatches_through_the_runner(tiny_model, rng):
    """Engine.forward uses the runner when one is installed; scores stay those of the eager path."""
    engine = Engine.from_pretrained(tiny_model("qrm"), dtype="float32", device="cpu", max_batch_tokens=512,
                                    share_prefix=False)
    assert engine.graphs is None   # no CUDA: no graphs
    convs = [random_conversation(rng, max_turns=1, hi=10) for _ in range(9)]
    eager = engine.score(convs)
    engine.graphs, recorder = runner_for(engine, bucket_ladder(512, engine.config.max_length, min_seqlen=64))
    graphed = engine.score(convs)
    assert recorder.replayed > 0 and engine.graphs.eager == 0
    for a, b in zip(graphed, eager):
        torch.testing.assert_close(torch.tensor(a.quantiles), torch.tensor(b.quantiles), rtol=RTOL, atol=ATOL)
        assert a.score == pytest.approx(b.score, rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_batches_replay(tiny_model, family, rng, monkeypatch):
    """The default configuration under (stand-in) graphs: prepare_cuda builds the engine's own ladder
    with the key side, and shared-prompt batches replay it instead of running eagerly, with the
    scores of the eager forward and of the fp32 plain reference. Every family; a 600-token budget
    that splits groups across batches; gates in the prompt and in members' own tokens; one-token
    suffixes; repeated samples (test_prefix.make_samples)."""
    from rmserve import memory
    from rmserve.cuda_graphs import bucket_for, prepare_cuda
    from rmserve.prefix import plan_samples

    from .test_prefix import assert_results_close, make_samples

    path = tiny_model(family)
    engine = Engine.from_pretrained(path, dtype="float32", device="cpu", max_batch_tokens=600)
    plain = Engine.from_pretrained(path, dtype="float32", device="cpu", share_prefix=False)
    monkeypatch.setattr(memory, "cuda_memory_plan", lambda *a, **k: (600, 10_000))
    recorder = Recorder()
    budget, longest, runner = prepare_cuda(engine.model_forward, engine.spec, engine.config, "torch_varlen",
                                           recorder)
    assert (budget, longest) == (600, 10_000) and runner.buckets[-1].tokens == 600
    assert all(b.keys == 4 * b.tokens for b in runner.buckets) and len(recorder.recorded) == len(runner.buckets)
    samples, keys = make_samples(engine, rng)
    want = plain.score(samples)
    eager = engine.score(samples, groups=keys)
    engine.graphs = runner
    encoded = list(enumerate(engine.encode(samples)))
    for hints in (keys, None):
        planned = plan_samples(encoded, hints, engine.limits())
        packed = [p.pack(runner.needs_gate) for p in planned]
        fits = [bucket_for(runner.buckets, b) is not None for b in packed]
        # Shared or not, every batch replays unless it gathers more than 4x its tokens in keys (one
        # prompt with many short answers: sharing saved it over 3x; ~0.3% of this data's batches)
        assert all(f or b.kv_idx.numel() > 4 * b.num_tokens for f, b in zip(fits, packed))
        assert sum(f for f, p in zip(fits, planned) if p.shared) >= 1
        replayed, eager_batches = recorder.replayed, runner.eager
        got = engine.score(samples, groups=hints)
        assert recorder.replayed - replayed == sum(fits) and runner.eager - eager_batches == fits.count(False)
        assert_results_close(got, want, f"{family} graphs vs plain")
        if hints is keys:
            assert_results_close(got, eager, f"{family} graphs vs eager")


def synthetic_workload(rng, prompts=300):
    """Token-id samples in arrival order: prompts of lognormal length (median 100) with 1, 2 or 4
    answers each (median 150 tokens), as pairs and best-of-N arrive; ids distinct enough that only
    the designed prompts are shared."""
    samples, keys = [], []
    for p in range(prompts):
        prompt = [rng.randrange(1000, 100_000) for _ in range(min(2000, max(4, int(rng.lognormvariate(4.6, 0.8)))))]
        for _ in range(rng.choice([1, 2, 4])):
            answer = [rng.randrange(1000, 100_000) for _ in range(min(1500, max(1, int(rng.lognormvariate(5.0, 0.9)))))]
            samples.append(Encoded(tuple(prompt + answer)))
            keys.append(p)
    return samples, keys


def test_padding_bound(rng):
    """The ladder's promise (cuda_graphs docstring) on a synthetic workload planned by the engine's own
    planner, served (1..64 arrivals a batch) and offline (parts with group keys), sharing on and off:
    a batch of t >= 256 tokens up to the top rung, whose longest segment is at most 8x its mean
    segment (the mean at least 8) and whose keys are at most 4t, replays a bucket of fewer than
    1.25t rows; a larger batch runs eagerly; and the padding rows are under 10% of all rows."""
    from rmserve.cuda_graphs import bucket_for
    from rmserve.prefix import Limits, plan_samples

    samples, keys = synthetic_workload(rng)
    checked = in_range = 0
    for share in (True, False):
        limits = Limits(max_tokens=16384, share=share)
        plans = []
        at = 0
        while at < len(samples):   # served
            n = rng.randint(1, 64)
            plans += plan_samples(list(enumerate(samples[at:at + n])), None, limits)
            at += n
        for start in range(0, len(samples), 512):   # offline parts
            part = samples[start:start + 512]
            plans += plan_samples(list(enumerate(part)), keys[start:start + 512], limits)
        for top in (16384, 6144):   # a small model's ladder, the 8B's
            ladder = bucket_ladder(top, 131072, key_factor=4 if share else 0)
            real = padded = 0
            for planned in plans:
                batch = planned.pack(needs_gate=False)
                t, n = batch.num_tokens, batch.num_seqs
                lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
                keys_ = t if batch.kv_idx is None else batch.kv_idx.numel()
                b = bucket_for(ladder, batch)
                real += t
                padded += t if b is None else b.tokens
                if t > top:
                    assert b is None
                elif t >= 256:
                    in_range += 1
                    if max(lengths) <= 8 * t / n and t >= 8 * n and keys_ <= 4 * t:
                        assert b is not None and b.tokens < 1.25 * t, (t, n, max(lengths), keys_, b)
                        checked += 1
            assert 1 - real / padded < 0.10, (share, top, 1 - real / padded)
    assert checked > 0.8 * in_range   # the promise's premises hold for most batches: the test checks something


def test_longest_sample():
    """What one eager forward may hold: all usable memory without graphs; with graphs, what the
    pool's top-rung forward leaves (never less than the budget)."""
    kib = 2**10
    fit = 16384   # 1 GiB at 64 KiB a token
    unbounded = 1 << 30   # a small model's ladder goes up to the budget
    budget = budget_from_memory(2**30, 64 * kib, cap=1 << 20, graph_tokens=unbounded)
    assert budget == fit // 2 and longest_sample(2**30, 64 * kib, budget, unbounded) == fit - budget
    assert longest_sample(2**30, 64 * kib, 4096) == fit                                # no graphs
    assert longest_sample(2**30, 64 * kib, 4096, unbounded) == fit - 4096               # pool of the budget
    budget = budget_from_memory(2**30, 64 * kib, cap=1 << 20, graph_tokens=6144)        # the 8B's ladder top
    assert budget == fit - 6144 and longest_sample(2**30, 64 * kib, budget, 6144) == fit - 6144


def test_budget_from_memory():
    kib = 1024
    # 1 GiB free, 64 KiB a token: 16384 tokens fit once; beside a pool of g tokens, 16384 - g
    # while that leaves the pool its g, else half (a pool as large as the budget)
    assert budget_from_memory(2**30, 64 * kib, cap=1 << 20) == 16384
    assert budget_from_memory(2**30, 64 * kib, cap=1 << 20, graph_tokens=1 << 30) == 8192
    assert budget_from_memory(2**30, 64 * kib, cap=1 << 20, graph_tokens=2048) == 14336
    assert budget_from_memory(2**30, 64 * kib, cap=1 << 20, graph_tokens=10000) == 8192
    assert budget_from_memory(2**30, 64 * kib, cap=4096) == 4096                   # the cap wins
    assert budget_from_memory(2**30, 100 * kib, cap=1 << 20) % GRANULARITY == 0    # rounded down
    assert budget_from_memory(2**30, 100 * kib, cap=1 << 20) == 10240
    with pytest.raises(RuntimeError, match="not enough GPU memory"):
        budget_from_memory(10 * 2**20, 64 * kib, cap=16384)
    with pytest.raises(ValueError):
        budget_from_memory(2**30, 0, cap=16384)


def test_probe_batch():
    b = probe_batch(1100, 512, True, torch.device("cpu"))
    assert b.num_tokens == 1100 and b.cu_seqlens.tolist() == [0, 512, 1024, 1100] and b.gate_idx is not None
    assert b.kv_idx is None
    # the shared-prompt layout's worst case: 4 key rows a token, each sequence's own rows
    k = probe_batch(1100, 512, False, torch.device("cpu"), key_factor=4)
    assert k.kv_idx.numel() == 4400 and k.cu_seqlens_k.tolist() == [0, 2048, 4096, 4400]
    assert k.max_seqlen_k == 2048 and k.kv_idx[2048:2048 + 512].tolist() == list(range(512, 1024))
