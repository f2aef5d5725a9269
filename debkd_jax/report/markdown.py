"""Markdown generated from a results JSON alone: the main job's report (the paper's Table 1 layout, paired
differences, what the targets do), a sweep's table, the headline table over studies, and two runs compared."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TABLE_METRICS = ("accuracy", "precision", "recall", "f1", "agreement", "region_hit_rate")


NO_TEACHER_TEST = "no test logits in the file"
"""The teacher row's cell when a logits file (`teacher.logits`) lacks the test split."""


def stat_cell(stat) -> str:
    """A share as % ("91.30"), or a mean/std over seeds as "91.30 ± 1.30" (the std only for n > 1)."""
    if isinstance(stat, dict):
        if stat["n"] > 1:
            return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"
        return f"{100 * stat['mean']:.2f}"
    return f"{100 * stat:.2f}"


def metric_cells(stats: dict) -> list[str]:
    """One cell per `TABLE_METRICS` entry; empty where the metric does not apply."""
    return [stat_cell(stats[m]) if m in stats else "" for m in TABLE_METRICS]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(results: dict) -> str:
    """A Markdown table laid out like the paper's Table 1: the teacher row, then one row per method (%), and
    each student's training time (mean over seeds)."""
    t = results["teacher"]
    cells = metric_cells(t["test"]) if t["test"] else [NO_TEACHER_TEST] + [""] * (len(TABLE_METRICS) - 1)
    rows = [[t["model"], "teacher", *cells, _seconds(t.get("wall_seconds"))]]
    rows += [
        [row["model"], name, *metric_cells(row["test"]), _seconds(row.get("wall_seconds"))]
        for name, row in results["methods"].items()
    ]
    return markdown_table(["model", "method", *TABLE_METRICS, "time (s)"], rows)


def _seconds(values) -> str:
    if values is None or (isinstance(values, list) and not values):
        return ""
    return f"{np.mean(values):.0f}"


TARGET_MODES = {
    "fixed": "the teacher's logits on each un-augmented image",
    "online": "the teacher run in every step on the view the student sees",
    "stored": "the teacher's logits on every view, computed once and stored",
}


def targets_sentence(record: dict) -> str:
    """Which `config.targets` setting the students' targets came from, and the views they trained on."""
    text = f"Targets: `{record['mode']}`, {TARGET_MODES.get(record['mode'], record['mode'])}"
    if record.get("augment"):
        mixup = f", mixup {record['mixup']}" if record.get("mixup") else ""
        text += f"; students trained on {record['views']} augmented views per image{mixup}"
    else:
        text += "; no augmentation (every setting gives the same targets)"
    return text + "."


def results_markdown(results: dict) -> str:
    """The whole report, generated from the results JSON alone."""
    d, t = results["dataset"], results["teacher"]
    seeds = max((len(r.get("seeds", [])) for r in results["methods"].values()), default=0)
    lines = [
        "# Results",
        "",
        f"Data: `{d['source']}` ({', '.join(d['class_names'])}), train/val/test = "
        f"{d['sizes']['train']}/{d['sizes']['val']}/{d['sizes']['test']}. Teacher {t['model']}; students "
        f"{results['student_model']}, {seeds} seed(s). Test metrics in %, {results['selection']}; mean ± std "
        "(population) over seeds where there are several.",
        "",
        results_table(results),
    ]
    if results.get("targets"):
        lines += ["", targets_sentence(results["targets"])]
    if t.get("accuracy"):
        acc = t["accuracy"]
        shown = {s: "not in the logits file" if acc[s] is None else f"{100 * acc[s]:.2f}%" for s in acc}
        lines += [
            "",
            f"Teacher accuracy: train {shown['train']}, validation {shown['val']}, test {shown['test']}. Its "
            "mistakes on the training set are what knowledge infusion and rectification change.",
        ]
    if t.get("out_of_fold"):
        lines += ["", out_of_fold_paragraph(t["out_of_fold"])]
    for ref, diffs in results.get("paired", {}).items():
        if not diffs:
            continue
        lines += [
            "",
            f"## Paired differences in test accuracy against {ref}",
            "",
            f"Per seed, method minus {ref} (same seed: same initialization and data order), in percentage "
            "points; the interval is Student's t over seeds.",
            "",
            paired_table(diffs),
            "",
            *[f"- {verdict(name, ref, diff)}" for name, diff in diffs.items()],
        ]
    table = targets_table(results)
    if table:
        lines += [
            "",
            "## What the targets do (training set)",
            "",
            "Targets wrong: the share of training images whose targets (the teacher's logits after the "
            "method's transforms) do not put the label first. Changed: the share of training images whose "
            "logits knowledge infusion or rectification replaced. Region width: the mean width of the "
            "interval the de-biased target of the true class may take.",
            "",
            table,
        ]
    lines += [
        "",
        "![test accuracy per seed](test_accuracy.png)",
        "",
        "![validation accuracy](val_accuracy.png)",
    ]
    meta = results.get("meta") or {}
    if meta:
        lines += ["", "## Run", ""]
        if meta.get("command"):
            lines += [f"Command: `{meta['command']}`", ""]
        versions = ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())
        minutes = (meta.get("student_seconds") or 0.0) / 60
        lines.append(
            f"Finished {meta.get('finished', '?')}; students' training time {minutes:.1f} min; {versions}."
        )
    return "\n".join(lines) + "\n"


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def verdict(name: str, ref: str, diff: dict) -> str:
    """One sentence on a paired difference, e.g. 'DeBKD vs KD: +0.53 pp (95% CI -1.20 to +2.26), better in
    2 of 3 seeds: not distinguishable from KD.'"""
    where = f"better in {diff['wins']} of {diff['n']} seeds"
    if diff["ci"] is None:
        return f"{name} vs {ref}: {_pp(diff['mean'])} pp on one seed ({where}): no interval with one seed."
    lo, hi = diff["ci"]
    conf = round(100 * diff["confidence"])
    if lo > 0:
        call = f"better than {ref}"
    elif hi < 0:
        call = f"worse than {ref}"
    else:
        call = f"not distinguishable from {ref} at this number of seeds"
    return f"{name} vs {ref}: {_pp(diff['mean'])} pp ({conf}% CI {_pp(lo)} to {_pp(hi)}), {where}: {call}."


