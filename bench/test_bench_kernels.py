"""Microbenchmarks: each Triton kernel against its PyTorch reference at Llama-3-8B shapes, bf16,
on CUDA (skipped elsewhere: interpreter timings on CPU mean nothing).

    pytest bench/test_bench_kernels.py --benchmark-only --benchmark-json=kernels.json

Each round times CALLS back-to-back calls and one synchronize; extra_info carries the time per
call (us), the napkin-math memory traffic (GB/s over the bytes the op must move at least), the
number of GPU kernel launches of one call (torch.profiler) and the device name.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need CUDA")

CALLS = 20
DEV = "cuda"
BF16 = torch.bfloat16
T, H, HEADS, KV, D, INTER = 8192, 4096, 32, 8, 128, 14336     # 8B backbone, an 8k-token batch
B = 64                                                        # sequences in that batch


def launches(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


def bench(benchmark, fn, nbytes: int, impl: str):
    def run():
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()

    n_launch = launches(fn)
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)
    per_call = benchmark.stats.stats.median / CALLS
    benchmark.extra_info.update(impl=impl, us_per_call=round(per_call * 1e6, 2), launches=n_launch,
                                gb_per_s=round(nbytes / per_call / 1e9, 1), device=torch.cuda.get_device_name())


def rand(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


IMPLS = ["triton", "torch"]


@pytest.mark.parametrize("impl", IMPLS)
def test_add_rms_norm(benchmark, impl):
    from rmserve.kernels import rmsnorm

    x, r, w = rand(T, H), rand(T, H), rand(H)
    fn = rmsnorm.add_rms_norm if impl == "triton" else rmsnorm.add_rms_norm_ref
    bench(benchmark, lambda: fn(x, r, w, 1e-5), 4 * T * H * 2, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_rope(benchmark, impl):
    from rmserve.kernels import rope
    from rmserve.config import RopeSpec
    from rmserve.model.rope import inv_freq

    qkv = rand(T, (HEADS + 2 * KV) * D)
    q = qkv[:, :HEADS * D].view(T, HEADS, D)
    k = qkv[:, HEADS * D:(HEADS + KV) * D].view(T, KV, D)
    pos = torch.arange(T, device=DEV) % 2048
    inv = inv_freq(RopeSpec(theta=500000.0, llama3_factor=8.0), D).to(DEV)
    fn = rope.rope if impl == "triton" else rope.rope_ref
    bench(benchmark, lambda: fn(q, k, pos, inv), 2 * T * (HEADS + KV) * D * 2, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_silu_mul(benchmark, impl):
    from rmserve.kernels import silu_mul

    x = rand(T, 2 * INTER)
    fn = silu_mul.silu_mul if impl == "triton" else silu_mul.silu_mul_ref
    bench(benchmark, lambda: fn(x), 3 * T * INTER * 2, impl)


# First-stage head matrices per family at 8B size: (rows per index set, weight dtype, bias).
HEADS_8B = {
    "bt": ((1,), BF16, False),
    "armorm": ((19, 1024), BF16, True),
    "qrm": ((361, 1024), torch.float32, False),
    "urm_weights_mlp": ((4096,), torch.float16, True),
    "grm": ((1024,), BF16, True),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head", list(HEADS_8B))
def test_gather_project(benchmark, head, impl):
    """triton: one launch straight from the packed hidden states; torch: the head's own path,
    gather the rows, then one F.linear per matrix in its dtype."""
    from rmserve.kernels import gather_project

    rows, dtype, has_bias = HEADS_8B[head]
    hidden = rand(T, H)
    w = rand(sum(rows), H, dtype=dtype, scale=H ** -0.5)
    bias = torch.zeros(sum(rows), device=DEV) if has_bias else None
    idx = [torch.randint(0, T, (B,), device=DEV) for _ in rows]
    parts = list(zip(idx, w.split(list(rows)), (bias.to(dtype).split(list(rows)) if has_bias else [None] * len(rows))))
    if impl == "triton":
        def fn():
            return gather_project.gather_project(hidden, idx, w, bias, rows)
    else:
        def fn():
            return [torch.nn.functional.linear(hidden[i].to(dtype), wi, bi) for i, wi, bi in parts]
    bench(benchmark, fn, w.numel() * w.element_size() + len(rows) * B * H * 2, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", ["armorm", "qrm"])
def test_combine(benchmark, family, impl):
    from rmserve.kernels import gate_combine

    N, Q = 19, 19
    dtype = BF16 if family == "armorm" else torch.float32
    u, tm, scale = rand(B, N, dtype=dtype), rand(N, N, dtype=dtype), torch.ones(1, device=DEV, dtype=dtype)
    if family == "armorm":
        r = rand(B, N, dtype=dtype)
        fn = gate_combine.armo_combine if impl == "triton" else gate_combine.armo_combine_ref
        call = lambda: fn(u, r, tm, 10.0, scale)  # noqa: E731
    else:
        R = rand(B, N, Q, dtype=dtype)
        fn = gate_combine.qrm_combine if impl == "triton" else gate_combine.qrm_combine_ref
        call = lambda: fn(u, R, tm, 5.0, scale)  # noqa: E731
    bench(benchmark, call, B * N * (Q + 3) * 4, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["urm_normal", "qrm_quantiles"])
def test_sampling(benchmark, kind, impl):
    from rmserve.kernels import sampling

    K = 1024
    keys = torch.randint(-(1 << 62), 1 << 62, (B,), device=DEV)
    if kind == "urm_normal":
        mu, sigma, w = rand(B, 5, dtype=torch.float32), rand(B, 5, dtype=torch.float32).abs(), rand(B, 5, dtype=torch.float32)
        fn = sampling.sample_normal if impl == "triton" else sampling.sample_normal_ref
        bench(benchmark, lambda: fn(mu, sigma, w, keys, K), B * K * 6 * 4, impl)
    else:
        q = rand(B, 19, dtype=torch.float32)
        fn = sampling.sample_quantiles if impl == "triton" else sampling.sample_quantiles_ref
        bench(benchmark, lambda: fn(q, keys, K), B * K * 4, impl)
