"""Sampling kernels (kernels/sampling.py): the Triton draws equal the PyTorch Philox reference,
the same key gives the same draws in any batch, and the draws have the right distribution."""
import math

import pytest
import torch

from rmserve.kernels import sampling
from rmserve.kernels.dispatch import interpreting
from rmserve.kernels.launch import recording

from .kernel_cases import poisoned_outputs

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not interpreting(),
                                reason="CPU interpreter tests (tests/gpu/test_kernels_cuda.py runs these on CUDA)")

# Kernel vs reference: identical Philox bits and uniforms; the normal transform's log/sqrt/cos
# may differ in the last fp32 bits, scaled by sigma and summed over attributes (values O(10)).
DRAW_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def g(rng):
    return torch.Generator().manual_seed(rng.randrange(1 << 30))


def random_keys(g, n):
    return torch.randint(-(1 << 62), 1 << 62, (n,), generator=g, dtype=torch.int64)


def normal_inputs(g, B, A):
    mu = torch.randn(B, A, generator=g) * 3
    sigma = torch.rand(B, A, generator=g) * 2 + 0.1
    w = torch.randn(B, A, generator=g)
    return mu, sigma, w


def test_philox_ref_matches_triton_bits():
    import triton
    import triton.language as tl

    @triton.jit
    def bits(key_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        b0, b1, b2, b3 = tl.randint4x(tl.load(key_ptr), i)
        tl.store(out_ptr + i, b0.to(tl.int64))
        tl.store(out_ptr + N + i, b1.to(tl.int64))
        tl.store(out_ptr + 2 * N + i, b2.to(tl.int64))
        tl.store(out_ptr + 3 * N + i, b3.to(tl.int64))

    for key in (0, 1, -1, 0x123456789ABCDEF, -(1 << 63)):
        out = torch.empty(4 * 64, dtype=torch.int64)
        bits[(1,)](torch.tensor([key]), out, N=64)
        want = torch.cat(sampling.philox_ref(torch.tensor(key), torch.arange(64)))
        assert torch.equal(out & 0xFFFFFFFF, want), key


@pytest.mark.parametrize("B,A,K", [(1, 5, 1), (7, 5, 37), (3, 3, 300)])   # 300: two blocks of draws
def test_sample_normal_matches_ref(g, B, A, K):
    mu, sigma, w = normal_inputs(g, B, A)
    keys = random_keys(g, B)
    with poisoned_outputs():
        x, s = sampling.sample_normal(mu, sigma, w, keys, K)
    xr, sr = sampling.sample_normal_ref(mu, sigma, w, keys, K)
    assert x.shape == (B, A, K) and s.shape == (B, K)
    assert not x.isnan().any() and not s.isnan().any()
    torch.testing.assert_close(x, xr, **DRAW_TOL)
    torch.testing.assert_close(s, sr, **DRAW_TOL)


@pytest.mark.parametrize("B,Q,K", [(1, 19, 1), (6, 19, 41), (2, 3, 300), (3, 1, 5)])
def test_sample_quantiles_matches_ref(g, B, Q, K):
    q = torch.randn(B, Q, generator=g).cumsum(-1)
    keys = random_keys(g, B)
    with poisoned_outputs():
        d = sampling.sample_quantiles(q, keys, K)
    assert d.shape == (B, K) and not d.isnan().any()
    torch.testing.assert_close(d, sampling.sample_quantiles_ref(q, keys, K), **DRAW_TOL)


def test_same_key_same_draws_in_any_batch(g):
    B, A, K = 6, 5, 20
    mu, sigma, w = normal_inputs(g, B, A)
    keys = random_keys(g, B)
    x, s = sampling.sample_normal(mu, sigma, w, keys, K)
    x2, s2 = sampling.sample_normal(mu, sigma, w, keys, K)
    assert torch.equal(x, x2) and torch.equal(s, s2)                       # fixed seed: reproducible
    perm = torch.tensor([4, 1, 5])                                          # other rows, other order
    xp, sp = sampling.sample_normal(mu[perm], sigma[perm], w[perm], keys[perm], K)
    assert torch.equal(xp, x[perm]) and torch.equal(sp, s[perm])
    xk, _ = sampling.sample_normal(mu, sigma, w, keys, K + 13)              # more draws: a prefix
    assert torch.equal(xk[..., :K], x)
    other, _ = sampling.sample_normal(mu, sigma, w, keys + 1, K)            # another key: other draws
    assert not torch.isclose(other, x).any(dim=-1).all()

    q = torch.randn(B, 19, generator=g).sort(-1).values
    d = sampling.sample_quantiles(q, keys, K)
    assert torch.equal(sampling.sample_quantiles(q[perm], keys[perm], K), d[perm])
    assert torch.equal(sampling.sample_quantiles(q, keys, K + 7)[:, :K], d)


def test_normal_statistics(g):
    """K draws of N(mu, sigma^2): mean, variance and P(|z| < 1) within 5 standard errors."""
    B, A, K = 2, 3, 4096
    mu, sigma, w = normal_inputs(g, B, A)
    x, s = sampling.sample_normal(mu, sigma, w, random_keys(g, B), K)
    z = (x - mu[..., None]) / sigma[..., None]
    assert (z.mean(-1).abs() < 5 / math.sqrt(K)).all(), z.mean(-1)
    assert ((z.var(-1) - 1).abs() < 5 * math.sqrt(2 / K)).all(), z.var(-1)
    inside = (z.abs() < 1).float().mean(-1)
    p = math.erf(1 / math.sqrt(2))
    assert ((inside - p).abs() < 5 * math.sqrt(p * (1 - p) / K)).all(), inside
    # the score draws: sum_a w_a x_a ~ N(w . mu, sum_a w_a^2 sigma_a^2), attributes independent
    m, sd = (w * mu).sum(-1), ((w * sigma) ** 2).sum(-1).sqrt()
    zs = (s - m[:, None]) / sd[:, None]
    assert (zs.mean(-1).abs() < 5 / math.sqrt(K)).all() and ((zs.var(-1) - 1).abs() < 5 * math.sqrt(2 / K)).all()
    corr = torch.corrcoef(z[0])                                             # attributes x attributes
    assert (corr - torch.eye(A)).abs().max() < 5 / math.sqrt(K)


def test_quantile_statistics_and_tails(g):
    """Draws from a quantile function: P(X <= q_(q)) = tau_q, the empirical quantiles bracket the
    model's, and every draw lies in the tail rule's support."""
    B, Q, K = 2, 19, 4096
    q = (torch.rand(B, Q, generator=g) + 0.05).cumsum(-1)                   # strictly increasing
    d = sampling.sample_quantiles(q, random_keys(g, B), K)
    tau = (torch.arange(Q) + 1) / (Q + 1)
    below = (d[:, None, :] <= q[:, :, None]).float().mean(-1)              # [B, Q]
    assert ((below - tau).abs() < 5 * (tau * (1 - tau) / K).sqrt()).all(), below - tau
    emp = torch.quantile(d, tau, dim=-1).T                                  # [B, Q]
    assert (emp[:, 1:-1] >= q[:, :-2]).all() and (emp[:, 1:-1] <= q[:, 2:]).all()
    lo, hi = 2 * q[:, 0] - q[:, 1], 2 * q[:, -1] - q[:, -2]
    assert (d.min(-1).values >= lo - 1e-5).all() and (d.max(-1).values <= hi + 1e-5).all()
    assert (d.min(-1).values < q[:, 0]).all() and (d.max(-1).values > q[:, -1]).all()   # tails are used


def test_crossing_quantiles_are_sorted_first(g):
    q = torch.randn(3, 19, generator=g)
    keys = random_keys(g, 3)
    assert torch.equal(sampling.sample_quantiles(q, keys, 33), sampling.sample_quantiles(q.sort(-1).values, keys, 33))


def test_bad_arguments_raise():
    mu = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="keys"):
        sampling.sample_normal(mu, mu, mu, torch.zeros(3, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="keys"):
        sampling.sample_quantiles(mu, torch.zeros(2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="num_samples"):
        sampling.sample_quantiles(mu, torch.zeros(2, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="sigmas"):
        sampling.sample_normal(mu, torch.zeros(2, 4), mu, torch.zeros(2, dtype=torch.int64), 4)


def test_programs_loop_over_draw_blocks(g, monkeypatch):
    """Fewer programs than draw blocks (as at K near 2^24): each program's loop covers its blocks."""
    monkeypatch.setattr(sampling, "MAX_K_PROGRAMS", 2)
    B, A, K = 2, 5, 1000                       # 4 blocks of 256 normal draws, 16 of 64 quantile draws
    mu, sigma, w = normal_inputs(g, B, A)
    keys = random_keys(g, B)
    with poisoned_outputs(), recording() as rec:
        x, s = sampling.sample_normal(mu, sigma, w, keys, K)
        q = torch.randn(B, 19, generator=g).cumsum(-1)
        d = sampling.sample_quantiles(q, keys, K)
    assert [launch.grid for launch in rec.launches] == [(B, 2), (B, 2)]
    xr, sr = sampling.sample_normal_ref(mu, sigma, w, keys, K)
    torch.testing.assert_close(x, xr, **DRAW_TOL)
    torch.testing.assert_close(s, sr, **DRAW_TOL)
    torch.testing.assert_close(d, sampling.sample_quantiles_ref(q, keys, K), **DRAW_TOL)


def test_grid_within_cuda_limits_at_the_largest_k():
    """rmserve/sampling.py allows K < 2^24 draws; grid axis 1 holds at most 65,535 programs on CUDA.
    Checked on the launch record (recorded, not run) for many samples and the largest K."""
    from rmserve.sampling import check_sampling

    K = 2 ** 24 - 1
    check_sampling("urm", K, 0)                # allowed
    B = 70_000                                 # more samples than grid axis 1 would hold either
    meta = dict(device="meta")
    with recording(dry=True) as rec:
        sampling.sample_normal(*(torch.empty(B, 5, **meta) for _ in range(3)),
                               torch.empty(B, dtype=torch.int64, **meta), K)
        sampling.sample_quantiles(torch.empty(B, 19, **meta), torch.empty(B, dtype=torch.int64, **meta), K)
    assert len(rec.launches) == 2
    for launch in rec.launches:
        grid = launch.grid + (1,) * (3 - len(launch.grid))
        assert grid[0] <= 2 ** 31 - 1 and grid[1] <= 65535 and grid[2] <= 65535, (launch.spec.kernel, grid)
