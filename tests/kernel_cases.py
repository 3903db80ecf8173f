"""Kernel-vs-reference cases shared by tests/test_kernels.py (CPU, Triton interpreter) and
tests/gpu/test_kernels_cuda.py (CUDA). Each case draws fresh random inputs, poisons every output
the kernel allocates with NaN before the launch, and checks the kernel against its `*_ref`:

- same dtype: within TOL[dtype] of the PyTorch reference path;
- bf16/fp16: the kernel's error against an fp32 oracle (the same math on the inputs upcast)
  is at most twice the PyTorch path's error in that dtype (flash-attention's rule).
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from rmserve.config import RopeSpec
from rmserve.kernels import gate_combine, gather_project, rmsnorm, rope, silu_mul
from rmserve.kernels.dispatch import interpreting
from rmserve.model.rope import inv_freq

# Kernel vs the PyTorch path in the same dtype. fp32: only the summation order differs (a few
# ulps of O(1) values). bf16 (8 significant bits, ulp 2^-8 = 3.9e-3 near 1) / fp16 (ulp 9.8e-4
# near 1): the kernels round once where the PyTorch path rounds after every op, so they may
# differ by about two ulps of O(1)-O(4) values.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
LOW = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def poisoned_outputs():
    """Every float tensor allocated with torch.empty / empty_like inside is filled with NaN, so an
    element a kernel forgets to write shows up as NaN; under Triton's interpreter, an element that
    two programs write fails too (one_writer_per_element)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    try:
        with one_writer_per_element() if interpreting() else contextlib.nullcontext():
            yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


@contextlib.contextmanager
def one_writer_per_element():
    """Fails when two programs of a launch store to the same element. The interpreter runs the
    programs one after another, so such an overlap (a write race on a GPU: blocks of one output
    range running into another's) would only show as the later write winning, which may be the right
    value. Records, for every store, the addresses written and the program writing them (the
    interpreter's InterpreterBuilder.create_masked_store, which every tl.store goes through)."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_masked_store
    writer: dict[int, tuple] = {}   # address -> (launch, program) that first stored there
    clashes: list[tuple] = []
    launches = [0]

    def record(self, ptrs, value, mask, *rest):
        program = (launches[0], *self.grid_idx)
        written = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
        for address in written.ravel().tolist():
            first = writer.setdefault(address, program)
            if first[0] == program[0] and first != program:
                clashes.append((address, first[1:], program[1:]))
        return original(self, ptrs, value, mask, *rest)

    grid_call = interpreter.GridExecutor.__call__

    def count_launch(self, *args, **kwargs):
        launches[0] += 1
        return grid_call(self, *args, **kwargs)

    builder.create_masked_store = record
    interpreter.GridExecutor.__call__ = count_launch
    try:
        yield
    finally:
        builder.create_masked_store = original
        interpreter.GridExecutor.__call__ = grid_call
    assert not clashes, (f"{len(clashes)} elements written by two programs of one launch, e.g. address "
                         f"{clashes[0][0]} by programs {clashes[0][1]} and {clashes[0][2]}")


def check(got, want, dtype, what=""):
    assert not torch.isnan(got).any(), f"{what}: NaN in the kernel output (an element was not written)"
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


def check_2x(got, same_dtype, oracle, what=""):
    """Kernel error against the fp32 oracle <= 2x the PyTorch same-dtype path's error."""
    err_kernel = (got.float() - oracle).abs().max().item()
    err_torch = (same_dtype.float() - oracle).abs().max().item()
    assert err_kernel <= 2 * err_torch, f"{what}: kernel error {err_kernel:.3g} > 2 x PyTorch error {err_torch:.3g}"


def randn(g, *shape, dtype=torch.float32, device="cpu", scale=1.0):
    """Drawn from the CPU generator g, then moved: the same inputs on any device."""
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------

def case_rms_norm(g, T, H, dtype, device, residual: bool):
    x = randn(g, T, H, dtype=dtype, device=device, scale=3.0)
    r = randn(g, T, H, dtype=dtype, device=device, scale=3.0) if residual else None
    w = (1 + randn(g, H, device=device, scale=0.3)).to(dtype)
    eps = 1e-5
    with poisoned_outputs():
        got = rmsnorm.add_rms_norm(x, r, w, eps) if residual else (rmsnorm.rms_norm(x, w, eps), x)
    want = rmsnorm.add_rms_norm_ref(x, r, w, eps) if residual else (rmsnorm.rms_norm_ref(x, w, eps), x)
    check(got[0], want[0], dtype, "rms_norm")
    assert torch.equal(got[1], want[1]), "residual sum differs from x + residual"
    if dtype == torch.float16 and device == "cpu":   # the interpreter's fp16 arithmetic is real
        check_rms_norm_cast_points(got[0], want[1], w, eps)
    if dtype in LOW:
        total = (r.float() + x.float()) if residual else x.float()
        oracle = rmsnorm.rms_norm_ref(total, w.float(), eps)
        check_2x(got[0], want[0], oracle, "rms_norm")


