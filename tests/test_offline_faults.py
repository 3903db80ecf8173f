"""The offline job's commits under deterministic faults, in-process: a resume scores only the parts
not yet committed, and a fault at any step of any file write (half the bytes written, the file
complete but not yet renamed into place, renamed but the directory not yet synced) leaves a job
that one rerun finishes with exactly the unbroken run's output. (tests/test_offline_kill.py kills
the real process at random moments; a fault placed at every step finds what random timing can miss.)

One engine serves every run (Engine.from_pretrained is patched to return it), so a run is a few
milliseconds and the whole sweep takes seconds.
"""
import builtins
import os

import pandas as pd
import pytest

import rmserve.offline.job as job_module
import rmserve.offline.parts as parts
from rmserve import Engine
from rmserve.offline import JobConfig, run_job

from .helpers import random_conversation
from .offline_helpers import write_jsonl

ROWS, PART_ROWS = 5, 2    # three parts, the last of one row; row 3 is bad
SAME = ("rows", "scored", "errors", "tokens", "exit_code")


class Fault(BaseException):
    """Stands for the process dying here (a BaseException, so that no `except Exception` takes it)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    """(input path, model path, engine, the unbroken run's output frame, errors bytes, summary)."""
    import random

    rng = random.Random(17)
    model = tiny_model("armorm", hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    rows = [{"id": f"r{i}", "messages": random_conversation(rng, max_turns=1, hi=5)} if i != 3 else "{bad"
            for i in range(ROWS)]
    inp = write_jsonl(tmp_path_factory.mktemp("in") / "in.jsonl", rows)
    engine = Engine.from_pretrained(model, dtype="float32", device="cpu")
    out = str(tmp_path_factory.mktemp("whole") / "whole.parquet")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Engine, "from_pretrained", lambda *a, **k: engine)
        summary = run_job(JobConfig(inp, out, model, part_rows=PART_ROWS, quiet=True))
    assert summary["errors"] == 1 and summary["scored"] == ROWS - 1
    with open(out + ".errors.jsonl", "rb") as f:
        errors = f.read()
    return inp, model, engine, pd.read_parquet(out), errors, summary


def _run(setup, out, monkeypatch, quiet=True) -> dict:
    inp, model, engine = setup[:3]
    monkeypatch.setattr(Engine, "from_pretrained", lambda *a, **k: engine)
    return run_job(JobConfig(inp, str(out), model, part_rows=PART_ROWS, quiet=quiet))


def _assert_unbroken(setup, out, summary):
    pd.testing.assert_frame_equal(pd.read_parquet(out), setup[3], check_exact=True)
    with open(f"{out}.errors.jsonl", "rb") as f:
        assert f.read() == setup[4]
    assert {k: summary[k] for k in SAME} == {k: setup[5][k] for k in SAME}
    left = sorted(os.listdir(os.path.dirname(out)))
    base = os.path.basename(out)
    assert left == sorted([base, f"{base}.errors.jsonl", f"{base}.summary.json"]), left   # no parts, lock, temp


def test_resume_scores_only_what_is_not_committed(setup, tmp_path, monkeypatch, capsys):
    """A run stopped at its second commit (Ctrl-C) has committed one part; the rerun says that it
    resumes, scores the other two parts only, and gives the unbroken output."""
    out = tmp_path / "s.parquet"
    scored: list[int] = []   # samples per engine call
    score_samples = job_module.score_samples

    def counting(engine, encoded, *args, **kwargs):
        scored.append(len(encoded))
        return score_samples(engine, encoded, *args, **kwargs)

    commit = parts.PartStore.commit

    def stop_at_second(self, k, *args):
        if len(self.manifest["parts"]) == 1:
            raise KeyboardInterrupt
        commit(self, k, *args)

    monkeypatch.setattr(job_module, "score_samples", counting)
    with monkeypatch.context() as m:
        m.setattr(parts.PartStore, "commit", stop_at_second)
        with pytest.raises(KeyboardInterrupt):
            _run(setup, out, monkeypatch)
    assert scored == [2, 1]                  # part 0, then part 1 (row 3 is bad), stopped at its commit
    scored.clear()
    capsys.readouterr()
    summary = _run(setup, out, monkeypatch, quiet=False)
    assert scored == [1, 1], scored          # parts 1 and 2; part 0 not again
    err = capsys.readouterr().err
    assert f"resuming {out}: 1 of 3 parts (2 of {ROWS} rows) were committed by an earlier run" in err, err
    _assert_unbroken(setup, str(out), summary)


def _sweep(setup, tmp_path, monkeypatch, inject) -> int:
    """For every write of a whole run, a run with `inject(n)` faulting at write n (stopped there),
    then a plain rerun that must give the unbroken result. Returns how many faults fired.
    fsync is a no-op here: a fault stops the process, not the machine (its page cache survives),
    and 30 fsyncs a run would make the sweep ten times slower."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    fired = 0
    for n in range(1000):
        out = tmp_path / f"f{n}" / "s.parquet"
        out.parent.mkdir()
        with monkeypatch.context() as m:
            inject(m, n)
            try:
                _run(setup, out, m)
            except Fault:
                fired += 1
            else:
                return fired                  # write n does not exist: every write has had its fault
        _as_if_another_process(out.parent)
        _assert_unbroken(setup, str(out), _run(setup, out, monkeypatch))
    raise AssertionError("a run writes 1000 files?")


def _as_if_another_process(root):
    """Temporary files are named by the writer's pid; the rerun is another process, so the temporary
    files a dead run left must not share its name (the rerun would simply reuse them)."""
    mine = f".tmp-{os.getpid()}"
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(mine):
                os.rename(os.path.join(folder, name), os.path.join(folder, name[:-len(mine)] + ".tmp-1"))


def _nth_binary_open(n: int, wrap):
    """parts.open that wraps the file of the n-th binary write a run opens."""
    count = [0]

    def fake_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        if mode == "wb":
            count[0] += 1
            if count[0] == n + 1:
                return wrap(f)
        return f
    return fake_open


class _HalfWritten:
    """A file whose first write stores half its bytes (flushed to disk), then the process 'dies'."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        data = bytes(data)
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        raise Fault(f"died writing {self.f.name}")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_fault_in_the_middle_of_any_write(setup, tmp_path, monkeypatch):
    fired = _sweep(setup, tmp_path, monkeypatch,
                   lambda m, n: m.setattr(parts, "open", _nth_binary_open(n, _HalfWritten), raising=False))
    # the manifest when starting, 3 files per part (data, errors, manifest), then output, errors, summary
    assert fired == 1 + 3 * 3 + 3


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_fault_at_any_rename(setup, tmp_path, monkeypatch, when):
    """A fault with a file complete but not renamed into place yet, or renamed but the directory not
    yet synced: the rerun finishes from there."""
    replace = os.replace

    def inject(m, n):
        count = [0]

        def faulty(src, dst):
            if not str(dst).startswith(str(tmp_path)):   # someone else's rename
                return replace(src, dst)
            count[0] += 1
            if count[0] == n + 1 and when == "before":
                raise Fault(f"died before renaming {dst}")
            replace(src, dst)
            if count[0] == n + 1:
                raise Fault(f"died after renaming {dst}")
        m.setattr(parts.os, "replace", faulty)

    assert _sweep(setup, tmp_path, monkeypatch, inject) == 1 + 3 * 3 + 3
