"""AsyncEngine: concurrent callers get exactly their own results; queue bound, cancellation, shutdown."""
import asyncio
import random
import threading
import time

import pytest

from rmserve import Engine
from rmserve.async_engine import (AsyncEngine, BatchingConfig, EngineClosed, Overloaded, RequestTooLarge,
                                  SyncEngine)
from rmserve.results import OUTPUT_FIELDS

from .helpers import random_conversation

# fp32 on CPU. Not bitwise: MKL's sgemm picks its kernel by the number of rows, so a sample's
# values depend on the batch it lands in, in the last bits (measured: at most 2e-6 absolute over
# 600 samples of every family, alone vs. in batches). The same bar as tests/test_exact.py; a
# mix-up between callers moves scores by ~1e-1.
RTOL, ATOL = 1e-5, 1e-5


def assert_same(got, want, what=""):
    """got/want: ScoreResult or dicts of their fields."""
    g = got if isinstance(got, dict) else got.to_dict()
    w = want if isinstance(want, dict) else want.to_dict()
    g.pop("names", None), w.pop("names", None)
    if "error" in w:   # the error text, and no outputs
        assert g.get("error") == w["error"] and set(g) - {"num_tokens"} == {"error"}, f"{what}: {g} != {w}"
        return
    assert set(g) == set(w), f"{what}: fields {sorted(g)} != {sorted(w)}"
    assert g["num_tokens"] == w["num_tokens"], what
    for key in ("score",) + OUTPUT_FIELDS:
        if key in w:
            assert _close(g[key], w[key]), f"{what}: {key} {g[key]} != {w[key]}"


