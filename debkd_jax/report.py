"""What a person sees, for `main` and `sweep` alike: progress bars, metrics as JSON lines and TensorBoard
events, results tables (Markdown), plots (PNG) and the JSON they are generated from."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Sequence

import numpy as np

from debkd_jax import metrics, workdir_lib
from debkd_jax.errors import UserError

TABLE_METRICS = ("accuracy", "precision", "recall", "f1", "agreement", "region_hit_rate")


def progress(iterable: Iterable, *, desc: str | None = None, disable: bool = False, **kw):
    """A tqdm bar on stderr (plain iteration when disabled), as wide as the terminal. A terminal that reports
    no size (a pseudo-terminal never sized, as under `script` or some CI runners) and a pipe get 100 columns:
    tqdm would otherwise draw empty lines there."""
    if disable:
        return iterable
    from tqdm.auto import tqdm

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        size = os.terminal_size((0, 0))
    shape = {"dynamic_ncols": True} if min(size) > 0 else {"ncols": 100, "nrows": 20}
    return tqdm(iterable, desc=desc, file=sys.stderr, **{"leave": True, **shape, **kw})


def log_to_stderr() -> None:
    """The CLIs' logging: this package's INFO messages on stderr, bare, once."""
    import logging

    ours = logging.getLogger("debkd_jax")
    ours.setLevel(logging.INFO)
    ours.propagate = False
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)


class MetricWriter:
    """Appends one JSON line per record to `metrics.jsonl` and writes the same scalars as TensorBoard events."""

    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = os.path.join(run_dir, "metrics.jsonl")
        self._tb_dir = os.path.join(run_dir, "tensorboard")
        self._tb = None

    def write(self, record: dict, extra_scalars: dict | None = None) -> None:
        """`record` goes to metrics.jsonl and TensorBoard; `extra_scalars` (wall-clock times, which differ
        from run to run) to TensorBoard only, so that metrics.jsonl is identical for identical runs."""
        # Re-running an epoch after a resume replaces its line: rewrite the file without later epochs first.
        lines = []
        if os.path.exists(self._jsonl):
            with open(self._jsonl, encoding="utf-8") as f:
                for line in f:
                    try:
                        if json.loads(line).get("epoch", 0) < record["epoch"]:
                            lines.append(line.rstrip("\n"))
                    except ValueError:
                        continue
        lines.append(json.dumps(record))
        workdir_lib.atomic_write_bytes(self._jsonl, ("\n".join(lines) + "\n").encode())
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self._tb_dir)
        for key, value in {**record, **(extra_scalars or {})}.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, record["epoch"])
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def seed_summary(group: Sequence[dict]) -> dict:
    """The runs of one method (or sweep point), one per seed: seeds, mean/std of each test metric, the
    per-seed metrics and the epochs chosen on validation."""
    return {
        "seeds": [r["seed"] for r in group],
        "test": metrics.mean_std([r["test"] for r in group]),
        "per_seed": [r["test"] for r in group],
        "best_epochs": [r["best_epoch"] for r in group],
    }


def dataset_summary(dataset) -> dict:
    """Source, class names, split sizes and per-class counts of a `data.Dataset`."""
    splits = ("train", "val", "test")
    return {
        "source": dataset.source,
        "class_names": list(dataset.class_names),
        "sizes": {s: int(len(getattr(dataset, f"{s}_labels"))) for s in splits},
        "class_counts": {
            s: np.bincount(getattr(dataset, f"{s}_labels"), minlength=dataset.num_classes).tolist()
            for s in splits
        },
        "skipped_files": len(dataset.skipped),
    }


def summarize(
    config,
    dataset,
    teacher_meta: dict,
    teacher_test: dict,
    runs: Sequence[dict],
    diagnostics: dict | None = None,
) -> dict:
    """Results of the whole job: the teacher row and, per method, mean/std over seeds of each test metric."""
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    rows = {
        name: {
            "model": group[0]["model"],
            **seed_summary(group),
            "val_accuracy": [[e["val_accuracy"] for e in r["history"]] for r in group],
            "wall_seconds": [r["wall_seconds"] for r in group if "wall_seconds" in r],
            "config": group[0]["config"],
        }
        for name, group in by_method.items()
    }
    diagnostics = diagnostics or {}
    for name, row in rows.items():
        if name in diagnostics.get("methods", {}):
            row["targets"] = diagnostics["methods"][name]
    return {
        "dataset": dataset_summary(dataset),
        "teacher": {
            "model": teacher_meta["model"],
            "test": teacher_test,
            "val_accuracy": [e["val_accuracy"] for e in teacher_meta.get("history", [])],
            "accuracy": diagnostics.get("teacher_accuracy"),
            "wall_seconds": teacher_meta.get("wall_seconds"),
            "out_of_fold": teacher_meta.get("out_of_fold"),
        },
        "student_model": config.student.model,
        "student_epochs": config.student.num_epochs,
        "methods": rows,
        "paired": paired_differences(rows),
        "selection": "checkpoint with the best validation accuracy; metrics on the test split",
    }


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


NO_TEACHER_TEST = "no test logits in the file"
"""The teacher row's cell when a logits file (`teacher.logits`) lacks the test split."""


