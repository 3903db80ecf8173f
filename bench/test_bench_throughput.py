"""pytest-benchmark wrappers of bench/throughput.py and bench/latency.py, so that

    pytest bench/ --benchmark-only --benchmark-json=out.json

gives comparable JSON: rmserve packed (Engine.score_stream) against transformers padded batches
of 8/16/32 in input order and sorted by length, and one sample at a time, on the same samples
and weights; and one 512-token request. Each entry's extra_info carries tokens, tokens/s at the
median and the device.

CPU: the small shape, RMSERVE_BENCH_ROWS samples (default 16) so the whole file runs in a few
minutes, rmserve with a 4096-token budget (as bench/throughput.py on CPU). CUDA: the 8B shape (RMSERVE_BENCH_LAYERS to shorten it), 512 rows by default.
"""
import os

import pytest
import torch

import rmbench

DEVICE = os.environ.get("RMSERVE_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.startswith("cuda")
ROWS = int(os.environ.get("RMSERVE_BENCH_ROWS", 512 if CUDA else 16))
LAYERS = int(os.environ["RMSERVE_BENCH_LAYERS"]) if "RMSERVE_BENCH_LAYERS" in os.environ else None
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = 3 if CUDA else 1


@pytest.fixture(scope="module")
def setup():
    cfg = rmbench.llama_config("8b" if CUDA else "small", "bt", LAYERS)
    model = rmbench.random_model(cfg, DEVICE, DTYPE)
    tokenizer = rmbench.load_tokenizer() or rmbench.fallback_tokenizer()
    engine = rmbench.make_engine(model, tokenizer, share_prefix=False, max_batch_tokens=16384 if CUDA else 4096)
    work = rmbench.workload(ROWS, gating=rmbench.gating_pattern(tokenizer))
    hf = rmbench.hf_model(model, cfg)
    return {"cfg": cfg, "model": model, "tokenizer": tokenizer, "engine": engine, "work": work, "hf": hf}


def record(benchmark, work, computed=None):
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(device=DEVICE, samples=len(work.samples), tokens=work.tokens,
                                computed_tokens=computed or work.tokens, tokens_per_s=round(work.tokens / median, 1),
                                source=work.source)


def test_rmserve_packed(benchmark, setup):
    work = setup["work"]

    def run():
        rmbench.rmserve_score(setup["engine"], work.samples)
        rmbench.sync(DEVICE)

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, work)


@pytest.mark.parametrize("order", ["input", "sorted"])
@pytest.mark.parametrize("batch_size", [8, 16, 32])
def test_transformers_padded(benchmark, setup, batch_size, order):
    work, padded = setup["work"], []

    def run():
        padded.append(rmbench.hf_score(setup["hf"], work.samples, batch_size, order, DEVICE)[1])
        rmbench.sync(DEVICE)

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1 if CUDA else 0)
    record(benchmark, work, padded[-1])


def test_transformers_one_at_a_time(benchmark, setup):
    work = setup["work"]

    def run():
        rmbench.hf_score(setup["hf"], work.samples, 1, "input", DEVICE)
        rmbench.sync(DEVICE)

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1 if CUDA else 0)
    record(benchmark, work)


@pytest.mark.parametrize("graphs", [True, False] if CUDA else [False])
def test_latency_512(benchmark, setup, graphs):
    engine = setup["engine"] if graphs or not CUDA else rmbench.make_engine(
        setup["model"], setup["tokenizer"], share_prefix=False, enforce_eager=True)
    ids = [128000] + [1000 + i for i in range(511)]

    def run():
        engine.score([ids])
        rmbench.sync(DEVICE)

    benchmark.pedantic(run, rounds=30 if CUDA else 3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(device=DEVICE, tokens=512, graphs=graphs and CUDA)
