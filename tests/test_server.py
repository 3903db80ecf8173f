"""The HTTP server, for real: `rmserve serve` in a subprocess on loopback, driven with httpx."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from rmserve import Engine
from rmserve.results import ScoreResult
from rmserve.tiny import write_tiny_checkpoint

from .helpers import random_conversation
from .test_async_engine import alone, assert_same

# The `server` extra: where it is not installed (the GPU image has no fastapi or uvicorn) this module skips.
for _extra in ("fastapi", "uvicorn", "pydantic", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from rmserve.server.schemas import ScoreItem  # noqa: E402

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`rmserve serve` as a subprocess; its output goes to a log file shown when something fails."""

    def __init__(self, model: str, log_path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w+")
        cmd = [sys.executable, "-m", "rmserve.cli", "serve", "--model", model, "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not come up:\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """start_server(family, *args, env=..., **tiny_settings) -> (Server, checkpoint path); stopped at teardown."""
    servers = []

    def start(family, *args, env=None, **settings):
        path = write_tiny_checkpoint(str(tmp_path_factory.mktemp(family)), family, **settings)
        server = Server(path, tmp_path_factory.mktemp("log") / "server.log", *args, env=env)
        servers.append(server)
        return server, path

    yield start
    for s in servers:   # all drain at once
        if s.proc.poll() is None:
            s.proc.terminate()
    for s in servers:
        s.stop()


def metrics(url: str, headers=None) -> dict:
    """Scrape /metrics -> {(name, labels...): value} via prometheus_client's own parser."""
    text = httpx.get(url + "/metrics", headers=headers).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def item_dict(item: dict) -> dict:
    """A /v1/score result item -> ScoreResult.to_dict() form (names live at the top of the response)."""
    return {k: v for k, v in item.items() if k != "index"}


def too_long(rng, n_words=120):
    return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ".join(["reward"] * n_words)}]


# ---------------------------------------------------------------------------------------------
# Concurrency integrity and metrics


@pytest.fixture(scope="module")
def family_server(start_server):
    """family_server(family) -> (Server, checkpoint path): one server per family for the tests below
    (a server start is seconds); they count the server's metrics as differences."""
    servers = {}

    def get(family):
        if family not in servers:
            servers[family] = start_server(family, "--max-batch-tokens", "1024", "--max-length", "256",
                                           "--strip-padding", "[PAD]", "--strip-padding", "<|end_of_text|>")
        return servers[family]

    return get


def metrics_since(url: str, before: dict) -> dict:
    """Counters and histograms as increases since `before`; gauges (no _total/_sum/_count/_bucket) as they are."""
    now = metrics(url)
    counted = ("_total", "_sum", "_count", "_bucket")
    return {k: v - before.get(k, 0) if k[0].endswith(counted) else v for k, v in now.items()}


@pytest.mark.parametrize("family", ["armorm", "urm"])
def test_concurrent_requests_get_their_own_answers(family_server, family, rng):
    server, path = family_server(family)
    before = metrics(server.url)
    engine = Engine.from_pretrained(path, dtype="float32", device="cpu", max_length=256)
    requests = []
    for _ in range(200):
        convs = [random_conversation(rng, hi=rng.choice([5, 40])) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.1:   # a per-sample error inside an otherwise good request
            convs.insert(rng.randrange(len(convs) + 1), too_long(rng, rng.choice([130, 400])))
        # URM is distributional: some requests ask for draws
        draws = {"samples": rng.choice([0, 4]), "seed": rng.randrange(2 ** 64)} if family == "urm" else {}
        requests.append((convs, draws))

    async def run():
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(client.post("/v1/score", json={"conversations": c, **d})
                                          for c, d in requests))

    answers = asyncio.run(run())
    m = metrics_since(server.url, before)
    ok_tokens = ok_samples = item_errors = 0
    for n, ((convs, draws), resp) in enumerate(zip(requests, answers)):
        want_all = engine.score(convs, **draws)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["family"] == family and body["names"] == list(engine.spec.head.names)
        assert [it["index"] for it in body["results"]] == list(range(len(convs)))
        for i, (item, want) in enumerate(zip(body["results"], want_all)):
            assert_same(item_dict(item), want, f"request {n} sample {i}")
            if want.ok:
                ok_tokens += want.num_tokens
                ok_samples += 1
            else:
                item_errors += 1
    assert item_errors > 0
    assert m[("rmserve_tokens_total",)] == ok_tokens
    assert m[("rmserve_samples_total",)] == ok_samples
    assert m[("rmserve_batch_samples_sum",)] == ok_samples
    assert m[("rmserve_batch_samples_count",)] < ok_samples          # batches held several samples
    assert m[("rmserve_batch_tokens_bucket", ("le", "1024.0"))] == m[("rmserve_batch_tokens_count",)]
    assert m[("rmserve_requests_total", ("endpoint", "/v1/score"), ("status", "200"))] == len(requests)
    assert m[("rmserve_request_latency_seconds_count", ("endpoint", "/v1/score"))] == len(requests)
    assert m[("rmserve_errors_total", ("kind", "sample_error"))] == item_errors
    assert m[("rmserve_queue_depth",)] == 0 and m[("rmserve_pending_samples",)] == 0
    assert m[("rmserve_tokens_per_second",)] > 0


def test_get_reward_openrlhf_protocol(family_server, rng):
    server, path = family_server("armorm")
    engine = Engine.from_pretrained(path, dtype="float32", device="cpu", max_length=256)   # as the server
    convs = [random_conversation(rng, max_turns=2, hi=8) for _ in range(6)]   # within --max-length 256
    texts = [engine.preprocessor.render(c) for c in convs]
    # a trainer's left and right padding, decoded into the text, is removed before scoring
    texts[1] = "[PAD][PAD]<|end_of_text|>" + texts[1] + "[PAD]<|end_of_text|>"
    texts.insert(2, "plain text with no chat template")          # no gating pattern: a per-sample error
    body = {"query": texts, "prompts": ["p"] * len(texts), "labels": [None] * len(texts)}  # newer OpenRLHF
    resp = httpx.post(server.url + "/get_reward", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    want = engine.score(convs)
    assert all(w.ok for w in want)
    got = out["rewards"][:2] + out["rewards"][3:]
    assert got == pytest.approx([w.score for w in want], rel=1e-5, abs=1e-5)
    assert out["scores"] == out["rewards"]
    assert out["rewards"][2] is None and "gating pattern" in out["errors"][2]
    assert [e is None for i, e in enumerate(out["errors"]) if i != 2] == [True] * 6
    clean = httpx.post(server.url + "/get_reward", json={"query": texts[:2]}, timeout=60).json()
    assert "errors" not in clean and clean["rewards"] == pytest.approx(got[:2], rel=1e-5, abs=1e-5)
    only_pad = httpx.post(server.url + "/get_reward", json={"query": [texts[0], "[PAD][PAD]"]}, timeout=60)
    assert only_pad.status_code == 422 and "query[1] is empty" in only_pad.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------
# Validation and authentication: one server with small limits and an API key


@pytest.fixture(scope="module")
def strict_server(start_server):
    server, _ = start_server("bt", "--max-items", "4", "--max-sample-chars", "2000", "--max-body-bytes", "20000",
                             "--max-length", "64", env={"RMSERVE_API_KEY": KEY})
    return server


GOOD = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
JSON = {"content-type": "application/json"}

INVALID = {
    # name: (path, raw body, extra headers, status, fragment of the error message)
    "not-json": ("/v1/score", b'{"conversations": [', JSON, 422, "not valid JSON"),
    "no-content-type": ("/v1/score", json.dumps({"conversations": [GOOD]}).encode(), {}, 422, "Content-Type"),
    "array-body": ("/v1/score", b"[]", JSON, 422, "valid dictionary"),
    "conversations-not-list": ("/v1/score", {"conversations": "hi"}, JSON, 422, "conversations"),
    "no-conversations": ("/v1/score", {"conversations": []}, JSON, 422, "at least 1"),
    "empty-conversation": ("/v1/score", {"conversations": [GOOD, []]}, JSON, 422, "conversations[1]: empty"),
    "wrong-role": ("/v1/score", {"conversations": [[{"role": "bot", "content": "x"}] + GOOD]}, JSON, 422,
                   "conversations.0.0.role"),
    "last-turn-user": ("/v1/score", {"conversations": [GOOD[:1]]}, JSON, 422, "last message must be the assistant"),
    "empty-answer": ("/v1/score", {"conversations": [[GOOD[0], {"role": "assistant", "content": "  "}]]}, JSON, 422,
                     "answer is empty"),
    "content-not-text": ("/v1/score", {"conversations": [[GOOD[0], {"role": "assistant", "content": ["x"]}]]},
                         JSON, 422, "content"),
    "no-content": ("/v1/score", {"conversations": [[GOOD[0], {"role": "assistant"}]]}, JSON, 422, "content"),
    "unknown-field": ("/v1/score", {"conversations": [GOOD], "temperature": 1}, JSON, 422, "temperature"),
    "too-many-items": ("/v1/score", {"conversations": [GOOD] * 5}, JSON, 422, "at most 4"),
    "too-long-sample": ("/v1/score", {"conversations": [[GOOD[0], {"role": "assistant", "content": "a" * 2001}]]},
                        JSON, 422, "2003 characters"),
    "body-too-large": ("/v1/score", {"conversations": [GOOD], "pad": "x" * 20000}, JSON, 413, "larger than 20000"),
    "unknown-model": ("/v1/score", {"conversations": [GOOD], "model": "gpt-4"}, JSON, 404, "not served here"),
    "samples-point-score": ("/v1/score", {"conversations": [GOOD], "samples": 4}, JSON, 422, "distributional"),
    "samples-negative": ("/v1/score", {"conversations": [GOOD], "samples": -1}, JSON, 422, "samples"),
    "samples-too-many": ("/v1/score", {"conversations": [GOOD], "samples": 5000}, JSON, 422, "at most 1024"),
    "seed-too-large": ("/v1/score", {"conversations": [GOOD], "seed": 2 ** 64}, JSON, 422, "seed"),
    "reward-empty": ("/get_reward", {"query": []}, JSON, 422, "at least 1"),
    "reward-empty-text": ("/get_reward", {"query": ["ok", ""]}, JSON, 422, "query.1"),
    "reward-not-text": ("/get_reward", {"query": [1]}, JSON, 422, "query.0"),
    "reward-not-list": ("/get_reward", {"query": "text"}, JSON, 422, "query"),
    "reward-too-many": ("/get_reward", {"query": ["a"] * 5}, JSON, 422, "at most 4"),
    # a body json.loads cannot read for a reason other than its syntax (FastAPI alone answers 400)
    "body-not-utf8": ("/v1/score", b'{"conversations": [[{"role": "user", "content": "caf\xe9"}]]}', JSON, 422,
                      "not UTF-8 (invalid continuation byte at byte 52)"),
    "body-nested-deep": ("/v1/score", b"[" * 9000 + b"]" * 9000, JSON, 422, "nested too deeply"),
    # a lone UTF-16 surrogate, echoed in the message (JSON escapes it: UTF-8 cannot encode it)
    "model-surrogate": ("/v1/score", {"conversations": [GOOD], "model": "m\ud800"}, JSON, 404,
                        "model 'm\ud800' is not served here"),
    "reward-surrogate": ("/get_reward", {"query": ["ok", "a\ud800"]}, JSON, 422, "query.1: Input should be a valid string"),
    "classify-surrogate": ("/classify", {"messages": [GOOD[0], {"role": "assistant", "content": "a\ud800"}]}, JSON, 422,
                           "input[0] cannot be scored: the text is not valid Unicode: a lone surrogate"),
    "classify-model-surrogate": ("/classify", {"model": "m\ud800", "input": "hi"}, JSON, 404,
                                 "model 'm\ud800' is not served here"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_requests_get_clear_4xx(strict_server, case):
    path, body, headers, status, fragment = INVALID[case]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(strict_server.url + path, content=raw, headers={**headers, **AUTH}, timeout=30)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert fragment in err["message"], err
    assert err["type"] in ("invalid_request", "body_too_large", "unknown_model")


def test_body_limit_without_content_length(strict_server):
    """A chunked body (no Content-Length) is counted as it arrives and refused past the limit."""
    chunks = iter([b'{"conversations": [], "pad": "', b"x" * 15000, b"x" * 15000, b'"}'])
    resp = httpx.post(strict_server.url + "/v1/score", content=chunks, headers={**JSON, **AUTH}, timeout=30)
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "body_too_large"


def test_other_statuses_and_per_sample_errors(strict_server):
    url = strict_server.url
    assert httpx.get(url + "/v1/score", headers=AUTH).status_code == 405
    assert httpx.get(url + "/nowhere", headers=AUTH).status_code == 404
    long_conv = [GOOD[0], {"role": "assistant", "content": " ".join(["reward"] * 100)}]   # < 2000 chars, > 64 tokens
    resp = httpx.post(url + "/v1/score", json={"conversations": [GOOD, long_conv]}, headers=AUTH, timeout=30)
    assert resp.status_code == 200
    good, bad = resp.json()["results"]
    assert good["score"] is not None and "error" not in good
    assert bad == {"index": 1, "error": bad["error"]} and "longer than the model's maximum of 64" in bad["error"]


def test_lone_surrogate_is_that_sample_s_error(strict_server):
    """JSON's "\\ud800" without its pair decodes to a lone surrogate, which no tokenizer takes: that
    conversation gets a per-sample error and the others in the request are scored as alone."""
    bad = [GOOD[0], {"role": "assistant", "content": "Hello \ud800 there"}]
    fine = GOOD[:1] + [{"role": "assistant", "content": "Fine."}]
    body = json.dumps({"conversations": [GOOD, bad, fine]})   # ensure_ascii: the surrogate as "\\ud800"
    resp = httpx.post(strict_server.url + "/v1/score", content=body, headers={**JSON, **AUTH}, timeout=30)
    assert resp.status_code == 200, resp.text
    first, middle, last = resp.json()["results"]
    assert middle == {"index": 1, "error": middle["error"]} and "lone surrogate '\\ud800'" in middle["error"]
    alone = httpx.post(strict_server.url + "/v1/score", json={"conversations": [GOOD, fine]}, headers=AUTH,
                       timeout=30).json()["results"]
    assert [first["score"], last["score"]] == pytest.approx([r["score"] for r in alone], rel=1e-5, abs=1e-5)


def test_api_key(strict_server):
    url, body = strict_server.url, {"conversations": [GOOD]}
    missing = httpx.post(url + "/v1/score", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "unauthorized"
    assert httpx.post(url + "/v1/score", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(url + "/v1/score", json=body, headers={"Authorization": KEY}).status_code == 401
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.post(url + "/v1/score", json=body, headers=AUTH).status_code == 200
    assert httpx.get(url + "/health").status_code == 200                       # open, for load balancers
    m = metrics(url, AUTH)
    assert m[("rmserve_errors_total", ("kind", "unauthorized"))] >= 5


def test_models_and_openapi(strict_server):
    models = httpx.get(strict_server.url + "/v1/models", headers=AUTH).json()
    card = models["data"][0]
    assert card["family"] == "bt" and card["max_length"] == 64 and card["dtype"] == "float32"
    schema = httpx.get(strict_server.url + "/openapi.json").json()
    assert {"/v1/score", "/get_reward", "/health", "/v1/models", "/metrics"} <= set(schema["paths"])
    assert {"ScoreRequest", "ScoreResponse", "RewardRequest", "RewardResponse"} <= set(schema["components"]["schemas"])


def test_response_schema_covers_every_result_field():
    result_fields = set(ScoreResult.__dataclass_fields__) - {"names"}
    assert result_fields <= set(ScoreItem.model_fields)


# ---------------------------------------------------------------------------------------------
# Overload and shutdown


def test_overload_gets_prompt_429_and_recovers(start_server, rng):
    server, _ = start_server("bt", "--max-pending", "4", "--max-items", "4", "--max-wait-ms", "20")
    requests = [[random_conversation(rng) for _ in range(4)] for _ in range(60)]

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=60)) as c:
            return await asyncio.gather(*(c.post("/v1/score", json={"conversations": r}) for r in requests))

    start = time.perf_counter()
    answers = asyncio.run(burst())
    elapsed = time.perf_counter() - start
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) > 0
    for r in answers:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "overloaded"
    assert elapsed < 60
    health = httpx.get(server.url + "/health").json()
    assert health == {"status": "ok", "queued_samples": 0, "pending_samples": 0}
    assert httpx.post(server.url + "/v1/score", json={"conversations": requests[0]}).status_code == 200
    assert metrics(server.url)[("rmserve_errors_total", ("kind", "overloaded"))] == codes.count(429)


def test_sigterm_drains_in_flight_requests(tmp_path, rng):
    path = write_tiny_checkpoint(str(tmp_path / "ckpt"), "grm")
    # A long max_wait keeps requests in flight long enough to send SIGTERM among them.
    server = Server(path, tmp_path / "server.log", "--max-wait-ms", "1500", "--max-batch-tokens", "100000")
    try:
        engine = Engine.from_pretrained(path, dtype="float32", device="cpu")
        requests = [[random_conversation(rng) for _ in range(rng.randint(1, 3))] for _ in range(40)]

        async def load():
            async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                         limits=httpx.Limits(max_connections=40)) as client, \
                    httpx.AsyncClient(base_url=server.url, timeout=30) as probe:
                tasks = [asyncio.create_task(client.post("/v1/score", json={"conversations": r})) for r in requests]
                deadline = time.monotonic() + 30
                while True:
                    m = await probe.get("/metrics")   # its own connection: the 40 are all busy
                    families = {s.name: s.value for f in text_string_to_metric_families(m.text) for s in f.samples
                                if s.labels.get("endpoint") in (None, "/v1/score")}
                    if families.get("rmserve_requests_in_progress", 0) >= 5:
                        break
                    assert time.monotonic() < deadline, "requests never got in flight"
                    await asyncio.sleep(0.02)
                server.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        answers = asyncio.run(load())
        for resp, want_all in zip(answers, alone(engine, requests)):
            assert resp.status_code == 200, resp.text
            for item, want in zip(resp.json()["results"], want_all):
                assert_same(item_dict(item), want)
        server.proc.wait(60)
        # a clean drain exits 0 (uvicorn re-raises the signal after its graceful shutdown: a
        # supervisor would read death by SIGTERM, status 143, as a crash)
        assert server.proc.returncode == 0, server.logs()
        assert "Application shutdown complete" in server.logs()
    finally:
        server.stop()


def test_a_non_finite_output_is_that_samples_error(tmp_path):
    """A sample whose outputs overflow (an fp16 model, say) gets an error, never a NaN score: from
    Engine.score, in an offline job's errors file, and from the server (/v1/score per item, /classify
    422); the other samples of the batch score as they would alone. The checkpoint's embedding row of a
    token only the first conversation holds is set to infinity."""
    from safetensors.torch import load_file, save_file

    from rmserve.offline.job import JobConfig, run_job
    from rmserve.results import NON_FINITE

    from .offline_helpers import read_jsonl, write_jsonl

    path = write_tiny_checkpoint(str(tmp_path / "bt"), "bt")
    a = [{"role": "user", "content": "zebra quartz"}, {"role": "assistant", "content": "vex"}]
    b = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    clean = Engine.from_pretrained(path, dtype="float32", device="cpu")
    ids_a, ids_b = (e.ids for e in clean.encode([a, b]))
    token = next(t for t in ids_a if t not in ids_b)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    tensors["model.embed_tokens.weight"][token] = float("inf")
    save_file(tensors, weights, metadata={"format": "pt"})

    engine = Engine.from_pretrained(path, dtype="float32", device="cpu")
    bad, good = engine.score([a, b])
    assert bad.error == NON_FINITE and bad.score is None and good.ok
    assert good.score == pytest.approx(clean.score([b])[0].score, rel=1e-5, abs=1e-6)   # fp32, packed vs alone
    out = tmp_path / "out.jsonl"
    summary = run_job(JobConfig(write_jsonl(tmp_path / "rows.jsonl", [{"messages": a}, {"messages": b}]), str(out),
                                path, quiet=True))
    assert summary["scored"] == 1 and [r["id"] for r in read_jsonl(out)] == [1]
    assert read_jsonl(str(out) + ".errors.jsonl")[0]["error"] == NON_FINITE
    server = Server(path, tmp_path / "server.log")
    try:
        items = httpx.post(server.url + "/v1/score", json={"conversations": [a, b]}, timeout=60).json()["results"]
        assert items[0] == {"index": 0, "error": NON_FINITE}
        assert items[1]["score"] == pytest.approx(good.score, rel=1e-5, abs=1e-6)
        resp = httpx.post(server.url + "/classify", json={"messages": a}, timeout=60)
        assert resp.status_code == 422 and NON_FINITE in resp.json()["error"]["message"]
    finally:
        server.stop()



def test_a_taken_port_exits_1(capfd):
    """uvicorn ends a server that cannot bind with SystemExit(3), `rmserve score`'s "rows failed" code;
    `rmserve serve` (run_until_stopped) returns 1 for a server that never started, uvicorn having
    logged why."""
    import uvicorn

    from rmserve.server.main import run_until_stopped

    async def app(scope, receive, send):   # never reached: the bind fails first
        raise AssertionError(scope)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=taken.getsockname()[1], lifespan="off"))
        assert run_until_stopped(server) == 1
    assert "address already in use" in capfd.readouterr().err
