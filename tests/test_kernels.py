"""Each Triton kernel against its PyTorch reference, in Triton's CPU interpreter (conftest sets
TRITON_INTERPRET=1). Odd sizes on purpose: hidden sizes that are not powers of two, one and many
sequences, indices at the tensor's edges. Cases live in kernel_cases.py (shared with the GPU file)."""
import pytest
import torch

from rmserve.kernels.dispatch import interpreting

from . import kernel_cases as kc

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = "cpu"

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not interpreting(),
                                reason="CPU interpreter tests (tests/gpu/test_kernels_cuda.py runs these on CUDA)")


@pytest.fixture
def g(rng):
    return torch.Generator().manual_seed(rng.randrange(1 << 30))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,H", [(1, 37), (6, 64), (13, 100)])
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
def test_rms_norm(g, T, H, dtype, residual):
    kc.case_rms_norm(g, T, H, dtype, DEVICE, residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,inter", [(1, 23), (7, 64), (3, 1100)])   # 1100: two column blocks
def test_silu_mul(g, T, inter, dtype):
    kc.case_silu_mul(g, T, inter, dtype, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,n_q,n_kv,head_dim", [(1, 4, 2, 16), (9, 3, 1, 32), (5, 8, 8, 8)])
@pytest.mark.parametrize("llama3", [True, False], ids=["llama3", "plain"])
def test_rope(g, T, n_q, n_kv, head_dim, dtype, llama3):
    kc.case_rope(g, T, n_q, n_kv, head_dim, dtype, DEVICE, llama3, max_pos=131072)


@pytest.mark.parametrize("w_dtype,h_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
                                             (torch.float16, torch.float16)], ids=str)
@pytest.mark.parametrize("T,H,B,rows,bias", [
    (1, 37, 1, (1,), False),            # one sequence, one output (BT)
    (50, 70, 5, (19, 37), True),        # two index sets (ArmoRM/QRM: rewards + gating layer)
    (90, 129, 40, (10, 33), False),     # 40 sequences: two batch blocks; 33 rows: two column blocks
    (12, 64, 3, (75,), True),
])
def test_gather_project(g, T, H, B, rows, bias, w_dtype, h_dtype):
    kc.case_gather_project(g, T, H, B, rows, w_dtype, h_dtype, DEVICE, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N", [(1, 19), (6, 5)])
def test_armo_combine(g, B, N, dtype):
    kc.case_armo_combine(g, B, N, dtype, DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,N,Q", [(1, 19, 19), (4, 5, 3), (3, 2, 1)])
def test_qrm_combine(g, B, N, Q, dtype):
    kc.case_qrm_combine(g, B, N, Q, dtype, DEVICE)


def test_bad_shapes_raise():
    from rmserve.kernels import gate_combine, gather_project, rmsnorm, rope, silu_mul

    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm.rms_norm(x, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rmsnorm.add_rms_norm(x, torch.randn(3, 9), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="gate_up"):
        silu_mul.silu_mul(torch.randn(3, 7))
    with pytest.raises(ValueError, match="inv_freq"):
        rope.rope(torch.randn(2, 2, 8), torch.randn(2, 1, 8), torch.arange(2), torch.ones(3))
    with pytest.raises(ValueError, match="weight"):
        gather_project.gather_project(x, [torch.tensor([0])], torch.randn(4, 9), None, [4])
    with pytest.raises(ValueError, match="indices"):
        gather_project.gather_project(x, [torch.tensor([0.0])], torch.randn(4, 8), None, [4])
    with pytest.raises(ValueError, match="transform"):
        gate_combine.armo_combine(torch.randn(2, 5), torch.randn(2, 5), torch.randn(5, 4), 1.0, torch.ones(1))


def test_strided_index_tensors_raise():
    """The kernels read a 1-D index, position or key tensor at ptr + i: a strided view (every other
    entry of a larger tensor, say) would be read as its neighbours' values, a silent wrong result, so
    it is refused as a bad shape is."""
    from rmserve.kernels import gather_project, rope, sampling

    every_other = torch.tensor([0, 9, 1, 9, 2])[::2]          # values 0, 1, 2; the kernel would read 0, 9, 1
    with pytest.raises(ValueError, match="contiguous"):
        gather_project.gather_project(torch.randn(10, 8), [every_other], torch.randn(4, 8), None, [4])
    with pytest.raises(ValueError, match="contiguous"):
        rope.rope(torch.randn(3, 2, 8), torch.randn(3, 1, 8), every_other, torch.rand(4))
    with pytest.raises(ValueError, match="contiguous"):
        sampling.sample_quantiles(torch.randn(3, 5), every_other.long(), 8)
