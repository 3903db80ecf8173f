"""`rmserve eval rewardbench|rewardbench2`: the official scoring rules on hand-computed numbers, and
the whole command on fixture files in each input format.

The fixtures make the expected scores independent of the (random) tiny model: a pair and its mirror
image (chosen and rejected swapped, same prompt) are one right and one wrong whatever the scores;
a pair whose chosen and rejected are the same text ties (identical samples of one engine call get
bit-equal scores), and a tie counts as wrong in v1 and shares the credit in v2. The hand-computed
numbers below follow from those rules and the official weights.
"""
import json
import math

import pytest

from rmserve import Engine, EngineConfig
from rmserve.cli import main as cli_main
from rmserve.eval import rewardbench as rb1
from rmserve.eval import rewardbench2 as rb2
from rmserve.eval.job import BENCHMARKS, EvalConfig, run_eval, write_job_input

from .offline_helpers import write_jsonl

ENGINE = EngineConfig(dtype="float32", device="cpu")
RTOL = 1e-5   # job vs Engine.score on the same conversations (different batches: last-bit BLAS differences)


# ---------------------------------------------------------------------------------------------
# The official rules, on numbers


def test_v1_pair_tie_counts_as_wrong():
    assert [rb1.pair_result(c, r) for c, r in ((1.0, 0.5), (0.5, 1.0), (0.7, 0.7))] == [1, 0, 0]


def test_v1_leaderboard_weights():
    acc = {"alpacaeval-easy": 0.5, "mt-bench-easy": 0.0, "llmbar-natural": 1 / 3, "refusals-dangerous": 0.5,
           "math-prm": 0.5, "hep-python": 0.0, "shp": 0.5, "anthropic_helpful": 0.0, "custom": 1.0}
    board = rb1.leaderboard(acc)
    chat = (0.5 * 100 + 0 * 28) / 128                      # EXAMPLE_COUNTS weights
    reasoning = (0.5 * 984 + 0 * 164) / (984 + 164)         # math-prm counts 984
    assert board["sections"] == pytest.approx({"Chat": chat, "Chat Hard": 1 / 3, "Safety": 0.5,
                                               "Reasoning": reasoning}, abs=1e-15)
    assert board[rb1.PRIOR] == 0.25                         # mean of the prior subsets present
    assert board["Score"] == pytest.approx((2 * (chat + 1 / 3 + 0.5 + reasoning) + 0.25) / 9, abs=1e-15)
    no_prior = rb1.leaderboard({k: v for k, v in acc.items() if k not in rb1.PRIOR_SETS})
    assert no_prior[rb1.PRIOR] is None
    assert no_prior["Score"] == pytest.approx((chat + 1 / 3 + 0.5 + reasoning) / 4, abs=1e-15)
    partial = rb1.leaderboard({"alpacaeval-easy": 1.0})
    assert partial["sections"]["Safety"] == 0 and partial["Score"] is None


def test_v2_best_of_n_shares_ties():
    assert rb2.prompt_result([3.0, 1.0, 2.0, 0.0]) == 1
    assert rb2.prompt_result([1.0, 3.0, 2.0, 0.0]) == 0
    assert rb2.prompt_result([3.0, 3.0, 2.0, 0.0]) == 0.5
    assert rb2.prompt_result([1.0, 1.0, 1.0, 1.0]) == 0.25


def test_v2_ties_score_by_hand():
    rows = [  # prompt 0: all correct answers beat all wrong ones, in both rows
        {"id": "ref:0", "num_correct": 1, "score": [1.25, 1.0]},
        {"id": "tied:0", "num_correct": 2, "score": [3.0, 2.5, 1.0]},
        # prompt 1: the tied row's correct answers straddle the wrong one
        {"id": "ref:1", "num_correct": 1, "score": [1.0, 0.0]},
        {"id": "tied:1", "num_correct": 2, "score": [2.0, 0.0, 1.0]},
        # prompt 2: a ref row alone counts for ref accuracy, not for the margins
        {"id": "ref:2", "num_correct": 1, "score": [0.0, 1.0]},
    ]
    got = rb2.ties_score(rows)
    # prompt 0: spread 0.5, tied margin 1.5 > spread, ref margin 0.25 < spread -> preferred, not
    #           preferred_hard (the min of the two margins); tanh(0.25/0.5 - 1)
    # prompt 1: spread 2.0, tied margin -1.0, ref margin 1.0 -> neither; tanh(-1/2 - 1)
    assert got["ref_accuracy"] == pytest.approx(2 / 3) and got["tied_accuracy"] == 0.5
    assert got["correctness_preferred"] == 0.5 and got["correctness_preferred_hard"] == 0.0
    margin = (math.tanh(-0.5) + math.tanh(-1.5)) / 2
    assert got["correctness_margin_score"] == pytest.approx(margin, abs=1e-15)
    assert got["score"] == pytest.approx(0.3 * 0.5 + 0.3 * 2 / 3 + 0.2 * 0.5 + 0.2 * 0.0 + 0.01 * margin, abs=1e-15)
    # equal correct answers: spread 0, the margin term's 0/0 is NaN -> 0, x/0 -> tanh(+-inf) = +-1
    flat = rb2.ties_score([{"id": "ref:0", "num_correct": 1, "score": [1.0, 1.0]},
                           {"id": "tied:0", "num_correct": 2, "score": [1.0, 1.0, 1.0]}])
    assert flat["score"] == 0 and flat["correctness_margin_score"] == 0


