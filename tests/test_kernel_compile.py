"""Every Triton kernel specialization the engine launches compiles for real GPUs (sm_80, sm_90),
with no GPU: kernels/launch.py records the engine's launches, kernels/compile.py compiles them.

The recorder's key is checked on known arguments here always. The full check is a separate CI
stage (RMSERVE_KERNEL_COMPILE=1; bench/compile_kernels.sh, which .ci/run runs after the suite;
minutes): the real engine (`Engine.score` on packed batches, kernels="triton") runs a one-layer
model of every backbone in rmserve/shapes.py with its checkpoints' heads (shapes.families), in bf16 and
fp16, on batches of 1, 5, 16, 24 and 32 samples (every block size and integer specialization of
the launchers; a process reward model's samples end with one step token, so its step rows are as many),
a shared-prefix batch, and URM/QRM sampling with small and large K, recorded
without running the kernel bodies (`recording(dry=True)`: specializations do not depend on
values). Each distinct specialization is compiled for sm_80 and sm_90 by
`python -m rmserve.kernels.compile` in a separate process (Triton's compiler, not the
interpreter), with this Python and with each interpreter in RMSERVE_COMPILE_PYTHON (the GPU
image's Triton 3.6 in bench/compile_kernels.sh). RMSERVE_KERNEL_RECORD=path keeps the record.
Fails on a compile error, shared memory over the target's limit, register spills, a block over
the register file, a grid over CUDA's limits, or a kernel that no recorded run launched. A new
kernel, backbone or family is covered without editing this file.
"""
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest
import torch

import rmserve.kernels
from rmserve import shapes
from rmserve.engine import Engine, EngineConfig, load_tokenizer
from rmserve.kernels.dispatch import interpreting
from rmserve.kernels.launch import Specialization, launch, recording, specialize

GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)   # CUDA's maximum grid size per axis
BATCH_SIZES = (1, 5, 16, 24, 32)              # B == 1, B < 16, B == 16, 16 < B < 32, B % 16 == 0 > 16
SAMPLE_COUNTS = (1, 300)
DTYPES = (torch.bfloat16, torch.float16)


def kernel_modules():
    names = [m.name for m in pkgutil.iter_modules(rmserve.kernels.__path__)]
    return [importlib.import_module(f"rmserve.kernels.{name}") for name in names]


def launched_kernels() -> dict[str, object]:
    """Every kernel a launcher may launch: the module-level Triton functions named *_kernel."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    out = {}
    for module in kernel_modules():
        for name, obj in vars(module).items():
            if isinstance(obj, (JITFunction, InterpretedFunction)) and name.endswith("_kernel"):
                out[f"{module.__name__}:{name}"] = obj
    return out


# ------------------------------------------------------------------------------------------
# always run: the recorder's key and the one launch point
# ------------------------------------------------------------------------------------------

def test_every_launch_goes_through_launch():
    """A launcher that calls kernel[grid](...) itself would be missing from the record."""
    for key, kernel in launched_kernels().items():
        module, name = key.split(":")
        source = open(importlib.import_module(module).__file__, encoding="utf-8").read()
        assert f"{name}[" not in source, f"{key} is launched directly; call kernels.launch.launch(kernel, grid, ...)"


@pytest.mark.skipif(not interpreting(), reason="the CPU interpreter runs the probe kernel")
def test_specialization_is_tritons_key():
    """The key of Triton's JIT (3.6 to 3.8): pointer dtype and 16-byte alignment, i32/i64 by value,
    1 as a constant, multiples of 16, floats and bools by type, do_not_specialize honoured."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n"])
    def probe(x_ptr, y_ptr, a, b, c, d, n, f, flag, BLOCK: tl.constexpr):
        pass

    x = torch.zeros(64, dtype=torch.bfloat16)
    y = torch.zeros(64, dtype=torch.int64)
    with recording() as rec:
        launch(probe, (1,), x, y[1:], 1, 32, 17, 2 ** 31, 16, 0.5, True, BLOCK=8, num_warps=2)
    spec = rec.launches[0].spec
    assert dict(spec.signature) == {"x_ptr": "*bf16", "y_ptr": "*i64", "a": "constexpr", "b": "i32", "c": "i32",
                                    "d": "i64", "n": "i32", "f": "fp32", "flag": "u1", "BLOCK": "constexpr"}
    assert spec.divisible == ("x_ptr", "b", "d")          # y_ptr is 8 bytes past a 16-byte boundary
    assert spec.constexprs == (("a", 1), ("BLOCK", 8))
    assert (spec.num_warps, spec.num_stages) == (2, 3)
    assert Specialization.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert rec.launches[0].grid == (1,)
    with recording(dry=True) as dry:                      # recorded, not run
        launch(probe, (4, 2), x, y, 2, 32, 17, 2 ** 31, 16, 0.5, True, BLOCK=8, num_warps=2)
    assert dry.launches[0].grid == (4, 2) and "y_ptr" in dry.launches[0].spec.divisible
    assert specialize(probe, (x, y, 2, 32, 17, 2 ** 31, 16, 0.5, True), {"BLOCK": 8}).num_warps == 4


# ------------------------------------------------------------------------------------------
# the separate CI stage: record the engine's launches, compile them for sm_80 and sm_90
# ------------------------------------------------------------------------------------------

COMPILE = os.environ.get("RMSERVE_KERNEL_COMPILE") == "1"
needs_stage = pytest.mark.skipif(not COMPILE or not interpreting(),
                                 reason="the kernel compile stage: RMSERVE_KERNEL_COMPILE=1 (.ci/run runs it)")


