"""The offline job on a real local Ray (2 CPUs, 2 engine actors) gives the single-process output,
and resumes a job whose first parts were already committed.

One local Ray serves the module: it is started here, and each `rmserve score --ray ADDRESS` joins
it as a driver (starting a Ray per run cost ~10 s each)."""
import json
import re
from dataclasses import asdict

import pytest
import torch

from rmserve import Engine, EngineConfig
from rmserve.offline import JobConfig, ShapeConfig, run_job
from rmserve.offline.job import part_rows, prepare
from rmserve.offline.scoring import build_outputs, encode_rows, score_samples
from rmserve.offline.shapes import make_row

from .helpers import random_conversation, random_text
from .offline_helpers import cli, read_jsonl, write_jsonl

pytest.importorskip("ray")
pd = pytest.importorskip("pandas")

# Ray actors and the single-process job (here in this process) run one torch thread (conftest), but
# in other processes with batches cut the same way; values agree to fp32 rounding of a few ops.
RTOL = 1e-5
ENGINE = EngineConfig(dtype="float32", device="cpu", max_batch_tokens=256)
ROWS, PART_ROWS = 300, 50
# What `rmserve score` itself writes to stderr: the progress bar (tqdm writes "\r" + the bar), the
# resume note, the final report. Ray's own lines (its loggers, the driver's core worker, the workers'
# output) go to OUTPUT.parts/ray.log instead.
RMSERVE_LINES = re.compile(r"\s*\d+%\|.*\| \d+/\d+ \[|resuming |\d+ of \d+ rows scored|bad rows are listed in |summary: ")


@pytest.fixture(scope="module")
def ray_address():
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield context.address_info["gcs_address"]
    ray.shutdown()


def test_ray_job_matches_single_process_and_resumes(tmp_path, tiny_model, rng, ray_address):
    model = tiny_model("armorm", hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    rows = []
    for i in range(ROWS):
        ctx = random_conversation(rng, max_turns=1, hi=6)[:-1]
        rows.append({"pair_id": i, "chosen": ctx + [{"role": "assistant", "content": random_text(rng, 1, 6)}],
                     "rejected": ctx + [{"role": "assistant", "content": random_text(rng, 1, 6)}]}
                    if i % 41 else {"pair_id": i, "chosen": ctx})   # a few bad rows
    inp = write_jsonl(tmp_path / "pairs.jsonl", rows)
    args = ("--model", model, "--part-rows", PART_ROWS, "--dtype", "float32", "--device", "cpu",
            "--max-batch-tokens", 256, "--id-field", "pair_id", "--shape", "pair")
    shape = ShapeConfig(shape="pair", id_field="pair_id")

    local = tmp_path / "local.parquet"   # the single-process job, in this process
    assert run_job(JobConfig(inp, str(local), model, engine=ENGINE, part_rows=PART_ROWS, shape=shape,
                             quiet=True))["exit_code"] == 3

    # An interrupted Ray job: parts 0 and 2 already committed (scored here, as an actor would).
    out = tmp_path / "ray.parquet"
    config = JobConfig(inp, str(out), model, engine=ENGINE, part_rows=PART_ROWS, shape=shape)
    prep = prepare(config, "ray")
    prep.store.unlock()   # that job's process is gone, and its lock with it
    engine = Engine.from_pretrained(model, **asdict(ENGINE))
    for k, first, raws in part_rows(prep):
        if k in (0, 2):
            enc = encode_rows(engine.encode, [make_row(prep.shape, first + j, x) for j, x in enumerate(raws)])
            o = build_outputs(prep.shape, enc, score_samples(engine, enc.encoded, enc.groups), first, len(raws))
            prep.store.write_part(k, o.records, o.errors)
            prep.store.commit(k, o.stats, 1.0)

    # not --quiet: the progress bar and notes, which Ray's own lines must not cut into
    r = cli("score", inp, "--output", out, *args, "--ray", ray_address, "--actors", 2, "--actor-cpus", 0.5,
            timeout=400)
    assert r.returncode == 3, r.stderr
    lines = [line for line in re.split(r"[\r\n]", r.stderr) if line.strip()]
    assert lines[0].startswith(f"resuming {out}: 2 of 6 parts"), r.stderr
    assert [line for line in lines if not RMSERVE_LINES.match(line)] == [], r.stderr
    a, b = pd.read_parquet(local), pd.read_parquet(out)
    assert a["id"].tolist() == b["id"].tolist() == [i for i in range(ROWS) if i % 41]
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=RTOL, atol=RTOL)
    assert read_jsonl(str(local) + ".errors.jsonl") == read_jsonl(str(out) + ".errors.jsonl")
    sa = json.loads(open(str(local) + ".summary.json").read())
    sb = json.loads(open(str(out) + ".summary.json").read())
    for key in ("rows", "scored", "errors", "tokens", "pairs"):
        assert sa[key] == sb[key], key
    assert sb["errors"] == len(range(0, ROWS, 41)) and sb["pair_accuracy"] == pytest.approx(sa["pair_accuracy"])


def test_ray_job_whose_actors_cannot_start_leaves_nothing_behind(tmp_path, tiny_model, rng, ray_address):
    """An engine actor that fails in its constructor (an attention backend the worker cannot run)
    fails the job with the reason, and leaves no manifest or staged rows that would refuse the
    corrected command as a changed resume. (That the corrected command then runs on Ray is the
    test above: here its job is opened, which is where a leftover would refuse it.)"""
    if torch.cuda.is_available():
        pytest.skip("needs an attention backend that this machine cannot run")
    model = tiny_model("bt", hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"messages": random_conversation(rng, max_turns=1, hi=6)}
                                              for _ in range(6)])
    out = tmp_path / "s.jsonl"
    args = ("--model", model, "--output", out, "--part-rows", 3, "--device", "cpu", "--quiet", "--ray", ray_address,
            "--actors", 1, "--actor-cpus", 0.5)
    r = cli("score", inp, *args, "--attention", "torch_varlen", timeout=300)
    assert r.returncode != 0 and "attention backend 'torch_varlen' is not available on cpu" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]   # no parts, staged rows, output or lock
    with prepare(JobConfig(inp, str(out), model, part_rows=3, engine=EngineConfig(device="cpu")), "ray") as prep:
        assert prep.committed == {} and prep.done is None


def test_actor_counts_below_one_are_refused_before_ray_starts(tmp_path, tiny_model, rng, capsys):
    """`--actors 0` ran as the default (one actor per GPU, else 1) and a negative count failed inside
    Ray: both are refused in one line (exit 2), before any Ray starts, as are negative CPUs or GPUs."""
    from rmserve.cli import main

    inp = write_jsonl(tmp_path / "in.jsonl", [{"messages": random_conversation(rng, max_turns=1, hi=6)}])
    for flags in (["--actors", "0"], ["--actors", "-2"], ["--actor-cpus", "-1"], ["--actor-gpus", "-1"]):
        code = main(["score", str(inp), "--model", tiny_model("bt"), "--output", str(tmp_path / "o.jsonl"),
                     "--ray", "--quiet", *flags])
        err = capsys.readouterr().err.strip()
        assert code == 2 and flags[0].lstrip("-").replace("-", "_") in err and "\n" not in err, (flags, err)
    assert not (tmp_path / "o.jsonl.parts").exists()
