"""Prometheus metrics of one server, in its own registry (several apps can live in one process)."""
from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..async_engine import AsyncEngine, BatchStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = tuple(float(2 ** i) for i in range(11))            # 1 .. 1024 samples
TOKEN_BUCKETS = tuple(float(2 ** i) for i in range(4, 18))        # 16 .. 131072 tokens
ENDPOINTS = ("/v1/score", "/get_reward", "/classify", "/v1/embeddings", "/health", "/v1/models", "/metrics")
THROUGHPUT_WINDOW_S = 10.0


class Metrics:
    def __init__(self, engine: AsyncEngine):
        r = self.registry = CollectorRegistry()
        Gauge("rmserve_queue_depth", "Samples tokenized and waiting for a batch", registry=r).set_function(
            lambda: engine.queued_samples)
        Gauge("rmserve_pending_samples", "Samples admitted and not yet answered (bounded by max_pending)",
              registry=r).set_function(lambda: engine.pending_samples)
        Gauge("rmserve_tokens_per_second", f"Tokens scored per second over the last {THROUGHPUT_WINDOW_S:g} s",
              registry=r).set_function(self._throughput)
        self.in_progress = Gauge("rmserve_requests_in_progress", "HTTP requests being handled", ["endpoint"],
                                 registry=r)
        self.latency = Histogram("rmserve_request_latency_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("rmserve_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.errors = Counter("rmserve_errors", "Errors by kind (per request, or per sample for sample_error)",
                              ["kind"], registry=r)
        self.batch_samples = Histogram("rmserve_batch_samples", "Samples in one model batch",
                                       buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("rmserve_batch_tokens", "Tokens in one model batch",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.batch_seconds = Histogram("rmserve_batch_seconds", "Model time of one batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("rmserve_tokens", "Tokens scored", registry=r)
        self.samples = Counter("rmserve_samples", "Samples scored", registry=r)
        self._recent: deque[tuple[float, int]] = deque()

    def endpoint(self, path: str) -> str:
        return path if path in ENDPOINTS else "other"

    def on_batch(self, stats: BatchStats) -> None:
        self.batch_samples.observe(stats.samples)
        self.batch_tokens.observe(stats.tokens)
        self.batch_seconds.observe(stats.seconds)
        self.tokens.inc(stats.tokens)
        self.samples.inc(stats.samples)
        if stats.failed:   # these samples come back with an error: the route counts them as sample_error too
            self.errors.labels("model_error").inc(stats.failed)
        now = time.monotonic()
        self._recent.append((now, stats.tokens))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()

    def _throughput(self) -> float:
        self._trim(time.monotonic())
        return sum(n for _, n in self._recent) / THROUGHPUT_WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)
