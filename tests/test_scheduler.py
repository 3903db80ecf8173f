"""The stream scheduler: budgets respected, every sample exactly once, bounded look-ahead,
similar lengths together; and Engine.score_stream over it: every input back once with its
index, the same scores as Engine.score, errors in place."""
import itertools

import pytest
import torch

from rmserve import Engine
from rmserve.packing import plan_batches
from rmserve.scheduler import stream_batches, stream_plans

from .helpers import random_conversation, random_text


def random_lengths(rng, n):
    # a long-tailed mix like real data, plus samples longer than the budget
    return [min(int(rng.lognormvariate(5.0, 0.8)) + 1, 3000) for _ in range(n)]


@pytest.mark.parametrize("lookahead", [1, 7, 64, 10_000])
@pytest.mark.parametrize("max_seqs", [None, 5])
def test_budget_and_exactly_once(rng, lookahead, max_seqs):
    for _ in range(5):
        lengths = random_lengths(rng, rng.randint(0, 400))
        budget = rng.choice([256, 1000, 2048])
        batches = list(stream_batches(iter(range(len(lengths))), lengths.__getitem__, budget, max_seqs, lookahead))
        seen = [i for b in batches for i in b]
        assert sorted(seen) == list(range(len(lengths)))            # nothing lost, nothing twice
        for b in batches:
            assert b
            tokens = sum(lengths[i] for i in b)
            assert tokens <= budget or len(b) == 1                  # only a lone long sample exceeds it
            assert max_seqs is None or len(b) <= max_seqs


def test_lookahead_bounds_memory_and_waiting(rng):
    """Samples are pulled lazily: while a batch is out, at most lookahead + one batch are held,
    and no sample is emitted more than two windows after it was read."""
    lengths = random_lengths(rng, 3000)
    lookahead, budget = 50, 2048
    read = []

    def source():
        for i in range(len(lengths)):
            read.append(i)
            yield i

    emitted = 0
    for batch in stream_batches(source(), lengths.__getitem__, budget, None, lookahead):
        emitted += len(batch)
        assert len(read) - emitted <= lookahead + budget          # held samples (each >= 1 token)
        for i in batch:
            assert len(read) - i <= 2 * lookahead + 1
    assert emitted == len(lengths)


def test_window_is_sorted_like_plan_batches(rng):
    """With the look-ahead covering the stream, batches are exactly plan_batches' (longest first)."""
    lengths = random_lengths(rng, 300)
    got = list(stream_batches(range(300), lengths.__getitem__, 2048, None, lookahead=300))
    assert got == plan_batches(lengths, 2048)


def test_bad_settings():
    with pytest.raises(ValueError):
        list(stream_batches([1], lambda s: 1, 0))
    with pytest.raises(ValueError):
        list(stream_batches([1], lambda s: 1, 10, lookahead=0))


@pytest.mark.parametrize("threads", [1, 2])
def test_score_stream_matches_score(tiny_model, rng, threads):
    engine = Engine.from_pretrained(tiny_model("armorm"), dtype="float32", device="cpu", max_batch_tokens=300,
                                    lookahead=9, tokenizer_threads=threads, share_prefix=False)
    convs = [random_conversation(rng) for _ in range(45)]
    bad = {3: [], 17: [{"role": "user", "content": "no answer"}], 30: "not a list"}
    for i, conv in bad.items():
        convs[i] = conv
    convs[40] = list(engine.encode([convs[41]])[0].ids)       # pre-tokenized input too
    want = engine.score(convs)
    got = list(engine.score_stream(c for c in convs))          # a generator: read once, lazily
    indices = [i for i, _ in got]
    assert sorted(indices) == list(range(len(convs)))
    results = dict(got)
    for i, (a, b) in enumerate(zip((results[i] for i in range(len(convs))), want)):
        if i in bad:
            assert a.error == b.error and a.error
            continue
        assert a.ok and a.num_tokens == b.num_tokens
        # other batch neighbours than score's: fp32 summation order only
        assert a.score == pytest.approx(b.score, rel=1e-5, abs=1e-5)
        torch.testing.assert_close(torch.tensor(a.gating), torch.tensor(b.gating), rtol=1e-5, atol=1e-5)


def test_score_stream_is_lazy(tiny_model, rng):
    """An endless input: results come while the input is still being read."""
    engine = Engine.from_pretrained(tiny_model("bt"), dtype="float32", device="cpu", max_batch_tokens=400,
                                    lookahead=16, share_prefix=False)
    convs = [random_conversation(rng, max_turns=1, hi=8) for _ in range(8)]
    endless = itertools.cycle(convs)
    got = list(itertools.islice(engine.score_stream(endless), 40))
    assert len({i for i, _ in got}) == 40 and all(r.ok for _, r in got)
    for i, r in got:   # the same conversation scores the same (up to batch neighbours)
        assert r.num_tokens == len(engine.encode([convs[i % 8]])[0])