def _seconds(values) -> str:
    if values is None or (isinstance(values, list) and not values):
        return ""
    return f"{np.mean(values):.0f}"


def _without_meta(results: dict) -> dict:
    """Results less `meta` (when and with what they were made), which a re-run changes."""
    return {k: v for k, v in results.items() if k != "meta"}


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


def teacher_line(ax, results: dict) -> None:
    """The teacher's test accuracy (%) as a dashed line, when the results have it."""
    if results["teacher"].get("test"):
        ax.axhline(
            100 * results["teacher"]["test"]["accuracy"],
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"teacher ({results['teacher']['model']})",
        )


def plot_test_accuracy(results: dict, path: str) -> None:
    """Every seed's test accuracy per method (points) with the mean (a bar), the teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(names) + 2), 4.0), dpi=120)
    for i, name in enumerate(names):
        values = [100 * s["accuracy"] for s in results["methods"][name].get("per_seed", [])]
        if not values:
            continue
        offsets = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else [0.0]
        ax.plot(i + np.asarray(offsets), values, "o", color="C0", alpha=0.7, markersize=5)
        ax.hlines(np.mean(values), i - 0.3, i + 0.3, color="C3", linewidth=2)
    teacher_line(ax, results)
    ax.plot([], [], "o", color="C0", label="one seed")
    ax.plot([], [], color="C3", linewidth=2, label="mean over seeds")
    finish_method_axes(ax, names, f"{results['student_model']} students on {results['dataset']['source']}")
    save_figure(fig, path)


def finish_method_axes(ax, names: Sequence[str], title: str) -> None:
    """Method names under the x ticks, test accuracy (%) on y, the title, grid and legend."""
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def plot_val_accuracy(results: dict, path: str) -> None:
    """The paper's Figure 4: validation accuracy per epoch for each method (mean over seeds) and the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, row in results["methods"].items():
        curves = [c for c in row["val_accuracy"] if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0) * 100
        ax.plot(np.arange(1, n + 1), mean, marker="o", markersize=3, label=name)
        if len(curves) > 1:
            std = np.std([c[:n] for c in curves], axis=0) * 100
            ax.fill_between(np.arange(1, n + 1), mean - std, mean + std, alpha=0.2)
    teacher_curve = results["teacher"].get("val_accuracy") or []
    if teacher_curve:
        ax.axhline(
            max(teacher_curve) * 100, color="black", linestyle="--", linewidth=1, label="teacher (best)"
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{results['student_model']} students on {results['dataset']['source']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    """Writes a matplotlib figure as PNG through the one atomic write, and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    workdir_lib.atomic_write_bytes(path, buf.getvalue())


def write_report(workdir: str, basename: str, results: dict, markdown: str, figures: dict) -> None:
    """`<basename>.json`, `<basename>.md` and each figure (`{file name: plot(results, path)}`).

    Reports are never overwritten: an older, different JSON is kept, with its Markdown and figures, as
    `<name>.<time>.<ext>`; identical results (a re-run that reused every finished run) leave the files as
    they are."""
    json_path = os.path.join(workdir, f"{basename}.json")
    md_path = os.path.join(workdir, f"{basename}.md")
    paths = [json_path, md_path, *(os.path.join(workdir, name) for name in figures)]
    old = workdir_lib.read_json(json_path)
    if old is not None and _without_meta(old) == _without_meta(workdir_lib.jsonable(results)):
        if all(os.path.exists(p) for p in paths):
            return
    elif os.path.exists(json_path):
        for src in paths:
            workdir_lib.keep_aside(src)
    workdir_lib.write_json(json_path, results)
    workdir_lib.atomic_write_bytes(md_path, markdown.encode())
    for name, plot in figures.items():
        plot(results, os.path.join(workdir, name))


def write_results(workdir: str, results: dict, basename: str = "results") -> None:
    """The main job's report: `results.json`, `results.md`, `test_accuracy.png` and `val_accuracy.png`."""
    figures = {"test_accuracy.png": plot_test_accuracy, "val_accuracy.png": plot_val_accuracy}
    write_report(workdir, basename, results, results_markdown(results), figures)


def write_skipped_csv(skipped, path: str) -> None:
    """`path,reason` rows, one per unreadable file, written atomically."""
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(["path", "reason"])
    out.writerows(skipped)
    workdir_lib.atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


REFERENCES = ("KD", "CE")
"""Methods the others are compared against, seed by seed, when the run has them."""


def paired_differences(methods_rows: dict, metric: str = "accuracy") -> dict:
    """`{reference: {method: metrics.paired_difference(method, reference)}}` of one test metric, for each
    reference of `REFERENCES` in the run and each other method trained on the same seeds."""
    out = {}
    for ref in REFERENCES:
        if ref not in methods_rows:
            continue
        base = methods_rows[ref]
        out[ref] = {
            name: metrics.paired_difference(
                [s[metric] for s in row["per_seed"]], [s[metric] for s in base["per_seed"]]
            )
            for name, row in methods_rows.items()
            if name != ref and row["seeds"] == base["seeds"]
        }
    return out


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
        f"{k - 1} folds, which never saw it. The train accuracy above is of these logits; the teacher trained "
        f"on all training images (the validation and test logits, and the teacher row) is right on "
        f"{100 * info['train_accuracy_own']:.2f}% of them. Fold teachers on their held-out images: {per_fold}. "
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


def headline_table(studies: dict[str, dict], method: str = "DeBKD") -> str:
    """One row per study (`{name: results}`): the teacher, CE, KD and `method` (test accuracy, mean ± std), the
    paired differences of `method` against KD and CE (mean and 95% interval, pp), and the best method."""
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


def compare_results(base: dict, other: dict, labels: tuple[str, str]) -> dict:
    """Two runs of the same data and seeds, side by side per method they share (e.g. teacher.folds = 1 and
    K): each one's test accuracy, the paired difference `other - base` over the seeds, and each one's
    target diagnostics. `UserError` when the two are not paired (other data or other seeds)."""
    if base["dataset"] != other["dataset"]:
        raise UserError(
            f"{labels[0]} and {labels[1]} were run on other data ({base['dataset']['source']}, sizes "
            f"{base['dataset']['sizes']} vs {other['dataset']['source']}, {other['dataset']['sizes']}); "
            "compare runs of one dataset and split."
        )
    rows = {}
    for name, a in base["methods"].items():
        b = other["methods"].get(name)
        if b is None:
            continue
        if a["seeds"] != b["seeds"]:
            raise UserError(
                f"{name}: {labels[0]} has seeds {a['seeds']} and {labels[1]} {b['seeds']}; paired "
                "differences need the same seeds."
            )
        rows[name] = {
            "seeds": a["seeds"],
            "accuracy": [a["test"]["accuracy"], b["test"]["accuracy"]],
            "per_seed": [[s["accuracy"] for s in a["per_seed"]], [s["accuracy"] for s in b["per_seed"]]],
            "paired": metrics.paired_difference(
                [s["accuracy"] for s in b["per_seed"]], [s["accuracy"] for s in a["per_seed"]]
            ),
            "targets": [a.get("targets"), b.get("targets")],
        }
    if not rows:
        raise UserError(f"{labels[0]} and {labels[1]} have no method in common.")
    return {
        "labels": list(labels),
        "dataset": base["dataset"],
        "teacher": [base["teacher"], other["teacher"]],
        "methods": rows,
    }


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
        line = f"- {label}: teacher {t['model']}, test {stat_cell(t['test']['accuracy']) if t.get('test') else '?'}"
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
        f"Data: `{d['source']}`, train/val/test = {d['sizes']['train']}/{d['sizes']['val']}/{d['sizes']['test']}. "
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


def plot_comparison(comparison: dict, path: str) -> None:
    """Per method, each seed's test accuracy in the two runs joined by a line (paired by seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(comparison["methods"])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 4.0), dpi=120)
    for i, name in enumerate(names):
        before, after = (100 * np.asarray(v) for v in comparison["methods"][name]["per_seed"])
        for x0, x1 in zip(before, after, strict=True):
            ax.plot([i - 0.18, i + 0.18], [x0, x1], color="C3" if x1 > x0 else "C0", alpha=0.6)
        ax.plot(np.full(len(before), i - 0.18), before, "o", color="grey", markersize=4)
        ax.plot(np.full(len(after), i + 0.18), after, "s", color="black", markersize=4)
    a, b = comparison["labels"]
    ax.plot([], [], "o", color="grey", label=a)
    ax.plot([], [], "s", color="black", label=b)
    ax.plot([], [], color="C3", label=f"{b} higher")
    ax.plot([], [], color="C0", label=f"{b} not higher")
    finish_method_axes(ax, names, f"{b} against {a}: each seed, paired")
    save_figure(fig, path)


def write_comparison(out_dir: str, comparison: dict) -> list[str]:
    """`comparison.json`, `comparison.md` and `comparison.png` in `out_dir` (an older, different comparison
    there is kept aside). Returns the paths."""
    write_report(
        out_dir,
        "comparison",
        comparison,
        comparison_markdown(comparison),
        {"comparison.png": plot_comparison},
    )
    return [os.path.join(out_dir, f) for f in ("comparison.json", "comparison.md", "comparison.png")]


def read_results(json_path: str) -> dict:
    """A main job's results.json; `UserError` for a file that is not one."""
    results = workdir_lib.read_json(json_path)
    if not isinstance(results, dict) or "methods" not in results:
        raise UserError(f"{json_path} is not a results.json written by `python -m debkd_jax.main`.")
    return results


def render(json_path: str) -> list[str]:
    """Regenerates the Markdown report and the plots beside a main job's `results.json` from that file alone
    (they are derived from it, so they are rewritten). Returns the paths written."""
    results = read_results(json_path)
    directory = os.path.dirname(os.path.abspath(json_path))
    basename = os.path.splitext(os.path.basename(json_path))[0]
    md_path = os.path.join(directory, f"{basename}.md")
    workdir_lib.atomic_write_bytes(md_path, results_markdown(results).encode())
    written = [md_path]
    for name, plot in (("test_accuracy.png", plot_test_accuracy), ("val_accuracy.png", plot_val_accuracy)):
        written.append(os.path.join(directory, name))
        plot(results, written[-1])
    return written
