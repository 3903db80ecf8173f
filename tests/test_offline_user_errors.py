"""What a user plausibly gets wrong with `rmserve score` / `rmserve serve`: files from Windows tools,
empty or damaged inputs, an output that cannot be written, a checkpoint without config.json,
Ctrl-C. Each gets rows scored as meant, or one clear line and exit 2 (130 for Ctrl-C), never a
traceback."""
import gzip
import importlib.util
import json
import signal
import socket
import sys
import time

import pytest
import torch

from rmserve.cli import main
from rmserve.offline import EXIT_REFUSED, JobConfig, ShapeConfig, run_job

from .helpers import random_conversation
from .offline_helpers import cli, committed_parts, popen, read_jsonl, write_jsonl


# `rmserve serve` needs the `server` extra; where it is not installed (the GPU image) only `score` is checked.
SERVE = [["serve", "--port", "1"]] if all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")) else []


def _rows(rng, n):
    return [{"id": f"r{i}", "messages": random_conversation(rng, max_turns=1, hi=6)} for i in range(n)]


def _refused(capsys, *argv) -> str:
    """Runs the CLI in this process; it must refuse with exit 2 and one line on stderr."""
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    assert code == EXIT_REFUSED, err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_bom_and_crlf_lines_are_read_as_rows(tmp_path, tiny_model, rng):
    """A UTF-8 byte-order mark at the start (Notepad, PowerShell) and CRLF line ends: every row
    scores, with its id, the same as the plain file."""
    model = tiny_model("bt")
    rows = _rows(rng, 4)
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    data = open(plain, "rb").read()
    (tmp_path / "win.jsonl").write_bytes(b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n"))
    (tmp_path / "win.jsonl.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + data))
    outs = {}
    for name in ("plain.jsonl", "win.jsonl", "win.jsonl.gz"):
        s = run_job(JobConfig(str(tmp_path / name), str(tmp_path / f"{name}.out.jsonl"), model, quiet=True))
        assert (s["rows"], s["scored"], s["errors"]) == (4, 4, 0), name
        outs[name] = read_jsonl(tmp_path / f"{name}.out.jsonl")
    assert [r["id"] for r in outs["win.jsonl"]] == [r["id"] for r in rows]
    assert outs["win.jsonl"] == outs["plain.jsonl"] == outs["win.jsonl.gz"]


def test_unreadable_inputs_are_refused_in_one_line(tmp_path, tiny_model, rng, capsys):
    model = tiny_model("bt")
    good = gzip.compress(open(write_jsonl(tmp_path / "g.jsonl", _rows(rng, 50)), "rb").read())
    (tmp_path / "cut.jsonl.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "plain.jsonl.gz").write_bytes(b'{"id": 1}\n')
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "allbad.jsonl").write_bytes(b"not json\n{bad\n")
    cases = {"cut.jsonl.gz": "ended before", "plain.jsonl.gz": "Not a gzipped file", "bad.parquet": "not a readable parquet",
             "empty.jsonl": "has no rows", "allbad.jsonl": "must be JSON Lines"}
    for name, why in cases.items():
        err = _refused(capsys, "score", tmp_path / name, "--model", model, "--output", tmp_path / f"{name}.out.jsonl")
        assert why in err and name in err, err
    # With the shape given, a file of only bad rows is scored: every row in the errors file, exit 3.
    out = tmp_path / "allbad.out.jsonl"
    assert main(["score", str(tmp_path / "allbad.jsonl"), "--model", model, "--output", str(out), "--shape",
                 "messages", "--quiet"]) == 3
    assert [e["row"] for e in read_jsonl(str(out) + ".errors.jsonl")] == [0, 1]


def test_unwritable_output_and_bad_models_are_refused_in_one_line(tmp_path, tiny_model, rng, capsys):
    model = tiny_model("bt")
    inp = write_jsonl(tmp_path / "in.jsonl", _rows(rng, 2))
    (tmp_path / "outdir").mkdir()
    err = _refused(capsys, "score", inp, "--model", model, "--output", tmp_path / "outdir")
    assert "is a directory" in err
    (tmp_path / "afile").write_text("")
    err = _refused(capsys, "score", inp, "--model", model, "--output", tmp_path / "afile" / "s.jsonl")
    assert "cannot write the output" in err
    # a typo in a directory is refused, not created (it once made every missing directory silently)
    err = _refused(capsys, "score", inp, "--model", model, "--output", tmp_path / "typo" / "deeper" / "s.jsonl")
    assert f"the directory {tmp_path / 'typo' / 'deeper'} does not exist" in err and "mkdir -p" in err
    assert not (tmp_path / "typo").exists()
    # a name that is no known format (parquet bytes went into scores.csv) needs --format
    for name in ("s.csv", "scores"):
        err = _refused(capsys, "score", inp, "--model", model, "--output", tmp_path / name)
        assert "cannot tell the format from its name" in err and "--format" in err
    assert main(["score", inp, "--model", model, "--output", str(tmp_path / "s.csv"), "--format", "jsonl",
                 "--quiet"]) == 0
    assert len(read_jsonl(tmp_path / "s.csv")) == 2
    capsys.readouterr()
    (tmp_path / "noconfig").mkdir()
    for cmd in (["score", inp, "--output", tmp_path / "s.jsonl"], *SERVE):
        err = _refused(capsys, *cmd, "--model", tmp_path / "noconfig")
        assert "config.json" in err
    if SERVE:
        err = _refused(capsys, "serve", "--model", "tiny:nope", "--port", "1")
        assert "unknown tiny model" in err


def test_a_cut_line_is_reported_where_it_ends():
    """A JSON line cut off at column 64 was reported as an error "at column 1" (of the line after it:
    json.loads saw the line end)."""
    from rmserve.offline.shapes import parse_raw

    line = json.dumps({"id": "a", "messages": [{"role": "user", "content": "hello there, how are you?"},
                                               {"role": "assistant", "content": "fine"}]}).encode()
    for cut, why in [(64, "Unterminated string starting at column 54"), (51, "Expecting ':' delimiter at column 52"),
                     (len(line) - 1, f"Expecting ',' delimiter at column {len(line)}")]:
        for end in (b"\n", b"\r\n"):
            with pytest.raises(ValueError) as e:
                parse_raw(line[:cut] + end)
            assert str(e.value) == f"malformed JSON: {why} (the row ends at column {cut}: is the line cut off?)"
    with pytest.raises(ValueError, match=r"^malformed JSON: Expecting property name enclosed in double quotes at "
                                         r"column 2$"):
        parse_raw(b"{not json\n")


def test_ctrl_c_stops_with_a_resume_hint(tmp_path, tiny_model, rng):
    """Ctrl-C mid-job: exit 130 and how to go on, not a traceback; committed parts stay.

    1,500 parts of 2 rows keep the job running for many seconds after its first commit, so a
    stalled poll (a loaded machine) still signals a running job (with 150 parts it finished first
    in some loaded full-suite runs); the signal goes as soon as one part is committed."""
    inp = write_jsonl(tmp_path / "in.jsonl", _rows(rng, 3000))
    out = tmp_path / "s.jsonl"
    p = popen("score", inp, "--model", tiny_model("bt"), "--output", out, "--part-rows", "2", "--quiet")
    deadline = time.monotonic() + 120
    while committed_parts(out) < 1 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, f"the job ended (exit {p.returncode}) before it could be interrupted"
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1].decode()
    assert p.returncode == 130, err
    assert "Traceback" not in err and "rerun the same command" in err, err
    assert committed_parts(out) >= 1
    manifest = json.loads((tmp_path / "s.jsonl.parts" / "manifest.json").read_text())
    assert manifest["key"]["rows"] == 3000


def test_a_named_id_field_that_is_not_there_is_refused(tmp_path, tiny_model, rng, capsys):
    """`--id-field pairid` (a typo of pair_id) must not quietly give row numbers as ids."""
    rows = [dict(r, pair_id=i) for i, r in enumerate(_rows(rng, 2))]
    inp = write_jsonl(tmp_path / "in.jsonl", [{k: v for k, v in r.items() if k != "id"} for r in rows])
    err = _refused(capsys, "score", inp, "--model", tiny_model("bt"), "--id-field", "pairid",
                   "--output", tmp_path / "s.jsonl")
    assert "'pairid' is not a column" in err and "pair_id" in err


def test_missing_datasets_split_or_unreachable_hub_dataset_is_refused(tmp_path, tiny_model, rng, capsys):
    datasets = pytest.importorskip("datasets")   # in the `test` extra
    d = datasets.Dataset.from_list(_rows(rng, 2))
    datasets.DatasetDict(train=d, test=d).save_to_disk(str(tmp_path / "dd"))
    capsys.readouterr()   # the save's progress bars
    err = _refused(capsys, "score", tmp_path / "dd", "--split", "validation", "--model", tiny_model("bt"),
                   "--output", tmp_path / "s.jsonl")
    assert "no split 'validation'" in err and "['test', 'train']" in err
    # The hub while offline (the settings are read when `datasets` is imported: a fresh process).
    r = cli("score", "hf:nobody/no-such-dataset", "--model", tiny_model("bt"), "--output", tmp_path / "h.jsonl",
            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == EXIT_REFUSED, r.stderr
    assert "Traceback" not in r.stderr and "hf:nobody/no-such-dataset: cannot load it" in r.stderr


def test_unreachable_hub_is_refused_at_once(tmp_path, tiny_model, rng, capsys, monkeypatch):
    """Not offline, and no hub answers: one request (and one retry) says so, instead of `datasets`
    retrying for 26 s first."""
    import datasets
    import huggingface_hub.constants

    from rmserve.offline import sources

    with socket.socket() as s:   # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(sources.time, "sleep", lambda s: None)
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: asked.append(a))
    err = _refused(capsys, "score", "hf:nobody/no-such-dataset", "--model", tiny_model("bt"),
                   "--output", tmp_path / "h.jsonl")
    assert f"hf:nobody/no-such-dataset: cannot reach the hub at {endpoint}" in err and "HF_HUB_OFFLINE=1" in err
    assert asked == []


def test_missing_server_or_ray_packages_say_which_extra(tmp_path, tiny_model, rng, capsys, monkeypatch):
    """README's main command installs no extras; `rmserve serve` or `--ray` then names the extra."""
    monkeypatch.setitem(sys.modules, "uvicorn", None)   # as if not installed
    monkeypatch.setitem(sys.modules, "ray", None)
    err = _refused(capsys, "serve", "--model", "tiny:bt")
    assert "uvicorn is not installed" in err and '".[server]"' in err
    inp = write_jsonl(tmp_path / "in.jsonl", _rows(rng, 2))
    err = _refused(capsys, "score", inp, "--model", tiny_model("bt"), "--output", tmp_path / "s.jsonl", "--ray")
    assert '".[ray]"' in err


def test_output_that_is_the_input_is_refused_and_the_input_kept(tmp_path, tiny_model, rng, capsys):
    inp = write_jsonl(tmp_path / "data.jsonl", _rows(rng, 2))
    before = open(inp, "rb").read()
    for extra in ([], ["--overwrite"]):   # --overwrite removes an old output: here it was the input
        err = _refused(capsys, "score", inp, "--model", tiny_model("bt"), "--output", inp, *extra)
        assert "is the input file" in err
    assert open(inp, "rb").read() == before


def test_rerun_after_deleting_the_output_says_what_is_left(tmp_path, tiny_model, rng, capsys):
    """A user deletes scores.jsonl to score again: the summary left beside it is this job's, not
    'another job (different input, model or settings)'."""
    inp = write_jsonl(tmp_path / "in.jsonl", _rows(rng, 2))
    out = tmp_path / "s.jsonl"
    args = ["score", inp, "--model", tiny_model("bt"), "--output", out, "--quiet"]
    assert main(list(map(str, args))) == 0
    out.unlink()
    capsys.readouterr()
    err = _refused(capsys, *args)
    assert "this same finished job" in err and "another job" not in err
    assert main(list(map(str, args + ["--overwrite"]))) == 0 and out.exists()


def test_a_device_this_machine_lacks_is_refused_in_one_line(tmp_path, tiny_model, rng, capsys):
    import torch

    inp = write_jsonl(tmp_path / "in.jsonl", _rows(rng, 2))
    bad = ["gpu"] + ([] if torch.cuda.is_available() else ["cuda"]) + [f"cuda:{torch.cuda.device_count()}"]
    for device in bad:
        for cmd in (["score", inp, "--output", tmp_path / "s.jsonl"], *SERVE):
            err = _refused(capsys, *cmd, "--model", tiny_model("bt"), "--device", device)
            assert f"--device {device}" in err or f"--device '{device}'" in err, err


def test_a_job_that_fails_to_start_does_not_block_the_corrected_command(tmp_path, tiny_model, rng, capsys):
    """The engine refuses a setting after the job opened its parts (here an attention backend this
    machine cannot run): the fixed command must run, not be refused as 'settings differ from the
    interrupted job'. A setting that is simply invalid is refused before anything is opened."""
    inp = write_jsonl(tmp_path / "in.jsonl", _rows(rng, 2))
    args = ["score", inp, "--model", tiny_model("bt"), "--output", tmp_path / "s.jsonl", "--quiet"]
    err = _refused(capsys, *args, "--attention", "no-such-backend")
    assert "attention must be one of flash_attn, torch_varlen, reference, auto; got 'no-such-backend'" in err
    assert not (tmp_path / "s.jsonl.parts").exists()
    if not torch.cuda.is_available():
        err = _refused(capsys, *args, "--attention", "torch_varlen")
        assert "attention backend 'torch_varlen' is not available on cpu" in err
        assert not (tmp_path / "s.jsonl.parts").exists()
    assert main(list(map(str, args))) == 0


def test_a_refused_resume_names_just_the_setting_that_differs(tmp_path, tiny_model, rng):
    from rmserve.offline import ResumeError
    from rmserve.offline.parts import PartStore

    store = PartStore(str(tmp_path / "s.jsonl"), "jsonl")
    key = {"input": "x", "engine": {"device": "cpu", "dtype": "auto", "bos": "one"}, "part_rows": 2}
    store.open(key, {})
    store.commit(0, {"rows": 2}, 1.0)
    changed = dict(key, engine=dict(key["engine"], dtype="bfloat16"))
    with pytest.raises(ResumeError) as e:
        PartStore(str(tmp_path / "s.jsonl"), "jsonl").open(changed, {})
    assert "engine.dtype: 'auto' then, 'bfloat16' now" in str(e.value) and "bos" not in str(e.value)


def test_a_kept_column_a_pair_job_writes_itself_is_refused(tmp_path, tiny_model, rng, capsys):
    """A pair job writes chosen_score, rejected_score, ...: a dataset's own `chosen_score` label kept with
    --keep was silently replaced by the model's score. It is refused, naming the column; a job of another
    shape (which writes no chosen_*) keeps such a column as it is."""
    model = tiny_model("bt")
    pairs = [{"chosen": random_conversation(rng, max_turns=1, hi=6),
              "rejected": random_conversation(rng, max_turns=1, hi=6), "chosen_score": 9.5} for _ in range(2)]
    err = _refused(capsys, "score", write_jsonl(tmp_path / "p.jsonl", pairs), "--model", model,
                   "--output", tmp_path / "p.jsonl.out", "--format", "jsonl", "--keep", "chosen_score")
    assert "chosen_score" in err and "shadow" in err
    rows = [{"messages": p["chosen"], "chosen_score": p["chosen_score"]} for p in pairs]
    s = run_job(JobConfig(write_jsonl(tmp_path / "m.jsonl", rows), str(tmp_path / "m.out.jsonl"), model,
                          shape=ShapeConfig(keep=("chosen_score",)), quiet=True))
    assert s["scored"] == 2 and [r["chosen_score"] for r in read_jsonl(tmp_path / "m.out.jsonl")] == [9.5, 9.5]


def test_a_write_that_fails_leaves_no_temporary_file(tmp_path):
    """atomic_write's temporary file goes when the write fails or is interrupted (Ctrl-C while
    `rmserve eval` writes OUTPUT.input.jsonl left OUTPUT.input.jsonl.tmp-<pid> beside the output)."""
    from rmserve.offline.parts import atomic_write

    def write(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(tmp_path / "out.jsonl"), write)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not SERVE, reason="needs the server extra")
