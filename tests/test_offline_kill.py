"""SIGKILL the real `rmserve score` at random moments, rerun until done: the output must equal an
unbroken run's row for row, bit for bit (same parts, same batches), with no id twice."""
import json
import signal
import time

import pytest

from rmserve.cli import main

from .helpers import random_conversation
from .offline_helpers import cli, committed_parts, popen, write_jsonl

pd = pytest.importorskip("pandas")   # reads the outputs; in the `test` extra

ROWS, PART_ROWS = 3000, 60


def _args(inp, out, model):
    return ("score", inp, "--model", model, "--output", out, "--part-rows", PART_ROWS, "--dtype", "float32",
            "--device", "cpu", "--max-batch-tokens", 256, "--quiet")


def test_sigkill_and_resume_equals_unbroken(tmp_path, tiny_model, rng):
    model = tiny_model("armorm", hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    rows = []
    for i in range(ROWS):
        conv = random_conversation(rng, max_turns=1, hi=4)
        rows.append({"id": f"x{i}", "messages": conv} if i % 97 else "{broken")   # some bad rows too
    inp = write_jsonl(tmp_path / "in.jsonl", rows)

    whole = tmp_path / "whole.parquet"   # the unbroken run, in this process (one torch thread too: conftest)
    assert main(list(map(str, _args(inp, whole, model)))) == 3

    out = tmp_path / "killed.parquet"
    kills, mid_job = 0, 0
    total_parts = -(-ROWS // PART_ROWS)
    while kills < 4:
        proc = popen(*_args(inp, out, model))
        before = max(0, committed_parts(out))
        deadline = time.monotonic() + 120
        # wait for this run to commit 1-3 new parts, then kill it at a random moment within the next
        # one (a part takes ~30 ms here: a kill bounded in time, not parts, let a run finish the job)
        target = before + rng.randint(1, 3)
        while committed_parts(out) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.03))
        if proc.poll() is not None:   # it finished before we could kill it
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        done = committed_parts(out)
        mid_job += 0 < done < total_parts
    assert kills >= 3 and mid_job >= 3, (kills, mid_job)
    r = cli(*_args(inp, out, model))   # the rerun that finishes the job
    assert r.returncode == 3, r.stderr

    a, b = pd.read_parquet(whole), pd.read_parquet(out)
    assert b["id"].is_unique and len(b) == ROWS - len(range(0, ROWS, 97))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    ea = (tmp_path / "whole.parquet.errors.jsonl").read_text()
    assert ea == (tmp_path / "killed.parquet.errors.jsonl").read_text()
    assert [json.loads(line)["row"] for line in ea.splitlines()] == list(range(0, ROWS, 97))
    sa = json.loads((tmp_path / "whole.parquet.summary.json").read_text())
    sb = json.loads((tmp_path / "killed.parquet.summary.json").read_text())
    for key in ("rows", "scored", "errors", "tokens"):
        assert sa[key] == sb[key]
    assert not (tmp_path / "killed.parquet.parts").exists()



def test_a_second_run_of_a_running_job_is_refused(tmp_path, tiny_model, rng, capsys):
    """Two runs of one job at once would both write its parts: while another process holds the
    job's lock the CLI is refused at once; once it is released the job runs and leaves no lock
    file. (A SIGKILLed run releases it too: the kill test above reruns after every kill.)"""
    from rmserve.offline.parts import PartStore

    model = tiny_model("armorm", hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "messages": random_conversation(rng, max_turns=1, hi=4)}
                                              for i in range(50)])
    out = tmp_path / "out.parquet"
    holder = PartStore(str(out), "parquet")   # stands for a running job: the same lock, held here
    holder.lock()
    # the second run in this process too: flock(2) locks of two open() of one file conflict within
    # one process as between two
    assert main(list(map(str, _args(inp, out, model)))) == 2
    assert "another rmserve run is writing" in capsys.readouterr().err
    holder.unlock()
    assert main(list(map(str, _args(inp, out, model)))) == 0
    assert len(pd.read_parquet(out)) == 50
    assert not (tmp_path / "out.parquet.lock").exists() and not (tmp_path / "out.parquet.parts").exists()