def check_rms_norm_cast_points(got, x, w, eps):
    """The cast points of rms_norm exactly: `got` equals rms_norm_ref bit for bit, but for elements
    where the reference itself moves when its fp32 row statistic moves by 8 fp32 ulps (the kernel
    sums the squares in another order). Rounding is monotone, so the output for any statistic in
    that range is the output at one end of it. A kernel that skips the cast back to x's dtype before
    the weight (rounding once) is closer to the fp32 result, so the tolerance and 2x rules pass it;
    here about a fifth of the elements differ by an ulp."""
    xf = x.float()
    inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    lo, hi = (w * (xf * (inv * (1 + d))).to(x.dtype) for d in (-2.0 ** -20, 2.0 ** -20))
    assert ((lo == hi).float().mean() > 0.9).item(), "the exact check would be vacuous on these inputs"
    wrong = (got != lo) & (got != hi)
    assert not wrong.any(), (f"rms_norm: {int(wrong.sum())} of {got.numel()} elements differ from the reference's "
                             "cast points (x -> fp32 statistics -> x.dtype -> * weight)")


def case_silu_mul(g, T, inter, dtype, device):
    x = randn(g, T, 2 * inter, dtype=dtype, device=device, scale=2.0)
    with poisoned_outputs():
        got = silu_mul.silu_mul(x)
    want = silu_mul.silu_mul_ref(x)
    check(got, want, dtype, "silu_mul")
    if dtype in LOW:
        check_2x(got, want, silu_mul.silu_mul_ref(x.float()), "silu_mul")