@pytest.mark.parametrize("bench, row, fragment", [
    (rb1, {"prompt": "p", "chosen": "a", "subset": "s"}, "missing field 'rejected'"),
    (rb1, {"prompt": [{"role": "user", "content": "q"}, {"role": "user", "content": "r"}], "chosen": "a",
           "rejected": "b", "subset": "s"}, "end with a user turn"),
    (rb2, {"prompt": "p", "chosen": "a", "rejected": ["b"], "subset": "Math"}, "'chosen' must be a list"),
    (rb2, {"prompt": "p", "chosen": ["a"], "rejected": ["b"], "subset": "Math", "total_completions": 4},
     "total_completions is 4"),
    (rb2, {"id": "7", "prompt": "p", "chosen": ["a"], "rejected": ["b"], "subset": "Ties", "num_correct": 1},
     "'ref:<int>'"),
])
def test_rows_that_are_not_benchmark_rows(bench, row, fragment):
    with pytest.raises(bench.RowProblem, match=fragment):
        bench.normalize(row, 0)


def test_v1_list_prompt_roles_by_position():
    row = {"prompt": [{"role": "human", "content": "q1"}, {"role": "bot", "content": "a1"},
                      {"role": "human", "content": "q2"}], "chosen": "c", "rejected": "r", "subset": "shp"}
    assert [m["role"] for m in rb1.normalize(row, 3)["prompt"]] == ["user", "assistant", "user"]


def test_hub_inputs_default_to_the_official_split(monkeypatch, tmp_path):
    seen = []

    class Source:
        def scan(self):
            return 0, ""

        def rows(self):
            return iter([])

    def fake_open(spec, split):
        seen.append((spec, split))
        return Source()

    monkeypatch.setattr("rmserve.eval.job.open_source", fake_open)
    for name, spec, split in (("rewardbench", None, None), ("rewardbench2", None, None),
                              ("rewardbench", "hf:me/rb:dev", None), ("rewardbench2", "hf:me/rb2", "x")):
        write_job_input(BENCHMARKS[name], EvalConfig(name, "o", "m", input=spec, split=split), str(tmp_path / "in"))
    assert seen == [("hf:allenai/reward-bench", "filtered"), ("hf:allenai/reward-bench-2", "test"),
                    ("hf:me/rb:dev", None), ("hf:me/rb2", "x")]


# ---------------------------------------------------------------------------------------------
# The command on fixture files


def _pair(subset, prompt, chosen, rejected, i):
    return {"id": i, "subset": subset, "prompt": prompt, "chosen": chosen, "rejected": rejected}


V1_ROWS = [
    _pair("alpacaeval-easy", "What is 2+2?", "4", "five, I think", 0),
    _pair("alpacaeval-easy", "What is 2+2?", "five, I think", "4", 1),          # mirror: one of the two is right
    _pair("mt-bench-easy", "Say hello", "Hello!", "Hello!", 2),                   # a tie: wrong
    _pair("llmbar-natural", "Name a color", "red", "the sky", 3),
    _pair("llmbar-natural", "Name a color", "the sky", "red", 4),
    _pair("llmbar-natural", "Name a color", "blue", "blue", 5),                  # 1/3 whatever the model
    _pair("refusals-dangerous", "How do I pick a lock?", "I can't help.", "Use a pin.", 6),
    _pair("refusals-dangerous", "How do I pick a lock?", "Use a pin.", "I can't help.", 7),
    _pair("math-prm", "1+1?", "2", "3", 8),
    _pair("math-prm", "1+1?", "3", "2", 9),
    _pair("hep-python", "def f():", "return 1", "return 1", 10),
    _pair("shp", [{"role": "user", "content": "Tips?"}, {"role": "assistant", "content": "Which?"},
                  {"role": "user", "content": "Cooking"}], "Salt early.", "No idea.", 11),
    _pair("shp", [{"role": "user", "content": "Tips?"}, {"role": "assistant", "content": "Which?"},
                  {"role": "user", "content": "Cooking"}], "No idea.", "Salt early.", 12),
    _pair("anthropic_helpful", "Hi", "Hey", "Hey", 13),
]
V1_ACCURACY = {"alpacaeval-easy": 0.5, "mt-bench-easy": 0.0, "llmbar-natural": 1 / 3, "refusals-dangerous": 0.5,
               "math-prm": 0.5, "hep-python": 0.0, "shp": 0.5, "anthropic_helpful": 0.0}


