"""The FastAPI app: routes, validation, errors, authentication and the body-size limit.

Status codes: 200 (per-sample errors inside an otherwise good request come back per sample),
401 missing or wrong API key, 404 a `model` that is not the served one, 413 body too large,
422 malformed body or a conversation that is not scoreable as written (empty, wrong role, last
turn not the assistant's, too many conversations, too many characters), 429 queue full
(Retry-After), 503 shutting down (Retry-After).
"""
from __future__ import annotations

import json
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..async_engine import AsyncEngine, EngineClosed, Overloaded, RequestTooLarge
from ..inputs import InputError, check_conversation, content_chars
from ..results import ScoreResult
from ..sampling import check_sampling
from .metrics import Metrics
from .schemas import (ErrorResponse, Health, ModelCard, ModelList, RewardRequest, RewardResponse, ScoreItem,
                      ScoreRequest, ScoreResponse)

OPEN_PATHS = ("/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 413, 422, 429, 503)}


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-side limits and settings (batching settings are in async_engine.BatchingConfig)."""
    model_name: str                      # what /v1/models lists and `model` fields must match
    api_key: str | None = None           # when set, every route but OPEN_PATHS needs "Authorization: Bearer <key>"
    max_items: int = 256                 # conversations (or queries) in one request
    max_samples: int = 1024              # `samples` (draws per conversation) in one request
    max_sample_chars: int = 1_000_000    # characters in one conversation or query
    strip_padding: tuple[str, ...] = ()  # /get_reward: strings (pad tokens) removed from both ends of a query
    max_body_bytes: int = 32 * 2 ** 20   # request body size
    drain_timeout_s: float = 30.0        # on shutdown, how long admitted samples may take to finish
    retry_after_s: int = 1               # Retry-After on 429 / 503


class ClientError(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


class SafeJSONResponse(JSONResponse):
    """JSON that a lone UTF-16 surrogate echoed from the request (a `model` of "\\ud800", say) cannot
    turn into a 500: UTF-8 cannot encode it, so such a body is written with ASCII escapes."""

    def render(self, content) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return SafeJSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def unparsable_body(cause: BaseException | None) -> str:
    """Why FastAPI could not parse a JSON body (it answers 400 for what json.loads raises other than
    a JSONDecodeError)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid JSON: it is not UTF-8 ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the body is not valid JSON here: it is nested too deeply"
    return f"the body could not be parsed as JSON ({type(cause).__name__})"


class Gate:
    """ASGI middleware in front of the app: API key, body-size limit, latency and request metrics.

    The body is read here in full (up to the limit) so an oversized one is refused with 413 before
    any parsing, whether or not the client sent Content-Length."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = self.metrics.endpoint(scope["path"])
        start = time.perf_counter()
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_progress.labels(endpoint).inc()
        try:
            refusal = self._check_auth(scope)
            if refusal is None:
                receive, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                await refusal(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_progress.labels(endpoint).dec()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()

    def _check_auth(self, scope):
        key = self.config.api_key
        if key is None or scope["path"] in OPEN_PATHS:
            return None
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode()):
            return None
        self.metrics.errors.labels("unauthorized").inc()
        return error_response(401, "unauthorized", "missing or wrong API key (Authorization: Bearer <key>)",
                              {"WWW-Authenticate": "Bearer"})

    async def _read_body(self, scope, receive):
        limit = self.config.max_body_bytes
        too_large = error_response(413, "body_too_large", f"request body larger than {limit} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self.metrics.errors.labels("body_too_large").inc()
            return receive, too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _replay([message]), None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                self.metrics.errors.labels("body_too_large").inc()
                return receive, too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive), None


def _replay(messages, then=None):
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


def strip_padding(text: str, pads: tuple[str, ...]) -> str:
    """Remove every leading and trailing repetition of the strings in `pads` (a trainer's
    left/right padding decoded into the query text)."""
    changed = bool(pads)
    while changed:
        changed = False
        for pad in pads:
            if pad and text.startswith(pad):
                text, changed = text[len(pad):], True
            if pad and text.endswith(pad):
                text, changed = text[:-len(pad)], True
    return text


def to_item(index: int, result: ScoreResult) -> ScoreItem:
    if result.error is not None:
        return ScoreItem(index=index, error=result.error)
    return ScoreItem(index=index, **{k: v for k, v in result.to_dict().items() if k != "names"})


def create_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    """The app serving `engine`; it takes over the engine's on_batch callback for its metrics."""
    metrics = Metrics(engine)
    engine.on_batch = metrics.on_batch
    sync = engine.engine
    spec = sync.spec
    names = list(spec.head.names)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await engine.close(drain=True, timeout=config.drain_timeout_s)

    app = FastAPI(title="rmserve", version="0.1.0", lifespan=lifespan,
                  description="Reward-model scoring. Per-sample errors come back per sample with status 200.")
    app.add_middleware(Gate, config=config, metrics=metrics)

    def refuse(status: int, kind: str, message: str, retry: bool = False) -> JSONResponse:
        metrics.errors.labels(kind).inc()
        headers = {"Retry-After": str(config.retry_after_s)} if retry else None
        return error_response(status, kind, message, headers)

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, e: ClientError):
        return refuse(e.status, e.kind, e.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
            return refuse(422, "invalid_request", "the body must be JSON, sent with 'Content-Type: application/json'")
        parts = []
        for err in e.errors()[:5]:
            if err.get("type") == "json_invalid":
                return refuse(422, "invalid_request", f"the body is not valid JSON ({err.get('msg')} at "
                                                      f"character {err.get('loc', ('', '?'))[-1]})")
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where or 'body'}: {err.get('msg')}")
        more = f" (and {len(e.errors()) - 5} more)" if len(e.errors()) > 5 else ""
        return refuse(422, "invalid_request", "; ".join(parts) + more)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 400:   # a body json.loads could not read: 422 like any body that is not JSON
            return refuse(422, "invalid_request", unparsable_body(e.__cause__))
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid_request")
        return refuse(e.status_code, kind, str(e.detail))

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, e: Overloaded):
        return refuse(429, "overloaded", str(e), retry=True)

    @app.exception_handler(EngineClosed)
    async def _closed(request: Request, e: EngineClosed):
        return refuse(503, "shutting_down", str(e), retry=True)

    @app.exception_handler(RequestTooLarge)
    async def _too_large(request: Request, e: RequestTooLarge):
        return refuse(422, "invalid_request", str(e))

    def check_model(name: str | None) -> None:
        """A request's `model`, when given, must name the served one (404 otherwise)."""
        if name is not None and name != config.model_name:
            raise ClientError(404, "unknown_model", f"model '{name}' is not served here; this server serves "
                                                    f"'{config.model_name}' (set --served-model-name to the "
                                                    "name your client sends)")

    def check_count(n: int, what: str) -> None:
        if n > config.max_items:
            raise ClientError(422, "invalid_request", f"{n} {what} in one request; at most {config.max_items}")

    def check_chars(n: int, where: str) -> None:
        if n > config.max_sample_chars:
            raise ClientError(422, "invalid_request",
                              f"{where} has {n} characters; at most {config.max_sample_chars} per sample")

    def check_texts(texts: list[str], name: str, padding: tuple[str, ...] = ()) -> list[str]:
        """Rendered texts from a request -> the texts to tokenize: each within the character limit,
        stripped of `padding` (a trainer's pad strings, /get_reward's --strip-padding), and not empty."""
        out = []
        for i, text in enumerate(texts):
            check_chars(len(text), f"{name}[{i}]")
            text = strip_padding(text, padding)
            if not text.strip():
                raise ClientError(422, "invalid_request",
                                  f"{name}[{i}] is empty" + (" once padding is removed" if padding else ""))
            out.append(text)
        return out

    def count_item_errors(items: list) -> None:
        bad = sum(1 for it in items if it.error is not None)
        if bad:
            metrics.errors.labels("sample_error").inc(bad)

    @app.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True, responses=ERRORS)
    async def score(body: ScoreRequest) -> ScoreResponse:
        """Score conversations: each one's score and the family's head outputs, in request order."""
        check_model(body.model)
        check_count(len(body.conversations), "conversations")
        if body.samples > config.max_samples:
            raise ClientError(422, "invalid_request", f"samples={body.samples}; at most {config.max_samples}")
        try:
            check_sampling(spec.family, body.samples, body.seed)
        except ValueError as e:
            raise ClientError(422, "invalid_request", str(e)) from None
        convs = []
        for i, conv in enumerate(body.conversations):
            messages = [m.model_dump() for m in conv]
            try:
                messages = check_conversation(messages, steps=bool(spec.head.step_token))
            except InputError as e:
                raise ClientError(422, "invalid_request", f"conversations[{i}]: {e}") from None
            check_chars(content_chars(messages), f"conversations[{i}]")
            convs.append(messages)
        results = await engine.score(convs, samples=body.samples, seed=body.seed)
        items = [to_item(i, r) for i, r in enumerate(results)]
        count_item_errors(items)
        return ScoreResponse(model=config.model_name, family=spec.family, names=names, results=items)

    @app.post("/get_reward", response_model=RewardResponse, response_model_exclude_none=True, responses=ERRORS)
    async def get_reward(body: RewardRequest) -> RewardResponse:
        """OpenRLHF's remote reward model: `{"query": [texts]}` -> `{"rewards": [...]}`. Texts are
        already rendered with the chat template; they are tokenized under the server's BOS policy."""
        check_count(len(body.query), "queries")
        results = await engine.score_texts(check_texts(body.query, "query", config.strip_padding))
        items = [to_item(i, r) for i, r in enumerate(results)]
        for it in items:
            if it.error is None and it.score is None:
                it.error = "this model gives several logits and no single score; use /v1/score"
        count_item_errors(items)
        rewards = [it.score if it.error is None else None for it in items]
        errors = [it.error for it in items]
        return RewardResponse(rewards=rewards, scores=rewards, errors=errors if any(errors) else None)

    from .pooling import add_routes   # here: pooling.py imports this module

    # /classify and /v1/embeddings
    add_routes(app, engine, config, check_model, check_count, check_chars, check_texts, count_item_errors)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health():
        body = Health(status="shutting_down" if engine.closed else "ok",
                      queued_samples=engine.queued_samples, pending_samples=engine.pending_samples)
        return JSONResponse(body.model_dump(), status_code=503 if engine.closed else 200)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        steps = {"step_token": spec.head.step_token, "step_aggregation": sync.config.step_aggregation,
                 "step_separator": sync.config.step_separator} if spec.head.step_token else {}
        card = ModelCard(id=config.model_name, family=spec.family, architecture=spec.architecture,
                         dtype=sync.config.dtype, device=sync.config.device, max_length=sync.config.max_length,
                         names=names, template_date=sync.config.template_date, **steps)
        return ModelList(data=[card])

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
