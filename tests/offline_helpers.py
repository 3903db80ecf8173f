"""Shared pieces of the offline-job tests: input files and running the real CLI."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def read_jsonl(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _env(env):
    # One torch thread per job process: on a busy 2-core CI machine OpenMP threads spinning
    # against other processes make a tiny model 10x slower.
    return dict(os.environ, **{"OMP_NUM_THREADS": "1", **(env or {})})


def cli(*args, env=None, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    """`rmserve ...` as a subprocess (the installed entry point's module)."""
    full_env = _env(env)
    return subprocess.run([sys.executable, "-m", "rmserve.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def popen(*args, env=None, cwd=REPO) -> subprocess.Popen:
    full_env = _env(env)
    return subprocess.Popen([sys.executable, "-m", "rmserve.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=full_env, cwd=cwd)


def committed_parts(output) -> int:
    """Parts the manifest lists right now (-1: no manifest)."""
    try:
        with open(str(output) + ".parts/manifest.json", encoding="utf-8") as f:
            return len(json.load(f)["parts"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1