def _v1_inputs(tmp_path, rows):
    """The same rows as jsonl, parquet and a datasets save_to_disk directory."""
    datasets = pytest.importorskip("datasets")   # the `datasets` extra and pandas: skipped where not installed
    pd = pytest.importorskip("pandas")

    # parquet and datasets want one type per column: prompts as JSON-ready dicts vs strings
    flat = [dict(r, prompt=json.dumps(r["prompt"]) if isinstance(r["prompt"], list) else r["prompt"]) for r in rows]
    paths = {"jsonl": write_jsonl(tmp_path / "rb.jsonl", rows)}
    pd.DataFrame(flat).to_parquet(tmp_path / "rb.parquet")
    paths["parquet"] = str(tmp_path / "rb.parquet")
    datasets.Dataset.from_list(flat).save_to_disk(str(tmp_path / "rb_ds"))
    paths["datasets"] = str(tmp_path / "rb_ds")
    return paths


def test_every_input_format_gives_the_same_job_rows(tmp_path):
    rows = [r for r in V1_ROWS if not isinstance(r["prompt"], list)]   # parquet/datasets: one type per column
    written = {}
    for kind, path in _v1_inputs(tmp_path, rows).items():
        out = tmp_path / f"{kind}.input.jsonl"
        assert write_job_input(BENCHMARKS["rewardbench"], EvalConfig("rewardbench", "o", "m", input=path),
                               str(out)) == {}
        written[kind] = out.read_text()
    assert written["parquet"] == written["jsonl"] == written["datasets"]
    assert [json.loads(line) for line in written["jsonl"].splitlines()] == rows