def _close(a, b) -> bool:
    if isinstance(b, list):
        return isinstance(a, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return abs(a - b) <= ATOL + RTOL * abs(b)


def alone(engine, calls):
    """The reference: engine.score(call) for each call on its own."""
    return [engine.score(c) for c in calls]


def bad_conversation(rng):
    """Not scoreable (per-sample error): the last turn is the user's, or no user turn before the answer."""
    return rng.choice([[{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "only me"}], []])


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from rmserve.tiny import write_tiny_checkpoint

    cache = {}

    def get(family):
        if family not in cache:
            path = write_tiny_checkpoint(str(tmp_path_factory.mktemp(family)), family)
            cache[family] = Engine.from_pretrained(path, dtype="float32", device="cpu", max_batch_tokens=1024)
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["qrm", "urm"])
def test_concurrent_calls_get_their_own_results(engines, family, rng):
    engine = engines(family)
    calls = []
    for _ in range(100):
        convs = [random_conversation(rng, hi=rng.choice([5, 40])) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.1:
            convs.insert(rng.randrange(len(convs) + 1), bad_conversation(rng))
        calls.append(convs)
    stats = []

    async def main():
        ae = AsyncEngine(engine, BatchingConfig(max_wait_ms=5), on_batch=stats.append)
        out = await asyncio.gather(*(ae.score(c) for c in calls))
        assert ae.pending_samples == 0 and ae.queued_samples == 0
        await ae.close()
        return out

    out = asyncio.run(main())
    for n, (convs, results, want_all) in enumerate(zip(calls, out, alone(engine, calls))):
        assert len(results) == len(convs)
        for i, (got, want) in enumerate(zip(results, want_all)):
            assert_same(got, want, f"call {n} sample {i}")
    # Batching really mixed callers, within the budget (a sample over the budget would run alone).
    assert max(s.calls for s in stats) > 1
    assert all(s.tokens <= 1024 for s in stats)
    good = sum(1 for results in out for r in results if r.ok)
    assert sum(s.samples for s in stats) == good


def test_per_sample_errors_and_texts(engines, rng):
    engine = engines("armorm")
    convs = [random_conversation(rng), [{"role": "user", "content": "no answer"}], random_conversation(rng)]
    texts = [engine.preprocessor.render(c) for c in (convs[0], convs[2])] + ["no gating pattern here"]

    async def main():
        ae = AsyncEngine(engine)
        out = await asyncio.gather(ae.score(convs), ae.score_texts(texts), ae.score([]))
        await ae.close()
        return out

    scored, from_texts, empty = asyncio.run(main())
    alone = engine.score(convs)
    for got, want in zip(scored, alone):
        assert_same(got, want)
    assert "last message must be the assistant" in scored[1].error
    assert_same(from_texts[0], alone[0])
    assert_same(from_texts[1], alone[2])
    assert "gating pattern" in from_texts[2].error
    assert empty == []


@pytest.mark.parametrize("family", ["urm", "qrm"])
def test_samples_as_the_engine_draws_them(engines, family, rng):
    engine = engines(family)
    calls = [([random_conversation(rng) for _ in range(rng.randint(1, 3))], rng.choice([0, 3, 8]), rng.randrange(99))
             for _ in range(12)]

    async def main():
        ae = AsyncEngine(engine, BatchingConfig(max_wait_ms=5))
        out = await asyncio.gather(*(ae.score(c, samples=k, seed=s) for c, k, s in calls))
        with pytest.raises(ValueError):
            await ae.score(calls[0][0], samples=-1)
        await ae.close()
        return out

    out = asyncio.run(main())
    for (convs, k, seed), results in zip(calls, out):
        for got, want in zip(results, engine.score(convs, samples=k, seed=seed)):
            assert_same(got, want)
            assert len(got.score_samples or ()) == k


def test_model_failure_fails_only_that_sample(engines, rng):
    """A pre-tokenized sample with a token id past the vocabulary makes the model raise (a real
    failure, not an injected one): the batch is retried sample by sample, so only that sample fails."""
    engine = Engine.from_pretrained(engines("bt").model.path, dtype="float32", device="cpu", max_batch_tokens=1024)
    vocab = engine.spec.vocab_size
    engine.preprocessor.vocab_size = None   # let the out-of-vocabulary id reach the model (normally refused)
    good = [[random_conversation(rng, hi=5)] for _ in range(5)]
    stats = []

    async def main():
        ae = AsyncEngine(engine, BatchingConfig(max_wait_ms=30_000, max_batch_seqs=6), on_batch=stats.append)
        out = await asyncio.gather(ae.score([[1, 2, vocab + 5]]), *(ae.score(c) for c in good))
        await ae.close()
        return out

    bad, *rest = asyncio.run(main())
    assert bad[0].error.startswith("scoring failed:")
    for convs, results in zip(good, rest):
        assert_same(results[0], engine.score(convs)[0])
    assert stats[0].samples == 6 and stats[0].failed == 1


def test_overload_is_refused_at_once_and_recovers(engines, rng):
    engine = engines("bt")
    calls = [[random_conversation(rng) for _ in range(2)] for _ in range(40)]

    async def main():
        ae = AsyncEngine(engine, BatchingConfig(max_pending=6, max_wait_ms=1))
        with pytest.raises(RequestTooLarge):
            await ae.score([random_conversation(rng) for _ in range(7)])
        start = time.perf_counter()
        out = await asyncio.gather(*(ae.score(c) for c in calls), return_exceptions=True)
        elapsed = time.perf_counter() - start
        assert ae.pending_samples == 0
        after = await ae.score(calls[0])
        await ae.close()
        return out, after, elapsed

    out, after, elapsed = asyncio.run(main())
    refused = [o for o in out if isinstance(o, Overloaded)]
    served = [(c, o) for c, o in zip(calls, out) if isinstance(o, list)]
    assert len(refused) + len(served) == len(calls)
    # All 40 calls arrive before any is tokenized: the first 3 fill the queue, the rest are refused.
    assert len(served) == 3 and len(refused) == 37
    for convs, results in served:
        for got, want in zip(results, engine.score(convs)):
            assert_same(got, want)
    assert_same(after[0], engine.score(calls[0])[0])
    assert elapsed < 10


def test_cancelled_call_leaves_the_queue(engines, rng):
    engine = engines("grm")
    a = [random_conversation(rng) for _ in range(3)]
    b = [random_conversation(rng) for _ in range(2)]

    async def main():
        # A long max_wait and a large budget: calls sit in the queue until something happens.
        ae = AsyncEngine(engine, BatchingConfig(max_wait_ms=60_000, max_batch_tokens=10 ** 6))
        ta, tb = asyncio.create_task(ae.score(a)), asyncio.create_task(ae.score(b))
        while ae.queued_samples < 5:
            await asyncio.sleep(0.01)
        ta.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ta
        assert ae.queued_samples == 2 and ae.pending_samples == 2
        await ae.close()          # drains: b is scored without waiting out max_wait
        return await tb

    results = asyncio.run(asyncio.wait_for(main(), 30))
    for got, want in zip(results, engine.score(b)):
        assert_same(got, want)


def test_close_without_drain_fails_every_pending_call(engines, rng):
    engine = engines("grm")

    async def main():
        ae = AsyncEngine(engine, BatchingConfig(max_wait_ms=60_000, max_batch_tokens=10 ** 6))
        tasks = [asyncio.create_task(ae.score([random_conversation(rng)])) for _ in range(5)]
        while ae.queued_samples < 5:
            await asyncio.sleep(0.01)
        await ae.close(drain=False)
        out = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(EngineClosed):
            await ae.score([random_conversation(rng)])
        return out, ae.pending_samples

    out, pending = asyncio.run(asyncio.wait_for(main(), 30))
    assert all(isinstance(o, EngineClosed) for o in out) and pending == 0


def test_close_drains_every_admitted_call(engines, rng):
    engine = engines("urm")
    calls = [[random_conversation(rng)] for _ in range(30)]

    async def main():
        ae = AsyncEngine(engine, BatchingConfig(max_wait_ms=50))
        tasks = [asyncio.create_task(ae.score(c)) for c in calls]
        await asyncio.sleep(0)    # every call admitted; most still tokenizing
        await ae.close(drain=True)
        return await asyncio.gather(*tasks)

    out = asyncio.run(asyncio.wait_for(main(), 60))
    for results, want in zip(out, alone(engine, calls)):
        assert_same(results[0], want[0])


def test_sync_engine_from_many_threads(engines, rng):
    engine = engines("armorm")
    calls = [[random_conversation(rng) for _ in range(rng.randint(1, 3))] for _ in range(48)]
    out = [None] * len(calls)
    with SyncEngine(engine, BatchingConfig(max_wait_ms=5)) as sync:
        def work(k):
            for i in range(k, len(calls), 6):
                out[i] = sync.score(calls[i], timeout=60)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for results, want_all in zip(out, alone(engine, calls)):
        for got, want in zip(results, want_all):
            assert_same(got, want)
    with pytest.raises(EngineClosed):
        sync.score(calls[0])


def test_event_loop_stays_responsive(tmp_path, rng):
    """Tokenization and the model run off the event loop: a ticker keeps ticking meanwhile."""
    from rmserve.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(str(tmp_path), "bt", hidden=256, intermediate=768, layers=4)
    # One batch for everything: run on the loop, it would stall the loop for nearly all the time.
    engine = Engine.from_pretrained(path, dtype="float32", device="cpu", max_batch_tokens=10 ** 6)
    # ~2 s of scoring on one torch thread: run on the loop, one batch would stall it nearly all the time
    convs = [random_conversation(random.Random(i), max_turns=4, hi=100) for i in range(8)]

    async def main():
        ae = AsyncEngine(engine)
        gaps, done = [], False

        async def ticker():
            last = time.perf_counter()
            while not done:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        t = asyncio.create_task(ticker())
        start = time.perf_counter()
        await ae.score(convs)
        elapsed = time.perf_counter() - start
        done = True
        await t
        await ae.close()
        return elapsed, max(gaps)

    elapsed, worst_gap = asyncio.run(main())
    assert elapsed > 0.1, "workload too small to show anything"
    assert worst_gap < elapsed / 4, f"event loop stalled {worst_gap:.3f} s during {elapsed:.2f} s of scoring"
