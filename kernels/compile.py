"""Compile recorded kernel specializations for real GPUs, on a machine without one.

    python -m rmserve.kernels.compile RECORD.json [--capabilities 80,90] [--jobs 2] [--json OUT.json]

RECORD.json holds {"specializations": [...]} as `kernels/launch.py` records them (`Specialization.to_json`;
tests/test_kernel_compile.py writes one from the engine's own launches). Each is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", capability, 32))` through ttir, ttgir,
llir, PTX and the cubin, with the installed Triton (run it with another Triton's python to check
that version). One row per specialization and target is printed: registers, spill bytes (from
the `ptxas -v` log of the very ptxas run that builds the cubin), shared memory, compile seconds.

Exit status 1 when any compile fails, uses more shared memory than the target allows per block
(SMEM_LIMIT), spills registers, or needs more registers than a block of its warps may hold.
The kernels must not be interpreted here: TRITON_INTERPRET must be unset.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}   # bytes of shared memory one block may use (opt-in maximum)
REGISTERS_PER_BLOCK = 65536                      # 32-bit registers per SM, which one block may use at most
_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(index: int, spec: dict, capability: int) -> dict:
    """Compile specialization `index` (Specialization.to_json) for sm_<capability> -> a result row."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction

    row = {"index": index, "kernel": spec["kernel"], "capability": capability, "num_warps": spec["num_warps"],
           "num_stages": spec["num_stages"], "constexprs": spec["constexprs"], "triton": triton.__version__}
    module, name = spec["kernel"].split(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        return {**row, "error": f"cannot load {spec['kernel']}: {e}"}
    if not isinstance(fn, JITFunction):
        return {**row, "error": f"{name} is {type(fn).__name__}, not a JITFunction: unset TRITON_INTERPRET"}
    names = fn.arg_names
    if sorted(names) != sorted(spec["signature"]):
        return {**row, "error": f"the record's parameters {list(spec['signature'])} are not {name}'s {names}"}
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    src = ASTSource(fn, {n: spec["signature"][n] for n in names},
                    {(names.index(n),): v for n, v in spec["constexprs"].items()},
                    {(i,): backend.parse_attr("D" if n in spec["divisible"] else "") for i, n in enumerate(names)})
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):     # TRITON_DUMP_PTXAS_LOG: make_cubin prints ptxas -v here
            kernel = triton.compile(src, target=target, options={"num_warps": spec["num_warps"],
                                                                 "num_stages": spec["num_stages"]})
    except Exception as e:  # noqa: BLE001  (a compile error is this check's finding: report it, go on)
        return {**row, "seconds": round(time.perf_counter() - start, 2), "error": f"{type(e).__name__}: {e}"}
    seconds = time.perf_counter() - start
    regs, spills = _REGS.search(log.getvalue()), _SPILLS.search(log.getvalue())
    if regs is None or spills is None:
        return {**row, "seconds": round(seconds, 2), "error": "no ptxas -v log (was the cubin taken from a cache?)"}
    return {**row, "seconds": round(seconds, 2), "registers": int(regs.group(1)),
            "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
            "shared": kernel.metadata.shared, "error": None}


def problems(row: dict) -> list[str]:
    """What makes a compiled row unfit to launch (empty: fit)."""
    if row["error"]:
        return [row["error"]]
    out = []
    limit = SMEM_LIMIT[row["capability"]]
    if row["shared"] > limit:
        out.append(f"shared memory {row['shared']} B > {limit} B")
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stores, {row['spill_loads']} B loads")
    if row["registers"] * 32 * row["num_warps"] > REGISTERS_PER_BLOCK:
        out.append(f"{row['registers']} registers x {32 * row['num_warps']} threads > {REGISTERS_PER_BLOCK}")
    return out


def compile_all(specs: list[dict], capabilities: list[int], jobs: int) -> tuple[list[dict], float]:
    """Every spec for every capability in a pool of `jobs` processes -> (rows in input order, wall seconds).
    A fresh Triton cache, so every cubin is built here (and its ptxas log read)."""
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.pop("TRITON_INTERPRET", None)
    work = [(i, spec, cap) for i, spec in enumerate(specs) for cap in capabilities]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rmserve-triton-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("fork")) as pool:
            rows = list(pool.map(compile_one, *zip(*work))) if work else []
    return rows, time.perf_counter() - start


def print_table(specs: list[dict], rows: list[dict], capabilities: list[int], file=sys.stdout) -> None:
    """One line per specialization: kernel, constexprs, pointer dtypes, warps, then per target
    registers / spilled bytes / shared memory (KB), and what is wrong."""
    by = {(r["index"], r["capability"]): r for r in rows}
    head = "".join(f"{f'sm_{c} regs/spill/smem':>24}" for c in capabilities)
    print(f"{'kernel':<26}{'constexprs':<58}{'pointers':<22}{'warps':>5}{head}  problems", file=file)
    for i, spec in enumerate(specs):
        consts = ",".join(f"{k}={v}" for k, v in spec["constexprs"].items())
        ptrs = ",".join(sorted({t[1:] for t in spec["signature"].values() if t.startswith("*")}))
        cells, issues = "", []
        for c in capabilities:
            r = by[i, c]
            spilled = 0 if r["error"] else r["spill_stores"] + r["spill_loads"]
            cell = "error" if r["error"] else f"{r['registers']}/{spilled}/{r['shared'] / 1024:.1f}"
            cells += f"{cell:>24}"
            issues += [f"sm_{c}: {p[:300]}" for p in problems(r)]
        name = spec["kernel"].split(":")[1]
        print(f"{name:<26}{consts:<58}{ptrs:<22}{spec['num_warps']:>5}{cells}  {'; '.join(issues)}", file=file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("record", help="JSON with a 'specializations' list (kernels/launch.py)")
    ap.add_argument("--capabilities", default="80,90", help="CUDA compute capabilities (default 80,90)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    with open(args.record, encoding="utf-8") as f:
        specs = json.load(f)["specializations"]
    caps = [int(c) for c in args.capabilities.split(",")]
    unknown = [c for c in caps if c not in SMEM_LIMIT]
    if unknown:
        ap.error(f"no shared-memory limit known for capability {unknown}; known: {sorted(SMEM_LIMIT)}")
    rows, seconds = compile_all(specs, caps, args.jobs)
    print_table(specs, rows, caps)
    bad = [r for r in rows if problems(r)]
    fit = [r for r in rows if not r["error"]]
    import triton

    spilling = sum(bool(r["spill_stores"] + r["spill_loads"]) for r in fit)
    print(f"\ntriton {triton.__version__}: {len(specs)} specializations x sm_{', sm_'.join(map(str, caps))} = "
          f"{len(rows)} compiles in {seconds:.1f} s wall ({args.jobs} processes, "
          f"{sum(r.get('seconds', 0) for r in rows):.1f} s compiling); max shared memory "
          f"{max((r['shared'] for r in fit), default=0) / 1024:.1f} KB, max registers "
          f"{max((r['registers'] for r in fit), default=0)}, {spilling} spilling; {len(bad)} unfit")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"triton": triton.__version__, "seconds": round(seconds, 1), "jobs": args.jobs, "rows": rows},
                      f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
