"""Where RL integrations get scores: an in-process Engine or a running `rmserve serve`.

Both take conversations (message lists) and give, per conversation, its score or the reason it
has none; both batch concurrent callers (the SyncEngine's queue, the server's batcher).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Sequence

from ..async_engine import BatchingConfig, SyncEngine
from ..engine import Engine


@dataclass(frozen=True)
class Scored:
    score: float | None
    error: str | None = None   # why there is no score


class LocalScorer:
    """An Engine in this process behind a SyncEngine (thread-safe; concurrent calls share batches)."""

    def __init__(self, engine: Engine | SyncEngine, batching: BatchingConfig = BatchingConfig()):
        if isinstance(engine, SyncEngine):
            self.sync, self.max_call = engine, engine.async_engine.config.max_pending
            spec = engine.async_engine.engine.spec
        else:
            self.sync, self.max_call = SyncEngine(engine, batching), batching.max_pending
            spec = engine.spec
        if spec.family == "bt" and spec.head.num_labels != 1:
            raise ValueError(f"this model has {spec.head.num_labels} labels and no single score; a reward "
                             "function needs one score per sample")

    def score(self, conversations: Sequence[list[dict]]) -> list[Scored]:
        out: list[Scored] = []
        for start in range(0, len(conversations), self.max_call):
            for r in self.sync.score(list(conversations[start:start + self.max_call])):
                out.append(Scored(r.score) if r.error is None else Scored(None, r.error))
        return out

    def close(self) -> None:
        self.sync.close()


class RemoteScorer:
    """POST /v1/score of a running `rmserve serve`, at most `max_items` conversations a request (the
    server's --max-items). A 429 or 503 is retried after its Retry-After for up to `retry_s` seconds;
    any other refusal raises with the server's message."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 600.0, max_items: int = 256,
                 retry_s: float = 120.0):
        try:
            import httpx
        except ModuleNotFoundError:
            raise ModuleNotFoundError("a reward server URL needs httpx: pip install httpx "
                                      "(or rmserve[server])") from None
        base = url.rstrip("/")
        self.url = base if base.endswith("/v1/score") else base + "/v1/score"
        key = api_key or os.environ.get("RMSERVE_API_KEY")
        self.client = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"} if key else None)
        self.max_items, self.retry_s = max_items, retry_s

    def score(self, conversations: Sequence[list[dict]]) -> list[Scored]:
        out: list[Scored] = []
        for start in range(0, len(conversations), self.max_items):
            for item in self._post(list(conversations[start:start + self.max_items])):
                if item.get("error") is not None:
                    out.append(Scored(None, item["error"]))
                elif item.get("score") is None:
                    raise ValueError("the served model gives several logits and no single score; a reward "
                                     "function needs one score per sample")
                else:
                    out.append(Scored(float(item["score"])))
        return out

    def _post(self, conversations: list[list[dict]]) -> list[dict]:
        deadline = time.monotonic() + self.retry_s
        while True:
            resp = self.client.post(self.url, json={"conversations": conversations})
            if resp.status_code == 200:
                return resp.json()["results"]
            if resp.status_code in (429, 503) and time.monotonic() < deadline:
                time.sleep(float(resp.headers.get("retry-after", 1)))
                continue
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:500]
            raise RuntimeError(f"{self.url} answered {resp.status_code}: {message}")

    def close(self) -> None:
        self.client.close()


def make_scorer(source: str | Engine | SyncEngine, **settings) -> LocalScorer | RemoteScorer:
    """source: the URL of a running `rmserve serve` (http:// or https://), or an Engine / SyncEngine."""
    if isinstance(source, str):
        if not source.startswith(("http://", "https://")):
            raise ValueError(f"a reward source string must be a server URL (http://host:port), got {source!r}; "
                             "for a model in this process pass rmserve.Engine.from_pretrained(...)")
        return RemoteScorer(source, **settings)
    if isinstance(source, (Engine, SyncEngine)):
        return LocalScorer(source, **settings)
    raise TypeError(f"a reward source is a server URL, an Engine or a SyncEngine, got {type(source).__name__}")