def paired_table(diffs: dict) -> str:
    rows = []
    for name, d in diffs.items():
        ci = "" if d["ci"] is None else f"{_pp(d['ci'][0])} to {_pp(d['ci'][1])}"
        rows.append(
            [name, _pp(d["mean"]), ci, f"{d['wins']} of {d['n']}", " ".join(_pp(x) for x in d["per_seed"])]
        )
    return markdown_table(["method", "mean (pp)", "95% CI (pp)", "better in", "per seed (pp)"], rows)


def out_of_fold_paragraph(info: dict) -> str:
    """What `teacher.folds = K > 1` did (`pipeline.out_of_fold_logits`), for the report."""
    k = info["folds"]
    folds = info["fold_teachers"]
    minutes = sum(f.get("wall_seconds") or 0.0 for f in folds) / 60
    per_fold = ", ".join(f"{100 * f['heldout_accuracy']:.2f}% on its {f['heldout_images']}" for f in folds)
    return (
        f"Out-of-fold targets (teacher.folds={k}): the training images were split into {k} stratified folds "
        f"(seed {info['seed']}); each image's teacher logits come from the teacher trained on the other "
        f"{k - 1} folds, which never saw it. The train accuracy above is of these logits; the teacher "
        f"trained on all training images (the validation and test logits, and the teacher row) is right on "
        f"{100 * info['train_accuracy_own']:.2f}% of them. "
        f"Fold teachers on their held-out images: {per_fold}. "
        f"Cost: {info['teacher_trainings']} teacher trainings instead of 1 (the fold teachers' training "
        f"time {minutes:.1f} min)."
    )


def targets_table(results: dict) -> str:
    """What each method's targets do to the teacher's training logits (`pipeline.target_diagnostics`)."""
    rows = []
    for name, row in results["methods"].items():
        t = row.get("targets")
        if not t:
            continue
        width = f"{t['region_width']:.4f}" if t.get("region_width") is not None else ""
        rows.append([name, f"{100 * t['targets_wrong']:.2f}", f"{100 * t['changed']:.2f}", width])
    header = ["method", "targets wrong on train (%)", "train targets changed (%)", "mean region width"]
    return markdown_table(header, rows) if rows else ""


def sweep_table(results: dict) -> str:
    """A sweep's Markdown table: one row per point, test metrics in %, mean ± std over seeds."""
    rows = [
        [
            row["label"] + (" (chosen)" if row["label"] == results["chosen"] else ""),
            *metric_cells(row["test"]),
            stat_cell(row["val_accuracy"]),
            str(len(row["seeds"])),
        ]
        for row in results["points"]
    ]
    header = [results["sweep"]["x_label"], *TABLE_METRICS, "val accuracy", "seeds"]
    return markdown_table(header, rows)


