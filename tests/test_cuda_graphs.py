"""The CUDA-graph runner's logic on CPU: the bucket ladder, bucket choice, static-buffer filling
(padding never changes a real result) and replay bookkeeping. The capture mechanism is the one
part replaced: `Recorder` re-executes the recorded forward into the same output tensors, as a
graph replay writes into its static outputs. The real CUDA graphs are tested in tests/gpu/."""
import pytest
import torch

from rmserve import Engine
from rmserve.cuda_graphs import Bucket, GraphRunner, StaticInputs, bucket_ladder, choose_bucket
from rmserve.memory import GRANULARITY, budget_from_memory, longest_sample, probe_batch
from rmserve.packing import pack

from .helpers import random_conversation

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
    runner = GraphRunner(engine.forward_eager, buckets, engine.model.head.needs_gate, torch.device("cpu"), recorder)
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


def test_bucket_ladder():
    ladder = bucket_ladder(16384, 131072)
    assert sorted({b.tokens for b in ladder}) == [256, 512, 1024, 2048, 4096, 8192, 16384]
    for b in ladder:
        assert b.max_seqlen <= b.tokens and b.seqs == min(b.tokens, 4 * b.tokens // b.max_seqlen)
    assert {b.max_seqlen for b in ladder if b.tokens == 1024} == {128, 256, 512, 1024}
    # a budget that is not a power of two is the top rung; max_length and max_seqs cap L and S
    capped = bucket_ladder(3000, 700, max_seqs=10)
    assert max(b.tokens for b in capped) == 3000
    assert max(b.max_seqlen for b in capped) == 700 and max(b.seqs for b in capped) == 10
    assert bucket_ladder(100, 8192) == [Bucket(100, 100, 4)]
    with pytest.raises(ValueError):
        bucket_ladder(0, 8192)


def test_choose_bucket(rng):
    ladder = bucket_ladder(4096, 8192)
    for _ in range(300):
        t, s, length = rng.randint(1, 4096), rng.randint(1, 40), rng.randint(1, 4096)
        b = choose_bucket(ladder, t, s, length)
        fits = [c for c in ladder if c.tokens >= t and c.seqs >= s and c.max_seqlen >= length]
        if not fits:
            assert b is None
            continue
        assert b == min(fits)   # fewest tokens, then shortest L
    assert choose_bucket(ladder, 4097, 1, 1) is None
    assert choose_bucket(ladder, 300, 1, 300) == Bucket(512, 512, 4)


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


def test_longest_sample():
    """What one eager forward may hold: all usable memory without graphs; with graphs, what the
    pool's budget-sized forward leaves (never less than the budget, as two copies fit)."""
    kib = 2**10
    budget = budget_from_memory(2**30, 64 * kib, cap=1 << 20, copies=2)
    assert longest_sample(2**30, 64 * kib, budget, graphs=True) == 16384 - 8192
    assert longest_sample(2**30, 64 * kib, 4096, graphs=False) == 16384
    assert longest_sample(2**30, 64 * kib, budget_from_memory(2**30, 64 * kib, cap=4096, copies=2),
                          graphs=True) == 16384 - 4096


def test_budget_from_memory():
    kib = 1024
    # 1 GiB free, 64 KiB a token: 16384 tokens fit once, 8192 twice
    assert budget_from_memory(2**30, 64 * kib, cap=1 << 20) == 16384
    assert budget_from_memory(2**30, 64 * kib, cap=1 << 20, copies=2) == 8192
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
