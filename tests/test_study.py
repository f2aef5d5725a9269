"""The evidence study's report end to end on a smoke study (tiny models, the embedded digits): every section
is present and agrees with the JSON and with the students' own result files."""

import copy
import json
import math
import pathlib

import numpy as np
import pytest

from debkd_jax import config_lib, metrics, pipeline, render, report, workdir_lib
from debkd_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    config = config_lib.load_config(str(REPO / "configs" / "study.py") + ":digits,smoke")
    for name in list(config.methods):
        if name not in ("CE", "KD", "DeBKD", "DKD"):
            del config.methods[name]
    workdir = tmp_path_factory.mktemp("study")
    results = pipeline.train_and_evaluate(config, str(workdir), command="pytest smoke study")
    return config, workdir, results


def test_per_seed_numbers_are_the_students_own(study):
    config, workdir, results = study
    assert list(results["methods"]) == ["CE", "KD", "DeBKD", "DKD"]
    for name, row in results["methods"].items():
        assert row["seeds"] == [0, 1]
        for seed, per_seed in zip(row["seeds"], row["per_seed"], strict=True):
            own = json.loads((workdir / "students" / f"{name}-seed{seed}" / "result.json").read_text())
            assert per_seed == own["test"]
            assert own["wall_seconds"] > 0
        accuracies = [s["accuracy"] for s in row["per_seed"]]
        assert row["test"]["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
        assert len(row["wall_seconds"]) == 2


def test_paired_differences_against_kd_and_ce(study):
    _, _, results = study
    rows = results["methods"]
    assert set(results["paired"]) == {"KD", "CE"}
    assert set(results["paired"]["KD"]) == {"CE", "DeBKD", "DKD"}
    assert set(results["paired"]["CE"]) == {"KD", "DeBKD", "DKD"}
    for ref, diffs in results["paired"].items():
        for name, diff in diffs.items():
            a = [s["accuracy"] for s in rows[name]["per_seed"]]
            b = [s["accuracy"] for s in rows[ref]["per_seed"]]
            assert diff == metrics.paired_difference(a, b)
            assert diff["wins"] == sum(x > y for x, y in zip(a, b, strict=True))


def test_diagnostics_follow_from_the_teacher_logits(study):
    _, workdir, results = study
    logits = workdir_lib.read_npz(str(workdir / "teacher" / "logits.npz"))
    dataset = pipeline.load_source(study[0], "memory")
    teacher_errors = np.mean(np.argmax(logits["train"], -1) != dataset.splits["train"].labels)
    acc = results["teacher"]["accuracy"]
    assert acc["train"] == pytest.approx(1 - teacher_errors)
    assert acc["test"] == pytest.approx(results["teacher"]["test"]["accuracy"])
    rows = results["methods"]
    assert "targets" not in rows["CE"]
    assert rows["KD"]["targets"]["targets_wrong"] == pytest.approx(teacher_errors)
    assert rows["KD"]["targets"]["changed"] == 0 and rows["KD"]["targets"]["region_width"] is None
    debkd = rows["DeBKD"]["targets"]  # knowledge infusion: every mistake replaced, none left
    assert debkd["changed"] == pytest.approx(teacher_errors) and debkd["targets_wrong"] == 0
    assert 0 < debkd["region_width"] <= 1 / 12 + 1e-6


def test_report_sections_agree_with_the_json(study):
    _, workdir, results = study
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["methods"] == workdir_lib.jsonable(results["methods"])
    md = (workdir / "results.md").read_text()
    for heading in (
        "## Paired differences in test accuracy against KD",
        "## Paired differences in test accuracy against CE",
        "## What the targets do (training set)",
        "## Run",
        "![test accuracy per seed](test_accuracy.png)",
    ):
        assert heading in md
    for name, row in saved["methods"].items():
        acc = row["test"]["accuracy"]
        assert f"| {name} | {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} |" in md
    for ref, diffs in saved["paired"].items():
        for name, diff in diffs.items():
            assert f"- {report.verdict(name, ref, diff)}" in md
            assert f"| {name} | {100 * diff['mean']:+.2f} |" in md
    assert "Command: `pytest smoke study`" in md
    for png in ("test_accuracy.png", "val_accuracy.png"):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.render(str(workdir / "results.json"))[0] == str(workdir / "results.md")
    assert (workdir / "results.md").read_text() == md


def test_a_rerun_reuses_every_student_and_keeps_the_report(study):
    config, workdir, results = study
    before = (workdir / "results.json").read_text()
    again = pipeline.train_and_evaluate(config, str(workdir), command="pytest smoke study")
    assert again["paired"] == results["paired"]
    assert (workdir / "results.json").read_text() == before  # only `meta` differs: nothing is set aside
    assert not list(workdir.glob("results.*.json"))


@pytest.mark.parametrize(
    "diff, want",
    [
        ({"mean": 0.02, "ci": [0.01, 0.03], "wins": 3, "n": 3, "confidence": 0.95}, "better than KD"),
        ({"mean": -0.02, "ci": [-0.03, -0.01], "wins": 0, "n": 3, "confidence": 0.95}, "worse than KD"),
        ({"mean": 0.01, "ci": [-0.01, 0.03], "wins": 2, "n": 3, "confidence": 0.95}, "not distinguishable"),
        ({"mean": 0.01, "ci": None, "wins": 1, "n": 1, "confidence": 0.95}, "no interval with one seed"),
    ],
)
def test_verdict_follows_the_interval(diff, want):
    sentence = report.verdict("DeBKD", "KD", diff)
    assert want in sentence and f"better in {diff['wins']} of {diff['n']} seeds" in sentence
    assert math.isclose(float(sentence.split(": ")[1].split(" pp")[0]), 100 * diff["mean"])


def test_headline_row_agrees_with_the_json(study):
    _, _, results = study
    table = report.headline_table({"smoke": results}).splitlines()
    assert len(table) == 3 and table[2].startswith(
        f"| smoke | {report.stat_cell(results['teacher']['test']['accuracy'])} |"
    )
    for ref in ("KD", "CE"):
        d = results["paired"][ref]["DeBKD"]
        assert (
            f"{100 * d['mean']:+.2f} ({100 * d['ci'][0]:+.2f} to {100 * d['ci'][1]:+.2f}), {d['wins']}/2"
            in table[2]
        )
    rows = results["methods"]
    best = max(rows, key=lambda m: rows[m]["test"]["accuracy"]["mean"])
    assert table[2].endswith(f"| {best} ({report.stat_cell(rows[best]['test']['accuracy'])}) |")


def _shifted(results: dict, shifts: dict) -> dict:
    """A copy of `results` with each per-seed test accuracy of a method moved by `shifts[method]`."""
    other = copy.deepcopy(results)
    for name, row in other["methods"].items():
        for per_seed, shift in zip(
            row["per_seed"], shifts.get(name, [0.0] * len(row["per_seed"])), strict=True
        ):
            per_seed["accuracy"] += shift
        row["test"] = metrics.mean_std(row["per_seed"])
    return other


def test_comparison_pairs_the_seeds_of_two_runs(study, tmp_path):
    _, workdir, results = study
    other = _shifted(results, {"DeBKD": [0.02, 0.04], "KD": [-0.01, 0.01]})
    del other["methods"]["DKD"]  # only the methods both runs have are compared
    comparison = report.compare_results(results, other, ("folds=1", "folds=3"))
    assert list(comparison["methods"]) == ["CE", "KD", "DeBKD"]
    for name, row in comparison["methods"].items():
        before = [s["accuracy"] for s in results["methods"][name]["per_seed"]]
        after = [s["accuracy"] for s in other["methods"][name]["per_seed"]]
        assert row["paired"] == metrics.paired_difference(after, before)
        assert row["per_seed"] == [before, after]
    assert comparison["methods"]["DeBKD"]["paired"]["mean"] == pytest.approx(0.03)
    assert comparison["methods"]["DeBKD"]["paired"]["wins"] == 2

    # The CLI writes the report from the two JSON files alone; its table has one row per method.
    (tmp_path / "b").mkdir()
    workdir_lib.write_json(str(tmp_path / "b" / "results.json"), other)
    assert (
        render.main(
            [
                "--compare",
                str(tmp_path / "out"),
                "--labels=folds=1,folds=3",
                str(workdir / "results.json"),
                str(tmp_path / "b" / "results.json"),
            ]
        )
        == 0
    )
    saved = workdir_lib.read_json(str(tmp_path / "out" / "comparison.json"))
    assert saved == workdir_lib.jsonable(comparison)
    table = [
        line
        for line in (tmp_path / "out" / "comparison.md").read_text().splitlines()
        if line.startswith("| ")
    ]
    assert [line.split(" | ")[0][2:] for line in table[1:]] == ["CE", "KD", "DeBKD"]
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_comparison_refuses_runs_that_are_not_paired(study):
    _, _, results = study
    other = copy.deepcopy(results)
    other["methods"]["KD"]["seeds"] = [5, 6]
    with pytest.raises(UserError, match="same seeds"):
        report.compare_results(results, other, ("a", "b"))
    other = copy.deepcopy(results)
    other["dataset"]["sizes"]["train"] += 1
    with pytest.raises(UserError, match="other data"):
        report.compare_results(results, other, ("a", "b"))


def test_committed_results_name_no_machine_paths():
    """Committed results and reports name data and run folders as they were given, relative to the checkout:
    no absolute path of the machine they ran on."""
    import re

    absolute = re.compile(r"(?<![\w.~])/(work|tmp|home|root|Users|mnt|data|scratch)/")
    files = [p for p in (REPO / "results").rglob("*") if p.suffix in (".json", ".md")]
    assert files, "no committed results found"
    found = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in files for m in absolute.finditer(p.read_text())]
    assert not found, found[:5]