def sweep_markdown(results: dict, basename: str) -> str:
    """A sweep's report (`<basename>.md`, its plot `<basename>.png`), from its results JSON alone."""
    s, d, t = results["sweep"], results["dataset"], results["teacher"]
    teacher = f"test accuracy {100 * t['test']['accuracy']:.2f}%" if t.get("test") else NO_TEACHER_TEST
    return (
        f"# Sweep `{s['name']}`: {s['method']} over {', '.join(s['fields'])}\n\n"
        f"Data: `{d['source']}` ({', '.join(d['class_names'])}), train/val/test = "
        f"{d['sizes']['train']}/{d['sizes']['val']}/{d['sizes']['test']}. Teacher {t['model']}: "
        f"{teacher}. Students: {results['student_model']}, "
        f"{results['student_epochs']} epochs. Test metrics in %, mean ± std over seeds; "
        f"{results['selection']}.\n\n"
        f"{sweep_table(results)}\n\n![test accuracy]({basename}.png)\n"
    )


def headline_table(studies: dict[str, dict], method: str = "DeBKD") -> str:
    """One row per study (`{name: results}`): the teacher, CE, KD and `method` (test accuracy, mean ± std),
    the paired differences of `method` against KD and CE (mean and 95% interval, pp), and the best method."""
    rows = []
    for name, results in studies.items():
        rows_by_method = results["methods"]

        def acc(m, rows_by_method=rows_by_method):
            return stat_cell(rows_by_method[m]["test"]["accuracy"]) if m in rows_by_method else ""

        def diff(ref, results=results):
            d = results.get("paired", {}).get(ref, {}).get(method)
            if d is None:
                return ""
            ci = "" if d["ci"] is None else f" ({_pp(d['ci'][0])} to {_pp(d['ci'][1])})"
            return f"{_pp(d['mean'])}{ci}, {d['wins']}/{d['n']}"

        best = max(rows_by_method, key=lambda m: rows_by_method[m]["test"]["accuracy"]["mean"])
        rows.append(
            [
                name,
                stat_cell(results["teacher"]["test"]["accuracy"]),
                acc("CE"),
                acc("KD"),
                acc(method),
                diff("KD"),
                diff("CE"),
                f"{best} ({stat_cell(rows_by_method[best]['test']['accuracy'])})",
            ]
        )
    header = [
        "study",
        "teacher",
        "CE",
        "KD",
        method,
        f"{method} − KD (pp), wins",
        f"{method} − CE (pp), wins",
        "best",
    ]
    return markdown_table(header, rows)


def comparison_markdown(comparison: dict) -> str:
    """The report of `compare_results`, from its JSON alone."""
    a, b = comparison["labels"]
    rows = []
    for name, row in comparison["methods"].items():
        d = row["paired"]
        ci = "" if d["ci"] is None else f"{_pp(d['ci'][0])} to {_pp(d['ci'][1])}"
        wrong = ["" if t is None else f"{100 * t['targets_wrong']:.2f}" for t in row["targets"]]
        rows.append(
            [
                name,
                stat_cell(row["accuracy"][0]),
                stat_cell(row["accuracy"][1]),
                _pp(d["mean"]),
                ci,
                f"{d['wins']} of {d['n']}",
                *wrong,
            ]
        )
    header = [
        "method",
        f"{a}: test acc.",
        f"{b}: test acc.",
        f"{b} − {a} (pp)",
        "95% CI (pp)",
        f"{b} better in",
        f"{a}: targets wrong on train (%)",
        f"{b}: targets wrong on train (%)",
    ]
    teacher_lines = []
    for label, t in zip(comparison["labels"], comparison["teacher"], strict=True):
        acc = t.get("accuracy") or {}
        test_cell = stat_cell(t["test"]["accuracy"]) if t.get("test") else "?"
        line = f"- {label}: teacher {t['model']}, test {test_cell}"
        if acc.get("train") is not None:
            line += (
                f"; the students' training logits are right on {100 * acc['train']:.2f}% of training images"
            )
        oof = t.get("out_of_fold")
        if oof:
            line += (
                f" (out-of-fold from {oof['folds']} fold teachers; the teacher's own: "
                f"{100 * oof['train_accuracy_own']:.2f}%); {oof['teacher_trainings']} teacher trainings"
            )
        teacher_lines.append(line + ".")
    d = comparison["dataset"]
    lines = [
        f"# {b} against {a}",
        "",
        f"Data: `{d['source']}`, "
        f"train/val/test = {d['sizes']['train']}/{d['sizes']['val']}/{d['sizes']['test']}. "
        "Test accuracy in % (mean ± std over seeds; checkpoints chosen on validation). The paired difference "
        f"is per seed ({b} minus {a}, same seed: same initialization and data order), with Student's t "
        "interval. Targets wrong: the share of training images whose targets (the teacher's logits after the "
        "method's transforms) do not put the label first; de-biasing can only act where this is above 0.",
        "",
        *teacher_lines,
        "",
        markdown_table(header, rows),
        "",
        *[f"- {name}: {verdict(b, a, row['paired'])}" for name, row in comparison["methods"].items()],
        "",
        "![per seed](comparison.png)",
    ]
    return "\n".join(lines) + "\n"