def test_serve_limits_out_of_range_are_refused_in_one_line(tiny_model, capsys):
    """`--port 99999` died in bind() and `--max-wait-ms -1` in BatchingConfig, each with a traceback
    (exit 1); `--max-items 0`, `--max-body-bytes 0`, ... started a server that refused every request.
    Each is refused in one line naming the flag (exit 2), before the model loads."""
    model = tiny_model("bt")
    for flag, value in (("--port", 99999), ("--port", -1), ("--max-wait-ms", -1), ("--max-items", 0),
                        ("--max-pending", 0), ("--max-samples", -1), ("--max-sample-chars", 0),
                        ("--max-body-bytes", 0), ("--drain-timeout", -1)):
        err = _refused(capsys, "serve", "--model", model, flag, value)
        assert err.startswith("rmserve serve: ") and flag in err, (flag, err)


def test_a_split_for_an_input_without_splits_is_refused(tmp_path, tiny_model, rng, capsys):
    """--split on a jsonl or parquet file, or on a directory holding one Dataset, was ignored: the whole
    input was scored as if the split had been chosen. It is refused, saying the input has no splits."""
    datasets = pytest.importorskip("datasets")   # in the `test` extra
    rows = _rows(rng, 2)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    capsys.readouterr()   # the save's progress bars
    for inp in (write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "one"):
        err = _refused(capsys, "score", inp, "--split", "test", "--model", tiny_model("bt"),
                       "--output", tmp_path / "s.jsonl")
        assert "--split test" in err and "no splits" in err, err


