"""The offline job (`rmserve score`): inputs, row shapes, outputs, bad rows, summaries, refusals.

Real files and the real CLI; scores are checked against Engine.score on the same conversations.
fp32 on CPU: a row's result can differ in the last bits with its batch's row count (BLAS
blocking), so job-vs-API comparisons allow RTOL; reruns of the job itself must be bit-equal.
"""
import gzip
import json
import os
import shutil

import pytest

from rmserve import Engine, EngineConfig
from rmserve.cli import main
from rmserve.offline import EXIT_BAD_ROWS, JobConfig, ResumeError, ShapeConfig, SourceError, run_job
from rmserve.offline.job import prepare

from .helpers import random_conversation, random_text
from .offline_helpers import REPO, cli, read_jsonl, write_jsonl

pd = pytest.importorskip("pandas")   # reads the outputs; in the `test` extra

RTOL = 1e-5
ENGINE = EngineConfig(dtype="float32", device="cpu", max_batch_tokens=300)


def _engine(path):
    return Engine.from_pretrained(path, dtype="float32", device="cpu", max_batch_tokens=300)


def _job(inp, out, model, **kw):
    kw.setdefault("engine", ENGINE)
    return run_job(JobConfig(str(inp), str(out), model, quiet=True, **kw))


def test_readme_command(tmp_path, monkeypatch, capsys):
    """The README's main command, as written, from the repository root (its output in a temporary
    directory here; README's goes to out/, which git ignores)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        main_command = f.read().split("<!-- main-command -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert "mkdir -p out && rmserve score examples/conversations.jsonl --model tiny:armorm --output " \
           "out/scores.jsonl" in main_command
    with open(os.path.join(REPO, ".gitignore"), encoding="utf-8") as f:
        assert "/out/" in f.read().split()
    out = tmp_path / "scores.jsonl"
    env = {"RMSERVE_CACHE": str(tmp_path / "cache")}
    r = cli("score", "examples/conversations.jsonl", "--model", "tiny:armorm", "--output", out, env=env)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(out)
    inputs = read_jsonl(os.path.join(REPO, "examples/conversations.jsonl"))
    assert [r["id"] for r in rows] == [i["id"] for i in inputs]
    from rmserve.tiny import tiny_checkpoint

    expect = _engine(tiny_checkpoint("armorm", cache_dir=str(tmp_path / "cache"))).score([i["messages"] for i in inputs])
    for row, e in zip(rows, expect):
        assert set(row) == {"id", "score", "num_tokens", "rewards", "gating", "coefficients"}
        assert row["score"] == pytest.approx(e.score, rel=RTOL, abs=RTOL)
        assert row["rewards"] == pytest.approx(e.rewards, rel=RTOL, abs=RTOL)
        assert row["num_tokens"] == e.num_tokens
    summary = json.loads((tmp_path / "scores.jsonl.summary.json").read_text())
    assert (summary["rows"], summary["scored"], summary["errors"]) == (5, 5, 0)
    assert summary["tokens"] == sum(e.num_tokens for e in expect) and summary["tokens_per_s"] > 0
    assert summary["names"][0] == "helpsteer-helpfulness" and summary["exit_code"] == 0
    assert (tmp_path / "scores.jsonl.errors.jsonl").read_text() == ""
    assert not (tmp_path / "scores.jsonl.parts").exists()
    # The same command again (in this process): already complete, nothing rewritten.
    before = out.read_bytes()
    monkeypatch.setenv("RMSERVE_CACHE", env["RMSERVE_CACHE"])
    monkeypatch.chdir(REPO)
    assert main(["score", "examples/conversations.jsonl", "--model", "tiny:armorm", "--output", str(out)]) == 0
    assert "already complete" in capsys.readouterr().err and out.read_bytes() == before


def test_every_input_kind_gives_the_same_output(tmp_path, tiny_model, rng):
    datasets = pytest.importorskip("datasets")   # in the `test` extra
    model = tiny_model("urm")
    rows = [{"id": f"r{i}", "messages": random_conversation(rng)} for i in range(23)]
    paths = {"jsonl": write_jsonl(tmp_path / "in.jsonl", rows)}
    with gzip.open(tmp_path / "in.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    paths["gz"] = str(tmp_path / "in.jsonl.gz")
    pd.DataFrame(rows).to_parquet(tmp_path / "in.parquet")
    paths["parquet"] = str(tmp_path / "in.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "in_ds"))
    paths["datasets"] = str(tmp_path / "in_ds")
    outs = {}
    for kind, path in paths.items():
        s = _job(path, tmp_path / f"out_{kind}.parquet", model, part_rows=7)
        assert (s["rows"], s["scored"], s["errors"]) == (23, 23, 0)
        outs[kind] = pd.read_parquet(tmp_path / f"out_{kind}.parquet")
    base = outs["jsonl"]
    assert base["id"].tolist() == [r["id"] for r in rows]
    assert set(base.columns) == {"id", "score", "num_tokens", "means", "spreads", "sigmas", "weights"}
    for kind, df in outs.items():
        pd.testing.assert_frame_equal(df, base, check_exact=True, obj=kind)
    expect = _engine(model).score([r["messages"] for r in rows])
    assert base["score"].tolist() == pytest.approx([e.score for e in expect], rel=RTOL, abs=RTOL)
    assert [list(m) for m in base["means"]] == [pytest.approx(e.means, rel=RTOL, abs=RTOL) for e in expect]


def test_prompt_response_columns_and_made_ids(tmp_path, tiny_model, rng):
    model = tiny_model("bt")
    rows = [{"q": random_text(rng), "a": random_text(rng), "src": f"s{i}"} for i in range(9)]
    s = _job(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", model,
             shape=ShapeConfig(prompt_field="q", response_field="a", keep=("src",)), part_rows=4)
    assert s["shape"] == "prompt_response" and s["errors"] == 0
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == list(range(9)) and [r["src"] for r in out] == [r["src"] for r in rows]
    convs = [[{"role": "user", "content": r["q"]}, {"role": "assistant", "content": r["a"]}] for r in rows]
    expect = _engine(model).score(convs)
    assert [r["score"] for r in out] == pytest.approx([e.score for e in expect], rel=RTOL, abs=RTOL)



def test_kept_columns_of_mixed_types_are_written_to_parquet_as_text(tmp_path, tiny_model, rng):
    """--keep copies input columns as they are; in parquet a column whose values mix types within a part
    (a string and an object) or across parts (objects in one, lists in another) is written as text
    (strings as they are, other values as JSON), as ids of integers and strings are: before, the part
    write (or the merge at the end) raised an Arrow error."""
    model = tiny_model("bt")
    within = ["a", {"k": 1}, 2.5, None, True, "b"]
    across = [{"k": 1}, {"k": 2}, [1, 2], [3], "x", None]
    one_type = [1, 2, 3, 4, 5, 6]
    rows = [{"id": i, "messages": random_conversation(rng, max_turns=1, hi=6), "w": w, "c": c, "n": n}
            for i, (w, c, n) in enumerate(zip(within, across, one_type))]
    s = _job(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.parquet", model,
             shape=ShapeConfig(keep=("w", "c", "n")), part_rows=2)
    assert (s["scored"], s["errors"]) == (6, 0)
    df = pd.read_parquet(tmp_path / "out.parquet")
    column = lambda name: df[name].astype(object).where(df[name].notna(), None).tolist()
    assert column("w") == ["a", '{"k": 1}', "2.5", None, "true", "b"]
    assert column("c") == ['{"k": 1}', '{"k": 2}', "[1, 2]", "[3]", "x", None]
    assert df["n"].tolist() == one_type   # a column of one type keeps it


BAD_ROWS = [  # (raw line or row, expected reason substring); ids are the row's "id" column
    ({"id": "good0"}, None),
    ("{not json", "malformed JSON"),
    ("[1, 2]", "must be a JSON object"),
    (b'{"id": "x", "messages": "\xff\xfe"}', "not valid UTF-8"),
    ({"id": "nomsg"}, "missing field 'messages'"),
    ({"id": "role", "messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "a"}]}, "role 'bot'"),
    ({"id": "lastuser", "messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
    ({"id": "empty", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty"),
    ({"id": "nogate", "messages": [{"role": "assistant", "content": "hello there"}]}, "gating pattern"),
    ({"id": "long", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 80}]},
     "longer than the model's maximum"),
    ({"id": "notlist", "messages": "hello"}, "must be a list of messages"),
    ({"id": "good1"}, None),
    ({"id": [1], "messages": []}, "id field 'id' must be an integer or a string"),
    ({"id": "content", "messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}, "no text 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}, "missing field 'id'"),
    ({"id": "good2"}, None),
    ('{"id": "surrogate", "messages": [{"role": "user", "content": "a \\ud800"}, {"role": "assistant", "content": "b"}]}',
     "a lone UTF-16 surrogate ('\\ud800' without its pair)"),
    ('{"id": "\\uDC00", "messages": [{"role": "user", "content": "\\ud83d\\ude42"}, {"role": "assistant", "content": "b"}]}',
     "a lone UTF-16 surrogate ('\\udc00' without its pair)"),   # the id (its pair in the text is fine)
    ({"id": "good3"}, None),
]


def test_bad_rows_go_to_the_errors_file(tmp_path, rng, monkeypatch, capsys):
    good = {"good0", "good1", "good2", "good3"}
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        for row, _ in BAD_ROWS:
            if isinstance(row, dict) and str(row.get("id")) in good:
                row = dict(row, messages=random_conversation(rng, max_turns=1, hi=5))
            f.write(row if isinstance(row, bytes) else (row if isinstance(row, str) else json.dumps(row)).encode())
            f.write(b"\n\n")   # blank lines are not rows
    out = tmp_path / "out.parquet"
    monkeypatch.setenv("RMSERVE_CACHE", str(tmp_path / "cache"))
    code = main(["score", str(path), "--model", "tiny:armorm", "--output", str(out), "--max-length", "150",
                 "--part-rows", "5", "--quiet"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_ROWS, err
    assert "15 errors" in err and "bad rows are listed in" in err
    errors = read_jsonl(str(out) + ".errors.jsonl")
    expected = [(i, why) for i, (_, why) in enumerate(BAD_ROWS) if why]
    assert [e["row"] for e in errors] == [i for i, _ in expected]
    for e, (i, why) in zip(errors, expected):
        assert why in e["error"], (i, e)
    assert [e["id"] for e in errors if e["row"] in (1, 2, 3, 12, 14)] == [None] * 5   # the id could not be read
    assert [e["id"] for e in errors][3:6] == ["nomsg", "role", "lastuser"]
    df = pd.read_parquet(out)
    assert df["id"].tolist() == ["good0", "good1", "good2", "good3"] and df["score"].notna().all()
    summary = json.loads(open(str(out) + ".summary.json").read())
    assert (summary["rows"], summary["scored"], summary["errors"], summary["exit_code"]) == (19, 4, 15, 3)


def test_pairs_margin_and_accuracy(tmp_path, tiny_model, rng):
    model = tiny_model("grm")
    convs = [random_conversation(rng, max_turns=2, hi=12) for _ in range(10)]
    rows = []
    for i in range(0, 10, 2):
        rows.append({"pair_id": f"p{i}", "chosen": convs[i], "rejected": convs[i + 1]})
    same = random_conversation(rng, max_turns=1)
    rows.append({"pair_id": "tie", "chosen": same, "rejected": same})
    rows.append({"pair_id": "str", "prompt": "Say hi", "chosen": "Hello there!", "rejected": "no"})
    rows.append({"pair_id": "bad", "chosen": convs[0], "rejected": [{"role": "user", "content": "x"}]})
    s = _job(write_jsonl(tmp_path / "pairs.jsonl", rows), tmp_path / "pairs.parquet", model,
             shape=ShapeConfig(id_field="pair_id"), part_rows=3)
    assert s["shape"] == "pair" and s["exit_code"] == EXIT_BAD_ROWS
    sides = [(r["chosen"], r["rejected"]) for r in rows[:-1]]
    sides[-1] = tuple([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": a}]
                      for a in ("Hello there!", "no"))
    eng = _engine(model)
    c = [x.score for x in eng.score([p[0] for p in sides])]
    r = [x.score for x in eng.score([p[1] for p in sides])]
    df = pd.read_parquet(tmp_path / "pairs.parquet")
    assert df["id"].tolist() == [row["pair_id"] for row in rows[:-1]]
    assert df["chosen_score"].tolist() == pytest.approx(c, rel=RTOL, abs=RTOL)
    assert df["rejected_score"].tolist() == pytest.approx(r, rel=RTOL, abs=RTOL)
    assert (df["margin"] == df["chosen_score"] - df["rejected_score"]).all()
    assert (df["chosen_wins"] == (df["margin"] > 0)).all()
    tie = df[df["id"] == "tie"].iloc[0]
    assert tie["margin"] == 0 and not tie["chosen_wins"]    # a tie is not a win
    wins = int(df["chosen_wins"].sum())   # from the job's own scores (the API's agree to RTOL)
    assert df["margin"].tolist() == pytest.approx([a - b for a, b in zip(c, r)], rel=1e-4, abs=1e-4)
    assert (s["pairs"], s["chosen_wins"], s["ties"]) == (7, wins, 1)
    assert s["pair_accuracy"] == pytest.approx(wins / 7)
    assert read_jsonl(str(tmp_path / "pairs.parquet") + ".errors.jsonl") == [
        {"row": 7, "id": "bad", "error": "rejected: the last message must be the assistant's answer, got role 'user'"}]


def test_best_of_n_ranks_across_parts(tmp_path, tiny_model, rng):
    """Rows grouped by prompt id, spread over several parts (part_rows=2) and interleaved."""
    model = tiny_model("bt")
    prompts = {g: random_text(rng, 2, 8) for g in ("a", "b", "c")}
    rows = []
    for i in range(4):
        for g in ("a", "b", "c")[: 3 if i < 3 else 1]:
            rows.append({"prompt_id": g, "generator": f"m{i}", "messages": [
                {"role": "user", "content": prompts[g]}, {"role": "assistant", "content": random_text(rng)}]})
    s = _job(write_jsonl(tmp_path / "bon.jsonl", rows), tmp_path / "bon.jsonl.out.jsonl", model,
             shape=ShapeConfig(group_field="prompt_id", keep=("generator",)), part_rows=2, format="jsonl")
    out = read_jsonl(tmp_path / "bon.jsonl.out.jsonl")
    scores = [x.score for x in _engine(model).score([r["messages"] for r in rows])]
    by_group = {}
    for r, sc in zip(rows, scores):
        by_group.setdefault(r["prompt_id"], []).append(sc)
    for o, r, sc in zip(out, rows, scores):
        assert o["prompt_id"] == r["prompt_id"] and o["generator"] == r["generator"]
        assert o["rank"] == 1 + sum(x > o["score"] for x in [q["score"] for q in out if q["prompt_id"] == r["prompt_id"]])
        assert o["score"] == pytest.approx(sc, rel=RTOL, abs=RTOL)
    best = [max(v) for v in by_group.values()]
    mean = [sum(v) / len(v) for v in by_group.values()]
    assert s["groups"] == 3 and s["mean_group_size"] == pytest.approx(len(rows) / 3)
    assert s["mean_best_score"] == pytest.approx(sum(best) / 3, rel=RTOL, abs=RTOL)
    assert s["mean_score"] == pytest.approx(sum(mean) / 3, rel=RTOL, abs=RTOL)


def test_multi_responses_in_one_row(tmp_path, tiny_model, rng):
    model = tiny_model("qrm")
    rows = [{"prompt": random_text(rng, 2, 6), "responses": [random_text(rng) for _ in range(n)]} for n in (3, 1, 4)]
    s = _job(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "m.parquet", model, part_rows=2)
    df = pd.read_parquet(tmp_path / "m.parquet")
    assert s["shape"] == "multi" and s["groups"] == 3
    eng = _engine(model)
    best_sum = 0.0
    for (_, o), r in zip(df.iterrows(), rows):
        sc = [x.score for x in eng.score([[{"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": a}] for a in r["responses"]])]
        assert list(o["score"]) == pytest.approx(sc, rel=RTOL, abs=RTOL)
        assert list(o["rank"]) == [1 + sum(x > v for x in sc) for v in sc] and o["best"] == sc.index(max(sc))
        assert len(o["reward_quantiles"]) == len(sc) and len(o["gating"][0]) == 19
        best_sum += max(sc)
    assert s["mean_best_score"] == pytest.approx(best_sum / 3, rel=RTOL, abs=RTOL)


def test_changed_input_or_settings_are_refused(tmp_path, tiny_model, rng, capsys):
    model = tiny_model("bt")
    inp = write_jsonl(tmp_path / "in.jsonl", [{"messages": random_conversation(rng)} for _ in range(6)])
    out = tmp_path / "out.parquet"
    with prepare(JobConfig(inp, str(out), model, engine=ENGINE, part_rows=2), "local"):   # an interrupted job
        pass
    assert os.path.exists(str(out) + ".parts/manifest.json")
    with pytest.raises(ResumeError, match="max_batch_tokens"):
        _job(inp, out, model, engine=EngineConfig(dtype="float32", device="cpu", max_batch_tokens=999), part_rows=2)
    with pytest.raises(ResumeError, match="part_rows"):
        _job(inp, out, model, part_rows=3)
    with open(inp, "a", encoding="utf-8") as f:
        f.write(json.dumps({"messages": random_conversation(rng)}) + "\n")
    code = main(["score", str(inp), "--model", model, "--output", str(out), "--part-rows", "2", "--max-batch-tokens",
                 "300", "--dtype", "float32", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "the input changed" in err, err
    s = _job(inp, out, model, part_rows=2, overwrite=True)
    assert s["rows"] == 7 and s["exit_code"] == 0
    # A finished output is not silently replaced by a different job, and what differs is named.
    with pytest.raises(ResumeError, match=r"exists from another job \(part_rows: 2 then, 3 now\)"):
        _job(inp, out, model, part_rows=3)
    with pytest.raises(SourceError, match="unknown input type"):
        _job(shutil.copy(inp, tmp_path / "in.txt"), tmp_path / "o2.parquet", model)


def test_kill_during_final_cleanup_is_complete_on_rerun(tmp_path, tiny_model, rng, monkeypatch):
    """A kill while the parts directory is being removed (after the summary) leaves a manifest
    listing parts whose files are gone: the rerun must see a finished job, not resume from it."""
    import rmserve.offline.parts as parts

    model = tiny_model("bt")
    inp = write_jsonl(tmp_path / "in.jsonl", [{"messages": random_conversation(rng)} for _ in range(6)])
    out = tmp_path / "out.parquet"

    def die_midway(path, *args, **kwargs):   # removes the first part file, then the process "dies"
        os.remove(os.path.join(path, "part-000000.parquet"))
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(parts.shutil, "rmtree", die_midway)
        with pytest.raises(KeyboardInterrupt):
            _job(inp, out, model, part_rows=2)
    assert os.path.exists(str(out) + ".parts/manifest.json")
    before = pd.read_parquet(out)
    s = _job(inp, out, model, part_rows=2)
    assert s["rows"] == 6 and not os.path.exists(str(out) + ".parts")
    pd.testing.assert_frame_equal(pd.read_parquet(out), before)


def test_samples_when_asked(tmp_path, tiny_model, rng):
    model = tiny_model("urm")
    convs = [random_conversation(rng) for _ in range(5)]
    s = _job(write_jsonl(tmp_path / "in.jsonl", [{"messages": c} for c in convs]), tmp_path / "o.parquet", model,
             samples=4, seed=7, part_rows=2)
    df = pd.read_parquet(tmp_path / "o.parquet")
    expect = _engine(model).score(convs, samples=4, seed=7)   # draws depend on the seed and tokens only
    assert s["errors"] == 0
    for (_, o), e in zip(df.iterrows(), expect):
        assert [list(x) for x in o["samples"]] == [pytest.approx(x, rel=RTOL, abs=RTOL) for x in e.samples]
        assert list(o["score_samples"]) == pytest.approx(e.score_samples, rel=RTOL, abs=RTOL)
    with pytest.raises(ValueError, match="only distributional heads"):
        _job(tmp_path / "in.jsonl", tmp_path / "o2.parquet", tiny_model("bt"), samples=2)


def test_group_ranks_with_ties_by_hand(tmp_path):
    """Ranks across parts, ties sharing the better rank, and the best-of-N summary, on known scores
    (the same text can score differently in the last bits in different batches, so ties are set here)."""
    from rmserve.offline.parts import _group_ranks
    from rmserve.offline.scoring import ranks

    parts = [[("a", 1.0), ("b", 0.5), ("a", 3.0)], [("b", 0.5), (7, 2.0), ("a", 1.0)], [("b", 0.7), ("a", -1.0)]]
    files = [write_jsonl(tmp_path / f"p{i}.jsonl", [{"g": g, "score": x} for g, x in p]) for i, p in enumerate(parts)]
    got, stats = _group_ranks(files, "jsonl", "g")
    assert got.tolist() == [2, 2, 1, 2, 1, 2, 1, 4]
    assert stats == {"groups": 3, "mean_group_size": 8 / 3, "mean_best_score": pytest.approx((3.0 + 0.7 + 2.0) / 3),
                     "mean_score": pytest.approx((1.0 + (0.5 + 0.5 + 0.7) / 3 + 2.0) / 3),
                     "mean_best_minus_mean": pytest.approx((3.0 - 1.0 + 0.7 - 1.7 / 3 + 0) / 3)}
    assert ranks([0.3, 0.9, 0.3, -2.0]) == [2, 1, 2, 4]