@pytest.mark.parametrize("family", ["bt", "armorm"])
def test_score_stream_shares_prompts(tiny_model, rng, family):
    """With share_prefix on, score_stream runs prompts common to samples of a window once
    (windows smaller than the stream split some groups); every input comes back once, with
    score's plain values (fp32: summation order only), bad inputs in place."""
    engine = Engine.from_pretrained(tiny_model(family), dtype="float32", device="cpu", max_batch_tokens=400,
                                    lookahead=11, share_min_tokens=4)
    plain = Engine.from_pretrained(tiny_model(family), dtype="float32", device="cpu", share_prefix=False)
    convs = []
    for _ in range(12):   # prompts with 1..5 answers each, then shuffled together
        prompt = random_conversation(rng, max_turns=2, hi=20)[:-1]
        convs += [prompt + [{"role": "assistant", "content": random_text(rng, 1, 12)}]
                  for _ in range(rng.randint(1, 5))]
    rng.shuffle(convs)
    convs.insert(5, [])
    shared_batches = []
    forward = engine.model_forward.forward
    engine.model_forward.forward = lambda batch: (shared_batches.append(batch.kv_idx is not None), forward(batch))[1]
    got = dict(engine.score_stream(iter(convs)))
    assert sorted(got) == list(range(len(convs))) and any(shared_batches)
    assert got[5].error == "empty conversation"
    want = plain.score(convs)
    for i, w in enumerate(want):
        if i == 5:
            continue
        assert got[i].ok and got[i].num_tokens == w.num_tokens
        assert got[i].score == pytest.approx(w.score, rel=1e-5, abs=1e-5)
        if family == "armorm":
            torch.testing.assert_close(torch.tensor(got[i].gating), torch.tensor(w.gating), rtol=1e-5, atol=1e-5)


def test_stream_plans_carries_the_last_batch_once(rng):
    """Any planner: the window's last batch waits for the next window once, then goes."""
    def plan(window):   # batches of 3 in window order, the batch keeps its own samples
        return [(list(range(i, min(i + 3, len(window)))), [window[j] for j in range(i, min(i + 3, len(window)))])
                for i in range(0, len(window), 3)]

    out = list(stream_plans(range(20), plan, lookahead=7))
    assert all(items == extra for items, extra in out)
    assert sorted(i for items, _ in out for i in items) == list(range(20))
    assert [items for items, _ in out] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14],
                                           [15, 16, 17], [18, 19]]


def test_score_stream_merges_identical_samples(tiny_model, rng):
    """score_stream plans each window with score's planner: repeats of a sample within a window run
    once and come back as equal, separate results (a tied pair's margin is exactly 0)."""
    engine = Engine.from_pretrained(tiny_model("armorm"), dtype="float32", device="cpu", max_batch_tokens=300,
                                    lookahead=20)
    convs = [random_conversation(rng, max_turns=2, hi=12) for _ in range(5)]
    stream = [convs[0], convs[1], convs[0], convs[2], convs[3], convs[0], convs[4], convs[1]]
    rows = []
    eager = engine.model_forward.eager
    engine.model_forward.eager = lambda batch: (rows.append(batch.last_idx.numel()), eager(batch))[1]
    got = dict(engine.score_stream(iter(stream)))
    assert sorted(got) == list(range(len(stream))) and sum(rows) == 5
    for a, b in [(0, 2), (0, 5), (1, 7)]:
        assert got[a] == got[b] and got[a].gating is not got[b].gating


def test_score_stream_is_lazy_on_unscorable_inputs(tiny_model):
    """Inputs that cannot be scored count against the look-ahead too: their error results come out
    while the stream is still being read, not held until the stream ends (a file of bad rows is
    read a window at a time, as a file of good ones is)."""
    from rmserve.pipeline import CHUNK

    engine = Engine.from_pretrained(tiny_model("bt"), dtype="float32", device="cpu", lookahead=8)
    pulled = 0

    def bad_rows(n):
        nonlocal pulled
        for _ in range(n):
            pulled += 1
            yield "not a conversation"

    stream = engine.score_stream(bad_rows(1000))
    first = next(stream)
    # the tokenizer reads 2 chunks ahead of the window (pipeline.encode_stream), the window holds 8
    assert pulled <= 3 * CHUNK + 8, pulled
    rest = list(stream)
    assert sorted(i for i, _ in [first, *rest]) == list(range(1000))
    assert all(r.error == "a conversation must be a list of messages, got str" for _, r in [first, *rest])
