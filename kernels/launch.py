"""The one launch point of every Triton kernel, and a recorder of what is launched.

Every launcher calls `launch(kernel, grid, *args, **meta)` instead of `kernel[grid](...)`.
Outside a `recording()` block that is exactly `kernel[grid](*args, **meta)` (one list test on top).
Inside one, each launch is also recorded as a `Launch`: the kernel, its grid, and the
`Specialization` Triton's JIT keys its compiled binary on for these arguments on a CUDA GPU:

- pointer arguments: the element type (`*bf16`, `*i64`, ...) and whether the address is a
  multiple of 16 bytes (`tt.divisibility` 16);
- integer arguments: i32 or i64 (or u64) by value, the value 1 turned into the constant 1, and
  whether the value is a multiple of 16 (parameters in the kernel's `do_not_specialize` keep
  only their type);
- floats (fp32) and bools (u1) by type only, None as a constant;
- `tl.constexpr` parameters by value; num_warps and num_stages.

The key is computed by Triton's own binder (`triton.runtime.jit.create_function_from_signature`
and `JITFunction._pack_args`, the code a GPU launch runs; the same rules in Triton 3.6 to 3.8)
for a CUDA target, also while the kernels run in the CPU interpreter, so a recording made on
CPU names exactly the binaries a GPU run of the same calls would compile.
`rmserve/kernels/compile.py` compiles such a record for sm_80 and sm_90.

`recording(dry=True)` records without running the kernels (their outputs stay unwritten): for
launches too large to run, e.g. checking the grid at the largest sample count allowed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

_recorders: list["Recorder"] = []   # active recorders, innermost last; empty: launches are not recorded


def launch(kernel, grid: Sequence[int], *args, **meta) -> None:
    """kernel[grid](*args, **meta), recorded while a `recording()` block is active."""
    if _recorders:
        recorder = _recorders[-1]
        recorder.add(kernel, tuple(grid), args, meta)
        if recorder.dry:
            return
    kernel[grid](*args, **meta)


@dataclass(frozen=True)
class Specialization:
    """What Triton compiles one binary for. JSON-friendly: names, strings, ints, bools and None."""
    kernel: str                               # "module:function", e.g. "rmserve.kernels.rmsnorm:_rms_norm_kernel"
    signature: tuple[tuple[str, str], ...]    # (parameter, Triton type: "*bf16", "i32", "fp32", "constexpr", ...)
    divisible: tuple[str, ...]                # parameters specialised as multiples of 16 (bytes for pointers)
    constexprs: tuple[tuple[str, Any], ...]   # (parameter, value): tl.constexpr parameters and integers equal to 1
    num_warps: int
    num_stages: int

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "signature": dict(self.signature), "divisible": list(self.divisible),
                "constexprs": dict(self.constexprs), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @classmethod
    def from_json(cls, d: dict) -> "Specialization":
        return cls(d["kernel"], tuple(d["signature"].items()), tuple(d["divisible"]), tuple(d["constexprs"].items()),
                   d["num_warps"], d["num_stages"])

    def describe(self) -> str:
        """The parts that vary between launches of one kernel: constexprs, types, divisibility."""
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs)
        types = ",".join(sorted({t for _, t in self.signature if t != "constexpr"}))
        return f"{consts} [{types}] div16:{len(self.divisible)}"


@dataclass(frozen=True)
class Launch:
    spec: Specialization
    grid: tuple[int, ...]


@dataclass
class Recorder:
    dry: bool = False
    launches: list[Launch] = field(default_factory=list)

    def add(self, kernel, grid: tuple[int, ...], args: tuple, meta: dict) -> None:
        self.launches.append(Launch(specialize(kernel, args, meta), grid))

    def specializations(self) -> list[Specialization]:
        """The distinct specializations, in first-launch order."""
        return list(dict.fromkeys(launch.spec for launch in self.launches))


@contextlib.contextmanager
def recording(dry: bool = False) -> Iterator[Recorder]:
    """Records every `launch` in the block (any thread). dry: record only, run nothing."""
    recorder = Recorder(dry=dry)
    _recorders.append(recorder)
    try:
        yield recorder
    finally:
        _recorders.remove(recorder)


_binders: dict[int, tuple] = {}


def _binder(kernel):
    """(JITFunction, Triton's argument binder for a CUDA target), made once per kernel.
    In the interpreter the kernel is an InterpretedFunction: the JITFunction is made from its Python function."""
    entry = _binders.get(id(kernel))
    if entry is None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
        backend = make_backend(GPUTarget("cuda", 90, 32))   # the rules are the same for every CUDA target
        entry = (kernel, jit, backend, create_function_from_signature(jit.signature, jit.params, backend))
        _binders[id(kernel)] = entry
    return entry[1:]


def specialize(kernel, args: tuple, meta: dict) -> Specialization:
    """The specialization Triton's JIT computes for kernel[grid](*args, **meta) on a CUDA GPU."""
    jit, backend, binder = _binder(kernel)
    bound, spec, options = binder(*args, **meta)
    options, signature, constexprs, attrs = jit._pack_args(backend, dict(meta), bound, spec, options)
    names = jit.arg_names
    divisible = tuple(names[path[0]] for path, attr in attrs.items() if ["tt.divisibility", 16] in attr)
    consts = tuple((names[path[0]], value) for path, value in sorted(constexprs.items()))
    fn = jit.fn
    return Specialization(f"{fn.__module__}:{fn.__qualname__}", tuple(signature.items()), divisible, consts,
                          options.num_warps, options.num_stages)