def _fill(name: str, t: torch.Tensor) -> None:
    """Small tensors get small random values; large ones stay uninitialised (nothing reads them for a value)."""
    if t.numel() < 1 << 22:
        t.normal_(0.0, 0.02)


def exercise(engine: Engine) -> None:
    """The calls whose launches are recorded: every batch size class, a shared prompt, sampling."""
    bos = engine.spec.bos_token_id
    gate = list(engine.preprocessor.gating_pattern)      # ArmoRM/QRM: each sample gates on it
    steps = engine.preprocessor.steps                    # a PRM: one step each, so its head rows are the samples'
    end = [steps.token_id] if steps else []

    def plain(n, start):   # distinct second tokens: no shared prompt
        return [[bos, 1000 + start + i] + gate + end for i in range(n)]

    for n in BATCH_SIZES:
        engine.score(plain(n, 100 * n))
    prompt = [bos] + list(range(5000, 5020)) + gate      # 16+ common tokens: one group, prompt run once
    engine.score([prompt + [6000 + i] + end for i in range(4)] + plain(3, 9000))
    if engine.family in ("urm", "qrm"):
        for k in SAMPLE_COUNTS:
            engine.score(plain(5, 8000), samples=k, seed=k)


@pytest.fixture(scope="module")
def engine_launches(tiny_model):
    """{(backbone, dtype, family): [Launch]} from one-layer engines of every real shape."""
    tokenizer = load_tokenizer(tiny_model("bt"))          # the ids are given; it renders nothing
    step_tokenizer = load_tokenizer(tiny_model("qwen2_prm"))   # a PRM's engine looks its step token up
    out = {}
    for backbone in shapes.BACKBONES:
        for dtype in DTYPES:
            for family in shapes.families(backbone):
                model = shapes.model_of_shape(shapes.config(backbone, family, layers=1), "cpu", dtype, fill=_fill)
                tok = step_tokenizer if model.spec.head.step_token else tokenizer
                engine = Engine(model, tok, EngineConfig(kernels="triton"))
                with recording(dry=True) as rec:
                    exercise(engine)
                out[backbone, str(dtype), family] = rec.launches
                del engine, model
    return out


@needs_stage
def test_workload_covers_every_launcher_branch(engine_launches):
    """Each engine launched every kernel of its path, and its head projection every block size and
    integer specialization of B (so a change to how the engine batches cannot silently drop one)."""
    recorded = {launch.spec.kernel for launches in engine_launches.values() for launch in launches}
    missing = set(launched_kernels()) - recorded
    assert not missing, f"never launched by the recorded engine runs: {sorted(missing)}; extend exercise()"
    for key, launches in engine_launches.items():
        seen = set()
        for launch_ in launches:
            spec = launch_.spec
            if spec.kernel.endswith(":_gather_project_kernel"):
                consts = dict(spec.constexprs)
                seen.add((consts["BLOCK_B"], consts.get("B"), "B" in spec.divisible))
        want = {(16, 1, False), (16, None, False), (16, None, True), (32, None, False), (32, None, True)}
        assert want <= seen, f"{key}: head projection launched {sorted(seen, key=str)}, missing {want - seen}"


@needs_stage
def test_grids_within_cuda_limits(engine_launches):
    for key, launches in engine_launches.items():
        for launch_ in launches:
            grid = launch_.grid + (1,) * (3 - len(launch_.grid))
            assert all(0 < g <= limit for g, limit in zip(grid, GRID_LIMITS)), (key, launch_.spec.kernel, grid)


def compile_with(python: str, record: str, out: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([python, "-m", "rmserve.kernels.compile", record, "--capabilities", "80,90",
                           "--jobs", str(os.cpu_count() or 1), "--json", out], env=env, capture_output=True, text=True)
    print(proc.stdout, proc.stderr[-4000:], sep="\n")
    assert proc.returncode in (0, 1) and os.path.exists(out), f"{python}: the compile crashed\n{proc.stderr[-4000:]}"
    with open(out, encoding="utf-8") as f:
        return json.load(f)


@needs_stage
def test_every_specialization_compiles(engine_launches, tmp_path):
    from rmserve.kernels.compile import problems

    specs = list(dict.fromkeys(launch_.spec for launches in engine_launches.values() for launch_ in launches))
    record = os.environ.get("RMSERVE_KERNEL_RECORD") or str(tmp_path / "record.json")   # kept where named
    with open(record, "w", encoding="utf-8") as f:
        json.dump({"specializations": [s.to_json() for s in specs]}, f, indent=1)
    print(f"\n{len(specs)} distinct specializations from {sum(map(len, engine_launches.values()))} recorded launches "
          f"({len(engine_launches)} engines: {', '.join(shapes.BACKBONES)} x their families x bf16, fp16)")
    pythons = [sys.executable] + os.environ.get("RMSERVE_COMPILE_PYTHON", "").split()
    failures = []
    for i, python in enumerate(pythons):
        result = compile_with(python, record, str(tmp_path / f"compiled{i}.json"))
        assert len(result["rows"]) == 2 * len(specs)
        failures += [f"triton {r['triton']} sm_{r['capability']} {r['kernel']} {r['constexprs']}: "
                     f"{'; '.join(problems(r))}" for r in result["rows"] if problems(r)]
    assert not failures, "\n".join(failures)
