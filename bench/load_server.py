"""Loopback load benchmark of `rmserve serve`, and the HTTP path's overhead over direct AsyncEngine calls.

    python bench/load_server.py                                   # tiny:armorm on CPU, synthetic chats
    python bench/load_server.py --model RLHFlow/ArmoRM-Llama3-8B-v0.1 --dtype bfloat16 \\
        --data ../shared/data/alpaca_eval_bon.jsonl.gz --concurrency 1,8,32,128

For each concurrency level C, C clients each send their next request as soon as the previous one
is answered (closed loop), `--requests` requests in all, each with `--per-request` conversations.
The same workload then runs in-process against an AsyncEngine (C coroutines calling
`await engine.score`), so the difference is what HTTP, JSON and validation add. Client and server
share this machine's cores; on a 2-core CPU the client's own work is part of what is measured.
"""
from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

WORDS = ("the reward model scores answers to questions about cats and code quickly and you are "
         "helpful please list three ideas for a good answer").split()


def synthetic(rng: random.Random, n: int) -> list[list[dict]]:
    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    return [[{"role": "user", "content": text(5, 40)}, {"role": "assistant", "content": text(10, 120)}]
            for _ in range(n)]


def from_file(path: str, rng: random.Random, n: int) -> list[list[dict]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line)["messages"] for line in f if line.strip()]
    return [rows[rng.randrange(len(rows))] for _ in range(n)]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def closed_loop(send, requests: list, concurrency: int) -> tuple[float, list[float]]:
    """Run `send(request)` over all requests with `concurrency` workers; (seconds, latencies)."""
    queue = list(reversed(requests))
    latencies: list[float] = []

    async def worker():
        while queue:
            req = queue.pop()
            t = time.perf_counter()
            await send(req)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def row(path: str, concurrency: int, n_requests: int, per: int, seconds: float, lat: list[float]) -> dict:
    return {"path": path, "concurrency": concurrency, "requests": n_requests, "per_request": per,
            "req_per_s": n_requests / seconds, "samples_per_s": n_requests * per / seconds,
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * percentile(lat, 0.99)}


def start_server(args, port: int) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "rmserve.cli", "serve", "--model", args.model, "--port", str(port),
           "--dtype", args.dtype, "--max-wait-ms", str(args.max_wait_ms), "--max-pending", "100000",
           "--log-level", "warning"]
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server did not start")
        time.sleep(0.3)


async def bench_http(url: str, requests: list, levels: list[int], per: int) -> list[dict]:
    import httpx

    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=max(levels))) as client:
        async def send(convs):
            r = await client.post("/v1/score", json={"conversations": convs})
            r.raise_for_status()

        await closed_loop(send, requests[: max(levels)], max(levels))   # warm-up
        for c in levels:
            seconds, lat = await closed_loop(send, requests, c)
            rows.append(row("http", c, len(requests), per, seconds, lat))
    return rows


async def bench_direct(args, requests: list, levels: list[int], per: int) -> list[dict]:
    from rmserve import Engine
    from rmserve.async_engine import AsyncEngine, BatchingConfig

    engine = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    ae = AsyncEngine(engine, BatchingConfig(max_wait_ms=args.max_wait_ms, max_pending=100000))

    async def send(convs):
        results = await ae.score(convs)
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]

    await closed_loop(send, requests[: max(levels)], max(levels))   # warm-up
    rows = []
    for c in levels:
        seconds, lat = await closed_loop(send, requests, c)
        rows.append(row("direct", c, len(requests), per, seconds, lat))
    await ae.close()
    return rows


def device_name(device: str | None) -> str:
    import torch

    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu x{os.cpu_count()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny:armorm")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--data", default=None, help="jsonl(.gz) with a `messages` column (default: synthetic chats)")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--per-request", type=int, default=1, help="conversations in one request")
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="append one JSON row per measurement to this file")
    args = p.parse_args()

    levels = [int(c) for c in args.concurrency.split(",")]
    rng = random.Random(args.seed)
    n = args.requests * args.per_request
    convs = from_file(args.data, rng, n) if args.data else synthetic(rng, n)
    requests = [convs[i:i + args.per_request] for i in range(0, n, args.per_request)]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(args, port)
    try:
        rows = asyncio.run(bench_http(f"http://127.0.0.1:{port}", requests, levels, args.per_request))
    finally:
        server.terminate()
        server.wait(60)
    rows += asyncio.run(bench_direct(args, requests, levels, args.per_request))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"model": args.model, "device": device_name(args.device), "commit": commit,
            "data": args.data or "synthetic", "max_wait_ms": args.max_wait_ms}
    print(f"{meta}")
    print(f"{'path':7} {'conc':>5} {'req/s':>9} {'samples/s':>10} {'p50 ms':>9} {'p99 ms':>9}")
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["path"])):
        print(f"{r['path']:7} {r['concurrency']:>5} {r['req_per_s']:>9.1f} {r['samples_per_s']:>10.1f} "
              f"{r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f}")
    by = {(r["path"], r["concurrency"]): r for r in rows}
    for c in levels:
        h, d = by[("http", c)], by[("direct", c)]
        print(f"HTTP overhead at concurrency {c}: p50 +{h['p50_ms'] - d['p50_ms']:.2f} ms, "
              f"throughput {h['req_per_s'] / d['req_per_s']:.2f}x of direct")
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({**meta, **r}) + "\n")


if __name__ == "__main__":
    main()
