"""AsyncEngine: one Engine shared by any number of concurrent callers, with continuous dynamic batching.

    engine = AsyncEngine(Engine.from_pretrained("RLHFlow/ArmoRM-Llama3-8B-v0.1"))
    results = await engine.score(conversations)    # from any number of coroutines at once
    await engine.close()                           # finishes (or fails) everything pending

A call goes through four steps:
1. admission: its samples count against `max_pending` (samples admitted and not yet answered);
   past it the call raises `Overloaded` at once, before any work is done;
2. tokenization on the tokenizer thread (one thread: a Hugging Face tokenizer must not be used
   from two threads at once); a sample that cannot be scored gets its error result here;
3. its good samples join one FIFO queue; the batcher, a task on the event loop, takes samples
   from the front up to the token budget, waiting at most `max_wait_ms` after the oldest sample
   arrived for a fuller batch while the model is idle;
4. the model thread runs the batch (`Engine.score_encoded`), and each sample's result goes back
   to its own call; a call returns when all its samples are back, in its input order (with
   `samples=K` the draws are added then, keyed by seed and token ids as in `Engine.score`).

The event loop only does bookkeeping: tokenization and the model run on their own threads.
`SyncEngine` wraps an AsyncEngine for threads that are not async.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .engine import Engine
from .inputs import Encoded, InputError, check_call
from .results import ScoreResult
from .sampling import add_samples, check_sampling


class Overloaded(RuntimeError):
    """The queue is full: retry later. Nothing of the call was done."""


class EngineClosed(RuntimeError):
    """The AsyncEngine is shutting down or shut down; the call was not (or not fully) scored."""


class RequestTooLarge(ValueError):
    """One call has more samples than the queue can ever hold (`max_pending`); split it."""


@dataclass(frozen=True)
class BatchingConfig:
    """How the AsyncEngine forms batches and bounds its queue."""
    max_wait_ms: float = 2.0             # longest the oldest queued sample waits for a fuller batch
    max_pending: int = 4096              # samples admitted and not yet answered; past it: Overloaded
    max_batch_tokens: int | None = None  # token budget of one batch; None: the engine's
    max_batch_seqs: int | None = None    # samples in one batch; None: the engine's

    def __post_init__(self):
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {self.max_pending}")


@dataclass(frozen=True)
class BatchStats:
    """What one model batch did; given to the `on_batch` callback (metrics)."""
    samples: int
    tokens: int
    seconds: float        # model thread time for the batch
    calls: int            # distinct calls with samples in it
    failed: int = 0       # samples the model raised on (each retried alone first)


@dataclass(eq=False)
class _Call:
    future: asyncio.Future
    results: list[ScoreResult | None]
    remaining: int = 0


@dataclass(eq=False)
class _Item:
    call: _Call
    index: int
    encoded: Encoded
    arrived: float


class AsyncEngine:
    """Many concurrent `await score(...)` calls on one Engine. Bound to the first event loop that uses it."""

    def __init__(self, engine: Engine, config: BatchingConfig = BatchingConfig(),
                 on_batch: Callable[[BatchStats], None] | None = None):
        self.engine = engine
        self.config = config
        self.max_batch_tokens = config.max_batch_tokens or engine.config.max_batch_tokens
        self.max_batch_seqs = config.max_batch_seqs or engine.config.max_batch_seqs
        self.on_batch = on_batch   # called on the event loop after every batch (metrics)
        self._queue: deque[_Item] = deque()
        self._queued_tokens = 0
        self._pending = 0          # samples admitted by calls that have not returned
        self._tokenizing = 0       # calls in the tokenization step
        self._running = 0          # samples in the batch on the model thread
        self._closing = False
        self._drain = True
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rmserve-tokenizer")
        self._model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rmserve-model")

    # ---- state, for metrics and health ----
    @property
    def queued_samples(self) -> int:
        """Samples tokenized and waiting for a batch."""
        return len(self._queue)

    @property
    def pending_samples(self) -> int:
        """Samples admitted and not yet answered (what `max_pending` bounds)."""
        return self._pending

    @property
    def running_samples(self) -> int:
        return self._running

    @property
    def closed(self) -> bool:
        return self._closing

    # ---- the public calls ----
    async def score(self, conversations: Sequence[Any], *, samples: int = 0, seed: int = 0) -> list[ScoreResult]:
        """Message lists (or token-id lists) -> one ScoreResult each, in input order, as
        `Engine.score` gives them. A sample that cannot be scored gets `error` set.
        samples, seed: K draws per sample (URM, QRM), as in `Engine.score`."""
        check_call(conversations)
        return await self._submit(self.engine.encode, conversations, samples, seed)

    async def score_texts(self, texts: Sequence[str], *, samples: int = 0, seed: int = 0) -> list[ScoreResult]:
        """Texts already rendered with the chat template (see Preprocessor.encode_texts)."""
        return await self._submit(self.engine.preprocessor.encode_texts, texts, samples, seed)

    async def score_token_ids(self, samples: Sequence[Sequence[int]]) -> list[ScoreResult]:
        """Token-id samples under the BOS policy (see Preprocessor.encode_token_ids)."""
        return await self._submit(self.engine.preprocessor.encode_token_ids, samples, 0, 0)

    async def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking calls (new ones raise EngineClosed). drain=True scores everything already
        admitted (up to `timeout` seconds, after which the rest fail with EngineClosed);
        drain=False fails every call that is not in the batch now running. Idempotent."""
        if not self._closing:
            self._closing = True
            self._drain = drain
            if not drain:
                self._fail_queued(EngineClosed("the engine shut down before this call was scored"))
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                self._drain = False
                self._fail_queued(EngineClosed(f"the engine shut down; draining took longer than {timeout} s"))
                self._wake.set()
                await self._task
        while self._pending:   # calls finishing up (adding samples) after their last batch
            await asyncio.sleep(0.005)
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    # ---- internals ----
    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._batcher_guarded(), name="rmserve-batcher")
        elif self._loop is not loop:
            raise RuntimeError("this AsyncEngine runs on another event loop; use SyncEngine from other threads")

    async def _submit(self, encode: Callable, inputs: Sequence[Any], samples: int, seed: int) -> list[ScoreResult]:
        if self._closing:
            raise EngineClosed("the engine is shutting down")
        check_sampling(self.engine.family, samples, seed)
        self._start()
        n = len(inputs)
        if n > self.config.max_pending:
            raise RequestTooLarge(f"{n} samples in one call; at most {self.config.max_pending} (max_pending)")
        if self._pending + n > self.config.max_pending:
            raise Overloaded(f"queue full: {self._pending} samples pending, limit {self.config.max_pending}")
        if n == 0:
            return []
        self._pending += n
        call = _Call(self._loop.create_future(), [None] * n)
        try:
            self._tokenizing += 1
            try:
                encoded = await self._loop.run_in_executor(self._tokenizer_thread, encode, list(inputs))
            finally:
                self._tokenizing -= 1
                self._wake.set()
            if self._closing and not self._drain:
                raise EngineClosed("the engine shut down before this call was scored")
            now = self._loop.time()
            for i, enc in enumerate(encoded):
                if isinstance(enc, Encoded):
                    self._queue.append(_Item(call, i, enc, now))
                    self._queued_tokens += len(enc)
                    call.remaining += 1
                else:
                    call.results[i] = ScoreResult(error=str(enc) if isinstance(enc, InputError) else repr(enc))
            if call.remaining:
                self._wake.set()
                await call.future
            if samples:
                return await self._loop.run_in_executor(
                    self._model_thread, add_samples, self.engine, encoded, call.results, samples, seed)
            return call.results  # type: ignore[return-value]
        except BaseException:   # cancelled, or failed: its samples leave the queue
            self._remove(call)
            raise
        finally:
            self._pending -= n

    def _remove(self, call: _Call) -> None:
        kept = deque(it for it in self._queue if it.call is not call)
        self._queued_tokens -= sum(len(it.encoded) for it in self._queue if it.call is call)
        self._queue = kept

    def _fail_queued(self, error: Exception) -> None:
        for it in self._queue:
            if not it.call.future.done():
                it.call.future.set_exception(error)
        self._queue.clear()
        self._queued_tokens = 0

    def _budget_full(self) -> bool:
        return (self._queued_tokens >= self.max_batch_tokens
                or (self.max_batch_seqs is not None and len(self._queue) >= self.max_batch_seqs))

    async def _batcher_guarded(self) -> None:
        """The batcher, and if it ever fails (a bug), a closed engine rather than callers waiting forever."""
        try:
            await self._batcher()
        except Exception as e:
            self._closing, self._drain = True, False
            self._fail_queued(EngineClosed(f"the batcher failed: {type(e).__name__}: {e}"))
            raise

    async def _batcher(self) -> None:
        wait_s = self.config.max_wait_ms / 1000
        while True:
            if not self._queue:
                if self._closing and self._tokenizing == 0:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # The model is idle: give the oldest sample up to max_wait for company.
            deadline = self._queue[0].arrived + wait_s
            while self._queue and not self._closing and not self._budget_full():
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except (asyncio.TimeoutError, TimeoutError):
                    break
            batch = self._take()
            if batch:
                await self._run(batch)

    def _take(self) -> list[_Item]:
        """Samples from the front of the queue, within the budget (a sample over it goes alone)."""
        batch: list[_Item] = []
        tokens = 0
        while self._queue:
            n = len(self._queue[0].encoded)
            full = tokens + n > self.max_batch_tokens or (
                self.max_batch_seqs is not None and len(batch) >= self.max_batch_seqs)
            if batch and full:
                break
            batch.append(self._queue.popleft())
            tokens += n
        self._queued_tokens -= tokens
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        items = [it.encoded for it in batch]
        self._running = len(batch)
        start = time.perf_counter()
        try:
            results = await self._loop.run_in_executor(self._model_thread, self._score_isolating, items)
        except Exception as e:  # not the model (it is caught below): the executor itself, say
            for it in batch:
                if not it.call.future.done():
                    it.call.future.set_exception(e)
            return
        finally:
            self._running = 0
        for it, res in zip(batch, results):
            call = it.call
            if call.future.done():   # cancelled, or failed
                continue
            call.results[it.index] = res
            call.remaining -= 1
            if call.remaining == 0:
                call.future.set_result(None)
        if self.on_batch is not None:
            self.on_batch(BatchStats(
                samples=len(batch), tokens=sum(len(e) for e in items), seconds=time.perf_counter() - start,
                calls=len({id(it.call) for it in batch}), failed=sum(1 for r in results if r.error)))

    def _score_isolating(self, items: list[Encoded]) -> list[ScoreResult]:
        """Runs on the model thread. If the model raises on a batch, each sample is retried alone,
        so one sample the model cannot run fails alone (with `error` set) and the others are scored."""
        try:
            return self.engine.score_encoded(items)
        except Exception as e:
            if len(items) == 1:
                return [ScoreResult(error=f"scoring failed: {type(e).__name__}: {e}", num_tokens=len(items[0]))]
            return [r for it in items for r in self._score_isolating([it])]