def test_two_different_splits_for_a_hub_dataset_are_refused():
    """`hf:name:train` with `--split test` scored the test split without a word; the two disagree, so
    it is refused (before any request to the hub)."""
    from rmserve.offline.sources import SourceError, open_source

    with pytest.raises(SourceError, match="hf:a/b:train and --split test"):
        open_source("hf:a/b:train", "test")


def test_a_format_the_output_name_contradicts_is_refused(tmp_path, tiny_model, rng, capsys):
    """`--output scores.parquet --format jsonl` wrote JSON lines into scores.parquet, which
    pandas.read_parquet (README) then cannot read; the name and --format disagree, so it is refused."""
    inp = write_jsonl(tmp_path / "in.jsonl", _rows(rng, 2))
    err = _refused(capsys, "score", inp, "--model", tiny_model("bt"), "--output", tmp_path / "s.parquet",
                   "--format", "jsonl")
    assert "s.parquet" in err and "--format jsonl" in err and not (tmp_path / "s.parquet").exists()


def test_a_group_field_named_like_an_output_column_is_refused(tmp_path, tiny_model, rng, capsys):
    """--group-field is copied to the output: named like a column the job writes (`id` beside
    --id-field uid, `score`), one overwrote the other (the ids replaced by group keys). Refused; the
    id column itself as the group field (its values are the ids) still runs."""
    model = tiny_model("bt")
    rows = [{"uid": f"u{i}", "id": i // 2, "score": 1.0, "messages": random_conversation(rng, max_turns=1, hi=6)}
            for i in range(4)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    for extra in (["--id-field", "uid", "--group-field", "id"], ["--group-field", "score"]):
        err = _refused(capsys, "score", data, "--model", model, "--output", tmp_path / "o.jsonl", *extra)
        assert f"--group-field {extra[-1]}" in err and "overwrite" in err
    s = run_job(JobConfig(data, str(tmp_path / "ok.jsonl"), model, shape=ShapeConfig(group_field="id"), quiet=True))
    assert s["scored"] == 4 and [r["id"] for r in read_jsonl(tmp_path / "ok.jsonl")] == [0, 0, 1, 1]