def inv_freq_oracle(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """The inverse frequencies from the spec's formula (../shared/spec/reward-models.md, Llama-3 RoPE
    scaling) in float64 Python, written apart from rmserve/model/rope.py: the kernel and its
    reference both take inv_freq's output, so only this can see a mistake in it."""
    out = []
    for i in range(0, head_dim, 2):
        inv = 1.0 / spec.theta ** (i / head_dim)
        if spec.llama3_factor is not None:
            factor, low, high, orig = (spec.llama3_factor, spec.low_freq_factor, spec.high_freq_factor,
                                       spec.original_max_position)
            wavelen = 2 * math.pi / inv
            if wavelen > orig / low:
                inv = inv / factor
            elif wavelen >= orig / high:
                s = (orig / wavelen - low) / (high - low)
                inv = (1 - s) * inv / factor + s * inv
        out.append(inv)
    return torch.tensor(out, dtype=torch.float64)


def case_rope(g, T, n_q, n_kv, head_dim, dtype, device, llama3: bool, max_pos: int, factor: float = 8.0):
    spec = RopeSpec(theta=500000.0, llama3_factor=factor if llama3 else None)
    inv = inv_freq(spec, head_dim)
    # fp32 arithmetic on the way (pow, divide, the smoothing): a few fp32 ulps (1.2e-7 each) of relative error
    torch.testing.assert_close(inv.double(), inv_freq_oracle(spec, head_dim), rtol=2e-6, atol=0)
    inv = inv.to(device)
    pos = torch.randint(0, max_pos, (T,), generator=g).to(device)
    pos[0] = 0
    width = (n_q + 2 * n_kv) * head_dim
    qkv = randn(g, T, width, dtype=dtype, device=device)

    def split(t):
        q, k, v = t.split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
        return q.view(T, n_q, head_dim), k.view(T, n_kv, head_dim), v

    got, want, oracle = qkv.clone(), qkv.clone(), qkv.float()
    with one_writer_per_element() if interpreting() else contextlib.nullcontext():   # in place: no poisoning
        rope.rope(*split(got)[:2], pos, inv)
    rope.rope_ref(*split(want)[:2], pos, inv)
    rope.rope_ref(*split(oracle)[:2], pos, inv)
    assert torch.equal(split(got)[2], split(qkv)[2]), "rope wrote into v"
    check(got, want, dtype, "rope")
    if dtype in LOW:
        check_2x(got, want, oracle, "rope")


def case_qk_norm_rope(g, T, n_q, n_kv, head_dim, dtype, device, max_pos: int = 40960):
    """Qwen3's per-head q/k RMSNorm fused with RoPE (theta 1e6, eps 1e-6), in place inside a fused QKV
    output. In place, so nothing is allocated to poison: the norm changes every element, so one the
    kernel skips keeps its input value and fails the comparison."""
    inv = inv_freq(RopeSpec(theta=1000000.0), head_dim).to(device)
    pos = torch.randint(0, max_pos, (T,), generator=g).to(device)
    pos[0] = 0
    width = (n_q + 2 * n_kv) * head_dim
    qkv = randn(g, T, width, dtype=dtype, device=device, scale=4.0)   # projection outputs are not unit rows
    qw, kw = ((1 + randn(g, head_dim, device=device, scale=0.3)).to(dtype) for _ in range(2))
    eps = 1e-6

    def split(t):
        q, k, v = t.split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
        return q.view(T, n_q, head_dim), k.view(T, n_kv, head_dim), v

    got, want, oracle = qkv.clone(), qkv.clone(), qkv.float()
    rope.qk_norm_rope(*split(got)[:2], pos, inv, qw, kw, eps)
    rope.qk_norm_rope_ref(*split(want)[:2], pos, inv, qw, kw, eps)
    rope.qk_norm_rope_ref(*split(oracle)[:2], pos, inv, qw.float(), kw.float(), eps)
    assert torch.equal(split(got)[2], split(qkv)[2]), "qk_norm_rope wrote into v"
    check(got, want, dtype, "qk_norm_rope")
    if dtype in LOW:
        check_2x(got, want, oracle, "qk_norm_rope")


def case_gather_project(g, T, H, B, rows, w_dtype, h_dtype, device, bias: bool):
    hidden = randn(g, T, H, dtype=h_dtype, device=device)
    N = sum(rows)
    weight = randn(g, N, H, dtype=w_dtype, device=device, scale=H ** -0.5)
    b = randn(g, N, device=device) if bias else None
    indices = []
    for _ in rows:
        idx = torch.randint(0, T, (B,), generator=g)
        idx[0], idx[-1] = T - 1, 0              # the tensor's edges
        indices.append(idx.to(device))
    with poisoned_outputs():
        got = gather_project.gather_project(hidden, indices, weight, b, rows)
    oracle = gather_project.gather_project_ref(hidden, indices, weight, b, rows)   # fp32 math, same cast points
    assert got.dtype == torch.float32 and got.shape == (B, N)
    check(got, oracle, torch.float32, "gather_project")
    if w_dtype in LOW:   # the PyTorch head path: F.linear in the weight dtype, output rounded to it
        start, outs = 0, []
        for idx, n in zip(indices, rows):
            bb = None if b is None else b[start:start + n].to(w_dtype)
            outs.append(F.linear(hidden[idx].to(w_dtype), weight[start:start + n], bb))
            start += n
        check_2x(got, torch.cat(outs, dim=1), oracle, "gather_project")


def _check_combine(kernel, ref, u, values, tm, temperature, scale, names, dtype):
    """A gate+combine kernel against its reference and the fp32 oracle, output by output."""
    with poisoned_outputs():
        got = kernel(u, values, tm, temperature, scale)
    want = ref(u, values, tm, temperature, scale)
    oracle = ref(u.float(), values.float(), tm.float(), temperature, scale.float())
    for name, a, b, o in zip(names, got, want, oracle):
        what = f"{kernel.__name__} {name}"
        assert a.dtype == torch.float32
        check(a, o if dtype in LOW else b, torch.float32 if dtype in LOW else dtype, what)
        if dtype in LOW:
            check_2x(a, b, o, what)


def _gate_inputs(g, B, N, dtype, device):
    u = randn(g, B, N, dtype=dtype, device=device, scale=5.0)
    tm = randn(g, N, N, dtype=dtype, device=device, scale=N ** -0.5)
    scale = (torch.rand(1, generator=g) * 4 + 0.5).to(dtype).to(device)
    return u, tm, scale


def case_armo_combine(g, B, N, dtype, device):
    u, tm, scale = _gate_inputs(g, B, N, dtype, device)
    r = randn(g, B, N, dtype=dtype, device=device)
    _check_combine(gate_combine.armo_combine, gate_combine.armo_combine_ref, u, r, tm, 10.0, scale,
                   ("gates", "coefficients", "score"), dtype)


def case_qrm_combine(g, B, N, Q, dtype, device):
    u, tm, scale = _gate_inputs(g, B, N, dtype, device)
    R = randn(g, B, N, Q, dtype=dtype, device=device)
    _check_combine(gate_combine.qrm_combine, gate_combine.qrm_combine_ref, u, R, tm, 5.0, scale,
                   ("gates", "rewards", "score", "reward_quantiles"), dtype)