class SyncEngine:
    """A blocking, thread-safe front for an AsyncEngine running on its own event-loop thread.

    with SyncEngine(Engine.from_pretrained(...)) as engine:
        results = engine.score(conversations)     # from any number of threads at once
    """

    def __init__(self, engine: Engine, config: BatchingConfig = BatchingConfig(),
                 on_batch: Callable[[BatchStats], None] | None = None):
        self.async_engine = AsyncEngine(engine, config, on_batch)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rmserve-async-loop", daemon=True)
        self._thread.start()
        self._closed = False

    def _call(self, coro, timeout: float | None):
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()   # the call leaves the queue if it has not run yet
            raise

    def score(self, conversations: Sequence[Any], *, samples: int = 0, seed: int = 0,
              timeout: float | None = None) -> list[ScoreResult]:
        if self._closed:
            raise EngineClosed("the engine is shut down")
        return self._call(self.async_engine.score(conversations, samples=samples, seed=seed), timeout)

    def score_texts(self, texts: Sequence[str], *, samples: int = 0, seed: int = 0,
                    timeout: float | None = None) -> list[ScoreResult]:
        if self._closed:
            raise EngineClosed("the engine is shut down")
        return self._call(self.async_engine.score_texts(texts, samples=samples, seed=seed), timeout)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._call(self.async_engine.close(drain, timeout), None)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "SyncEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