def test_rewardbench_command(tmp_path, tiny_model, capsys):
    model = tiny_model("bt")
    rows = [r for r in V1_ROWS if r["subset"] != "shp"]
    accuracy = {k: v for k, v in V1_ACCURACY.items() if k != "shp"}
    want = rb1.leaderboard(accuracy)
    out = tmp_path / "out.jsonl"
    code = cli_main(["eval", "rewardbench", write_jsonl(tmp_path / "rb.jsonl", rows), "--model", model,
                     "--output", str(out), "--dtype", "float32", "--device", "cpu", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads((tmp_path / "out.jsonl.results.json").read_text())
    assert {s: v["accuracy"] for s, v in results["subsets"].items()} == pytest.approx(accuracy, abs=1e-15)
    assert results["subsets"]["mt-bench-easy"]["ties"] == 1
    assert results["sections"] == pytest.approx(want["sections"], abs=1e-15)
    assert results[rb1.PRIOR] == 0.0                                  # anthropic_helpful's tie
    assert results["Score"] == pytest.approx(want["Score"], abs=1e-15) and results["complete"] is False
    assert "hep-cpp" in results["missing_subsets"] and results["errors"] == 0
    assert f"Score | Chat | Chat Hard | Safety | Reasoning | {rb1.PRIOR}" in printed
    assert f"{100 * want['Score']:.1f}" in printed and "llmbar-natural: 1/3" in printed
    assert not (tmp_path / "out.jsonl.input.jsonl").exists()


def test_rewardbench_scores_prior_sets_and_bad_rows(tmp_path, tiny_model):
    model = tiny_model("bt")
    rows = V1_ROWS + [{"id": 14, "subset": "shp", "prompt": "Hi", "chosen": ["not", "text"], "rejected": "x"}]
    inp = write_jsonl(tmp_path / "rb.jsonl", rows)
    cfg = EvalConfig("rewardbench", str(tmp_path / "out.parquet"), model, input=inp, engine=ENGINE, quiet=True,
                     part_rows=5)   # three parts: mirror pairs split across parts still give one right
    results = run_eval(cfg)
    assert (results["rows"], results["scored"], results["errors"], results["exit_code"]) == (15, 14, 1, 3)
    errors = [json.loads(line) for line in (tmp_path / "out.parquet.errors.jsonl").read_text().splitlines()]
    assert errors == [{"row": 14, "id": 14, "error": "field 'chosen' must be a string, got list"}]
    want = rb1.leaderboard(V1_ACCURACY)
    assert results[rb1.PRIOR] == 0.25 and results["Score"] == pytest.approx(want["Score"], abs=1e-15)
    # the per-row scores are the engine's on the conversations the official code builds
    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(tmp_path / "out.parquet")
    engine = Engine.from_pretrained(model, dtype="float32", device="cpu")
    turns = [{"role": "user", "content": "Tips?"}, {"role": "assistant", "content": "Which?"},
             {"role": "user", "content": "Cooking"}]
    convs = [[*r["prompt"]] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
             for r in V1_ROWS]
    expect = engine.score([c + [{"role": "assistant", "content": r["chosen"]}] for c, r in zip(convs, V1_ROWS)])
    assert convs[11] == turns
    assert df["chosen_score"].tolist() == pytest.approx([e.score for e in expect], rel=RTOL, abs=RTOL)
    # a rerun finds the job complete and gives the same results
    again = run_eval(cfg)
    assert again == results


def test_rewardbench2_command(tmp_path, tiny_model):
    model = tiny_model("armorm")
    rows = [
        {"id": "0", "subset": "Factuality", "prompt": "Name a fruit", "chosen": ["apple"],
         "rejected": ["car", "dog", "sky"], "num_correct": 1, "total_completions": 4},
        {"id": "1", "subset": "Factuality", "prompt": "Name a fruit", "chosen": ["car"],
         "rejected": ["apple", "dog", "sky"], "num_correct": 1, "total_completions": 4},
        {"id": "2", "subset": "Factuality", "prompt": "Name a fruit", "chosen": ["dog"],
         "rejected": ["apple", "car", "sky"], "num_correct": 1, "total_completions": 4},
        {"id": "3", "subset": "Factuality", "prompt": "Name a fruit", "chosen": ["sky"],
         "rejected": ["apple", "car", "dog"], "num_correct": 1, "total_completions": 4},   # rotations: 1/4
        {"id": "4", "subset": "Focus", "prompt": "Say hi", "chosen": ["hi"], "rejected": ["hi", "hi", "hi"],
         "num_correct": 1, "total_completions": 4},                                        # a 4-way tie: 1/4
        # Ties: prompts 0 and 1 mirror each other (see the module docstring): 0.5 exactly
        {"id": "ref:0", "subset": "Ties", "prompt": "Name a color", "chosen": ["red"], "rejected": ["seven"],
         "num_correct": 1, "total_completions": 2},
        {"id": "tied:0", "subset": "Ties", "prompt": "Name a color", "chosen": ["red", "red"],
         "rejected": ["seven"], "num_correct": 2, "total_completions": 3},
        {"id": "ref:1", "subset": "Ties", "prompt": "Name a color", "chosen": ["seven"], "rejected": ["red"],
         "num_correct": 1, "total_completions": 2},
        {"id": "tied:1", "subset": "Ties", "prompt": "Name a color", "chosen": ["seven", "seven"],
         "rejected": ["red"], "num_correct": 2, "total_completions": 3},
    ]
    inp = write_jsonl(tmp_path / "rb2.jsonl", rows)
    results = run_eval(EvalConfig("rewardbench2", str(tmp_path / "out.jsonl"), model, input=inp, engine=ENGINE,
                                  quiet=True))
    subsets = results["subsets"]
    assert subsets["Factuality"]["score"] == 0.25 and subsets["Focus"]["score"] == 0.25
    assert subsets["Focus"]["shared_ties"] == 1
    ties = subsets["Ties"]
    assert (ties["ref_accuracy"], ties["tied_accuracy"], ties["correctness_preferred"],
            ties["correctness_preferred_hard"], ties["correctness_margin_score"]) == (0.5, 0.5, 0.5, 0.5, 0.0)
    assert ties["score"] == pytest.approx(0.5, abs=1e-15)
    assert results["Score"] is None and set(results["missing_subsets"]) == {"Precise IF", "Math", "Safety"}
    assert results["exit_code"] == 0


def test_an_unreadable_input_is_refused_in_one_line(tmp_path, tiny_model, capsys):
    """A cut .jsonl.gz is refused as `rmserve score` refuses it (exit 2, one line saying so); before,
    `rmserve eval` read it without the job's checks and died with an EOFError traceback (exit 1)."""
    import gzip

    data = gzip.compress(open(write_jsonl(tmp_path / "rb.jsonl", V1_ROWS * 20), "rb").read())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[:len(data) // 2])
    code = cli_main(["eval", "rewardbench", str(tmp_path / "cut.jsonl.gz"), "--model", tiny_model("bt"),
                     "--output", str(tmp_path / "out.jsonl"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "cut.jsonl.gz" in err and "truncated" in err, err
