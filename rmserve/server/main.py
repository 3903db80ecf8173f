"""`rmserve serve`: load a model, put an AsyncEngine and the app in front of it, run uvicorn.

Importing this module is cheap (no fastapi, torch or uvicorn); `serve` imports them.
SIGTERM / Ctrl-C: uvicorn stops accepting connections, lets in-flight requests finish (up to
--drain-timeout), then the AsyncEngine drains and the process exits 0. (uvicorn re-raises the
signal once it has shut down, so that a default handler would end the process by it: status 143
for SIGTERM, which a supervisor reads as a crash. `run_until_stopped` takes that re-raised signal.)
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

API_KEY_ENV = "RMSERVE_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")   # uvicorn's


def add_parser(sub) -> None:
    from ..flags import HelpFormatter, add_engine_flags, add_model_flag, add_quantization_flags, add_step_flags

    s = sub.add_parser("serve", help="serve a reward model over HTTP", formatter_class=HelpFormatter,
                       description="Serve a reward model over HTTP: POST /v1/score, POST /get_reward (OpenRLHF), "
                                   "POST /classify (vLLM), POST /v1/embeddings (SGLang), GET /health, "
                                   "/v1/models, /metrics; OpenAPI at /docs.")
    add_model_flag(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    s.add_argument("--served-model-name", default=None, help="name in /v1/models (default: --model)")
    add_engine_flags(s)
    s.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="longest the oldest queued sample waits for a fuller batch")
    s.add_argument("--max-pending", type=int, default=4096,
                   help="samples admitted and not yet answered; past it requests get 429")
    s.add_argument("--max-items", type=int, default=256, help="conversations or queries in one request")
    s.add_argument("--max-samples", type=int, default=1024, help="largest `samples` (draws per conversation)")
    s.add_argument("--max-sample-chars", type=int, default=1_000_000, help="characters in one sample")
    s.add_argument("--max-body-bytes", type=int, default=32 * 2 ** 20,
                   help="largest request body; larger ones get 413 (default: 32 MiB)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM or Ctrl-C")
    s.add_argument("--strip-padding", action="append", default=[], metavar="TEXT",
                   help="/get_reward: remove this string (a pad token, e.g. '<|end_of_text|>') from both ends "
                        "of every query, however often it repeats; may be given several times")
    s.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer <key>' (prefer the {API_KEY_ENV} environment variable)")
    s.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="uvicorn's log level")
    add_quantization_flags(s)
    add_step_flags(s)
    s.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import ServerConfig, create_app
    except ModuleNotFoundError as e:   # `pip install -e .` alone has no server packages
        print(f"rmserve serve: {e.name} is not installed; install the server extra: pip install -e \".[server]\"",
              file=sys.stderr)
        return 2
    from ..async_engine import AsyncEngine, BatchingConfig
    from ..device_check import check_device
    from ..engine import Engine
    from ..flags import engine_settings

    for flag, value, least in (("--port", args.port, 0), ("--max-wait-ms", args.max_wait_ms, 0),
                               ("--max-pending", args.max_pending, 1), ("--max-items", args.max_items, 1),
                               ("--max-samples", args.max_samples, 0),
                               ("--max-sample-chars", args.max_sample_chars, 1),
                               ("--max-body-bytes", args.max_body_bytes, 1),
                               ("--drain-timeout", args.drain_timeout, 0)):
        if value < least or (flag == "--port" and value > 65535):
            print(f"rmserve serve: {flag} {value}: must be " + ("a TCP port, 0-65535" if flag == "--port" else
                                                                  f"at least {least}"), file=sys.stderr)
            return 2
    if args.max_items > args.max_pending:
        print(f"rmserve serve: --max-items ({args.max_items}) cannot exceed --max-pending ({args.max_pending})",
              file=sys.stderr)
        return 2
    try:
        check_device(args.device)
        engine = Engine.from_pretrained(args.model, **engine_settings(args))
    except ValueError as e:   # ConfigError, CheckpointError, a bad setting: one line, not a traceback
        print(f"rmserve serve: {e}", file=sys.stderr)
        return 2
    if args.model.startswith("tiny:"):
        print(f"note: {args.model} has random weights; its scores are meaningless", file=sys.stderr)
    config = ServerConfig(
        model_name=args.served_model_name or args.model, api_key=args.api_key or os.environ.get(API_KEY_ENV),
        max_items=args.max_items, max_samples=args.max_samples, strip_padding=tuple(args.strip_padding),
        max_sample_chars=args.max_sample_chars, max_body_bytes=args.max_body_bytes,
        drain_timeout_s=args.drain_timeout)
    batching = BatchingConfig(max_wait_ms=args.max_wait_ms, max_pending=args.max_pending)
    app = create_app(AsyncEngine(engine, batching), config)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.drain_timeout, access_log=False))
    return run_until_stopped(server)


def run_until_stopped(server) -> int:
    """Runs a uvicorn.Server until SIGTERM or Ctrl-C has shut it down: 0 then, 1 if it never started
    (the port taken, say; uvicorn has logged why, and exits by SystemExit(3), its STARTUP_FAILURE in
    0.54, which is `rmserve score`'s "rows failed" code: taken here as 1).

    uvicorn's Server.serve installs its own SIGINT/SIGTERM handlers, shuts down gracefully on the
    first signal, restores the handlers it found and raises the signal again (`Server.capture_signals`,
    read in uvicorn 0.54). The SIGTERM handler found here takes that second delivery (and a
    SIGTERM that comes before uvicorn has installed its own, by asking the server to stop), so a
    drained server exits 0 rather than by the signal; the re-raised SIGINT is Python's
    KeyboardInterrupt, taken here as uvicorn.run does."""
    def stop(signum, frame):
        server.should_exit = True

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    except SystemExit:
        if server.started:
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 1
