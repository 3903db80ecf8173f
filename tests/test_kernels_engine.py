"""The engine's kernel path (EngineConfig(kernels="triton"), Triton interpreter on CPU) against
its PyTorch path (kernels="torch") on tiny checkpoints of every family; the fused head in bf16
against the PyTorch head; the dispatch switch; Engine.score(samples=K, seed=S)."""
import os
import random
import subprocess
import sys

import pytest
import torch

from rmserve import Engine
from rmserve.kernels.dispatch import TRITON_OPS, interpreting, select_kernels
from rmserve.loader import load_model
from rmserve.results import OUTPUT_FIELDS

from .helpers import FAMILIES, random_conversation
from .kernel_cases import check_2x
from .reference import head_ref, read_checkpoint

needs_interpreter = pytest.mark.skipif(torch.cuda.is_available() or not interpreting(),
                                       reason="runs the kernels in the CPU interpreter")

# fp32 on CPU, kernels vs PyTorch: only summation orders differ (fused projection, fused combine);
# the spec's 1e-5 relative bar.
RTOL, ATOL = 1e-5, 1e-5
# bf16 heads, fused vs PyTorch path: the fused projection accumulates in fp32 and rounds once,
# as a bf16 GEMM does; outputs O(1) may differ by about two bf16 ulps (2 x 3.9e-3) plus the
# fp32-vs-bf16 combine (ArmoRM computes its combine in fp32, more accurately than the bf16 path).
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def short_samples(engine: Engine, rng: random.Random, n: int) -> list[list[int]]:
    """Short token-id samples (the interpreter is slow): random tokens, the gating pattern where
    the family needs it, and two samples sharing a 20-token prompt (the shared-prefix path)."""
    pre = engine.preprocessor
    vocab = engine.spec.vocab_size

    def tokens(k):
        return [rng.randrange(vocab) for _ in range(k)]

    def sample(prompt):
        gate = list(pre.gating_pattern) if pre.needs_gate else []
        return prompt + gate + tokens(rng.randint(1, 6))

    out = [sample([pre.bos_id] + tokens(rng.randint(1, 8))) for _ in range(n)]
    shared = [pre.bos_id] + tokens(20)
    return out + [sample(shared), sample(shared)]


def assert_results_close(got, want, what):
    for g, w in zip(got, want):
        assert g.ok and w.ok, (g.error, w.error)
        for name in ("score",) + OUTPUT_FIELDS:
            a, b = getattr(g, name), getattr(w, name)
            assert (a is None) == (b is None), f"{what} {name}"
            if a is not None:
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"{what} {name}: {m}")


VARIANTS = [(f, {}) for f in FAMILIES] + [("bt", {"num_labels": 3}), ("grm", {"vhead_layer_type": "linear"}),
                                          ("qrm", {"store_transform": False})]


@needs_interpreter
@pytest.mark.parametrize("family,settings", VARIANTS, ids=[f + "-".join([""] + list(s)) for f, s in VARIANTS])
def test_kernel_path_equals_torch_path(tiny_model, family, settings, rng):
    path = tiny_model(family, **settings)
    ref = Engine.from_pretrained(path, dtype="float32", device="cpu", kernels="torch")
    fused = Engine.from_pretrained(path, dtype="float32", device="cpu", kernels="triton")
    assert ref.config.kernels == "torch" and fused.config.kernels == "triton"
    assert fused.model.head.projection is not None
    samples = short_samples(ref, rng, 3)
    k = 5 if family in ("urm", "qrm") else 0
    seed = rng.randrange(1 << 40)
    assert_results_close(fused.score(samples, samples=k, seed=seed), ref.score(samples, samples=k, seed=seed), family)


def _bf16_head(path, ops=None):
    model = load_model(path, device="cpu", dtype=torch.bfloat16)
    if ops is not None:
        model.head.use_kernels(ops)
    return model.head


