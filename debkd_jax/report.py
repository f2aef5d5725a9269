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


def summarize(config, dataset, teacher_meta: dict, teacher_test: dict, runs: Sequence[dict]) -> dict:
    """Results of the whole job: the teacher row and, per method, mean/std over seeds of each test metric."""
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    rows = {
        name: {
            "model": group[0]["model"],
            **seed_summary(group),
            "val_accuracy": [[e["val_accuracy"] for e in r["history"]] for r in group],
            "config": group[0]["config"],
        }
        for name, group in by_method.items()
    }
    return {
        "dataset": dataset_summary(dataset),
        "teacher": {
            "model": teacher_meta["model"],
            "test": teacher_test,
            "val_accuracy": [e["val_accuracy"] for e in teacher_meta.get("history", [])],
        },
        "student_model": config.student.model,
        "methods": rows,
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
    """A Markdown table laid out like the paper's Table 1: the teacher row, then one row per method (%)."""
    t = results["teacher"]
    rows = [[t["model"], "teacher", *metric_cells(t["test"])]]
    rows += [[row["model"], name, *metric_cells(row["test"])] for name, row in results["methods"].items()]
    return markdown_table(["model", "method", *TABLE_METRICS], rows)


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
    if old is not None and old == workdir_lib.jsonable(results):
        if all(os.path.exists(p) for p in paths):
            return
    elif os.path.exists(json_path):
        for src in paths:
            workdir_lib.keep_aside(src)
    workdir_lib.write_json(json_path, results)
    workdir_lib.atomic_write_bytes(md_path, markdown.encode())
    for name, plot in figures.items():
        plot(results, os.path.join(workdir, name))


def results_markdown(results: dict) -> str:
    d = results["dataset"]
    return (
        f"# Results\n\nData: `{d['source']}` ({', '.join(d['class_names'])}), "
        f"train/val/test = {d['sizes']['train']}/{d['sizes']['val']}/{d['sizes']['test']}. "
        f"Test metrics in %, {results['selection']}; mean ± std over seeds where there are several.\n\n"
        f"{results_table(results)}\n\n![validation accuracy](val_accuracy.png)\n"
    )


def write_results(workdir: str, results: dict, basename: str = "results") -> None:
    """The main job's report: `results.json`, `results.md` and `val_accuracy.png` (`write_report`)."""
    write_report(
        workdir, basename, results, results_markdown(results), {"val_accuracy.png": plot_val_accuracy}
    )


def write_skipped_csv(skipped, path: str) -> None:
    """`path,reason` rows, one per unreadable file, written atomically."""
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(["path", "reason"])
    out.writerows(skipped)
    workdir_lib.atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
