"""The kernels at the new backbones' real shapes: Qwen3's q/k RMSNorm fused with RoPE (head_dim 128,
q_size != hidden), Llama-3.2's RoPE (llama3 scaling with factor 32, head_dim 64), against their
`*_ref` in fp32/bf16/fp16 (the 2x rule for bf16/fp16, kernel_cases.py). CPU: Triton's interpreter;
with CUDA, the same cases on the GPU."""
import pytest
import torch

from rmserve.kernels.dispatch import interpreting

from . import kernel_cases as kc

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(),
                                reason="needs CUDA or Triton's CPU interpreter (TRITON_INTERPRET=1)")


@pytest.fixture
def g(rng):
    return torch.Generator().manual_seed(rng.randrange(1 << 30))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,n_q,n_kv,head_dim", [
    (3, 16, 8, 128),    # Qwen3-0.6B / 1.7B: 16 q heads of 128 (q_size 2048, hidden 1024 / 2048)
    (2, 32, 8, 128),    # Qwen3-4B / 8B
    (33, 3, 1, 16),     # odd head counts (padded head blocks); 33 tokens keep the 2x rule's maxima stable
])
def test_qk_norm_rope(g, T, n_q, n_kv, head_dim, dtype):
    kc.case_qk_norm_rope(g, T, n_q, n_kv, head_dim, dtype, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,n_q,n_kv,head_dim", [(4, 32, 8, 64), (3, 24, 8, 128)])   # Llama-3.2-1B, 3B
def test_rope_llama32(g, T, n_q, n_kv, head_dim, dtype):
    kc.case_rope(g, T, n_q, n_kv, head_dim, dtype, DEVICE, llama3=True, max_pos=131072, factor=32.0)


def test_qk_norm_weights_are_checked():
    from rmserve.kernels import rope

    q, k, pos, inv = torch.randn(2, 2, 8), torch.randn(2, 1, 8), torch.arange(2), torch.ones(4)
    with pytest.raises(ValueError, match="norm weights"):
        rope.qk_norm_rope(q, k, pos, inv, torch.ones(8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="norm weights"):
        rope.qk_norm_rope(q, k, pos, inv, torch.ones(8, dtype=torch.bfloat16), torch.ones(8), 1e-6)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's fp16 arithmetic is real; exact cast points on CPU")
def test_qk_norm_cast_points(g):
    """The q/k norm's cast points exactly (Qwen3RMSNorm: fp32 statistics, cast back to the dtype, times
    the weight), in fp16 under the interpreter. At position 0 RoPE is the identity (cos 1, sin 0), so
    the kernel's output is the normalised row itself; the 2x rule of test_qk_norm_rope passes a kernel
    that skips the cast back before the weight (it is closer to fp32), this check does not."""
    from rmserve.kernels import rope
    from rmserve.config import RopeSpec
    from rmserve.model.rope import inv_freq

    T, n_q, n_kv, D = 5, 8, 2, 128
    qkv = kc.randn(g, T, (n_q + 2 * n_kv) * D, dtype=torch.float16, scale=4.0)
    qw, kw = ((1 + kc.randn(g, D, scale=0.3)).to(torch.float16) for _ in range(2))
    q, k, _ = qkv.clone().split([n_q * D, n_kv * D, n_kv * D], dim=-1)
    q, k = q.view(T, n_q, D), k.view(T, n_kv, D)
    x_q, x_k = q.clone(), k.clone()
    rope.qk_norm_rope(q, k, torch.zeros(T, dtype=torch.long), inv_freq(RopeSpec(theta=1000000.0), D), qw, kw, 1e-6)
    kc.check_rms_norm_cast_points(q, x_q, qw, 1e-6)
    kc.check_rms_norm_cast_points(k, x_k, kw, 1e-6)