@needs_interpreter
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_head_in_bf16(tiny_model, family, rng):
    """Head on bf16 hidden states (each family's precision policy: QRM head fp32, URM weights MLP
    fp16): fused vs PyTorch path, and the fused error against an fp32 oracle (the spec math of
    tests/reference.py in fp32 on the same hidden rows) at most 2x the PyTorch path's; for QRM,
    whose head is fp32 in a bf16 engine, within the fp32 tolerance of the oracle."""
    path = tiny_model(family)
    torch_head, fused_head = _bf16_head(path), _bf16_head(path, TRITON_OPS)
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    T, B = 97, 64
    hidden = torch.randn(T, torch_head_hidden(torch_head), generator=g).to(torch.bfloat16)
    last = torch.randint(0, T, (B,), generator=g)
    last[0], last[-1] = T - 1, 0
    gate = torch.randint(0, T, (B,), generator=g) if torch_head.needs_gate else None
    want = torch_head.packed(hidden, last, gate)
    got = fused_head.packed(hidden, last, gate)
    fp32_head = all(p.linear.weight.dtype == torch.float32 for p in torch_head.first_stage())
    cfg, tensors = read_checkpoint(path)
    oracle = [head_ref(cfg, tensors, hidden[last[b]].float(), None if gate is None else hidden[gate[b]].float())
              for b in range(B)]
    for name, value in got.items():
        assert value.dtype == torch.float32 and not value.isnan().any()
        torch.testing.assert_close(value, want[name], **BF16_TOL, msg=lambda m: f"{family} {name}: {m}")
        if name in oracle[0]:
            ref = torch.stack([o[name].float().reshape(value.shape[1:]) for o in oracle])
            if fp32_head:   # QRM: the head runs in fp32 in a bf16 engine; both paths are fp32-accurate
                torch.testing.assert_close(value, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{family} {name}: {m}")
            else:
                check_2x(value, want[name], ref, f"{family} {name}")


def torch_head_hidden(head) -> int:
    return head.first_stage()[0].linear.in_features


def test_dispatch_choices():
    cpu = torch.device("cpu")
    assert select_kernels("torch", cpu).name == "torch"
    assert select_kernels("auto", cpu).name == "torch"
    with pytest.raises(ValueError, match="kernels must be one of"):
        select_kernels("cuda", cpu)


def test_triton_on_cpu_without_interpreter_raises():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch; from rmserve.kernels.dispatch import select_kernels\n"
            "try:\n select_kernels('triton', torch.device('cpu'))\nexcept ValueError as e:\n print('ERR', e)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR kernels='triton' needs a CUDA device" in out.stdout, out.stdout + out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout


@pytest.fixture(scope="module")
def urm_engines(tmp_path_factory):
    from rmserve.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(str(tmp_path_factory.mktemp("urm")), "urm")
    return (Engine.from_pretrained(path, dtype="float32", device="cpu", kernels="torch"),
            Engine.from_pretrained(path, dtype="float32", device="cpu", kernels="torch", max_batch_seqs=1,
                                   share_prefix=False))


def test_samples_do_not_depend_on_the_batch(urm_engines, rng):
    engine, one_by_one = urm_engines
    convs = [random_conversation(rng) for _ in range(4)]
    seed = rng.randrange(1 << 63)
    full = engine.score(convs + [[]], samples=7, seed=seed)
    assert full[-1].error and full[-1].samples is None
    for r in full[:-1]:
        assert len(r.samples) == 5 and all(len(s) == 7 for s in r.samples) and len(r.score_samples) == 7
        implied = [sum(w * s[k] for w, s in zip(r.weights, r.samples)) for k in range(7)]
        assert implied == pytest.approx(r.score_samples, rel=1e-5, abs=1e-5)
    # Other batches, other order: the same random stream; the head outputs themselves may move in
    # the last fp32 bits with the batch's packing, hence the tolerance (the kernel tests check exact
    # equality for equal inputs).
    alone = one_by_one.score([convs[2], convs[0]], samples=7, seed=seed)
    torch.testing.assert_close(torch.tensor(alone[0].samples), torch.tensor(full[2].samples), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(alone[1].score_samples), torch.tensor(full[0].score_samples),
                               rtol=1e-5, atol=1e-5)
    again = engine.score([convs[0]], samples=7, seed=seed + 1)
    assert again[0].score_samples != full[0].score_samples
    assert engine.score([convs[0]])[0].samples is None


def test_urm_sample_moments(urm_engines, rng):
    engine, _ = urm_engines
    r = engine.score([random_conversation(rng)], samples=4000, seed=rng.randrange(1 << 30))[0]
    x = torch.tensor(r.samples)
    mu, sigma = torch.tensor(r.means), torch.tensor(r.sigmas)
    assert ((x.mean(1) - mu).abs() < 5 * sigma / 4000 ** 0.5).all()
    assert ((x.std(1) / sigma - 1).abs() < 5 * (0.5 / 4000) ** 0.5).all()


def test_qrm_samples(tiny_model, rng):
    engine = Engine.from_pretrained(tiny_model("qrm"), dtype="float32", device="cpu", kernels="torch")
    convs = [random_conversation(rng) for _ in range(2)]
    res = engine.score(convs, samples=2000, seed=3)
    for r in res:
        assert r.samples is None and len(r.score_samples) == 2000
        q = sorted(r.reward_quantiles)
        assert 2 * q[0] - q[1] - 1e-5 <= min(r.score_samples) and max(r.score_samples) <= 2 * q[-1] - q[-2] + 1e-5
        below = sum(s <= q[9] for s in r.score_samples) / 2000                 # the median level, tau = 0.5
        assert abs(below - 0.5) < 5 * (0.25 / 2000) ** 0.5
    swapped = engine.score(convs[::-1], samples=2000, seed=3)[1].score_samples
    torch.testing.assert_close(torch.tensor(swapped), torch.tensor(res[0].score_samples), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bt", "armorm", "grm"])
def test_samples_need_a_distributional_head(tiny_model, family):
    engine = Engine.from_pretrained(tiny_model(family), dtype="float32", device="cpu")
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ValueError, match="only distributional heads"):
        engine.score([conv], samples=3)
    assert engine.score([conv], samples=0)[0].ok


def test_bad_sampling_arguments(urm_engines):
    engine, _ = urm_engines
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for bad in ({"samples": -1}, {"samples": 2.0}, {"samples": 2, "seed": -1}, {"samples": 2, "seed": "x"}):
        with pytest.raises(ValueError):
            engine.score([conv], **bad)
