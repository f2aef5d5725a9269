"""What a person sees: progress bars, metrics as JSON lines and TensorBoard events, the results table and plot."""

from __future__ import annotations

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


def summarize(config, dataset, teacher_meta: dict, teacher_test: dict, runs: Sequence[dict]) -> dict:
    """Results of the whole job: the teacher row and, per method, mean/std over seeds of each test metric."""
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    rows = {
        name: {
            "model": group[0]["model"],
            "seeds": [r["seed"] for r in group],
            "test": metrics.mean_std([r["test"] for r in group]),
            "per_seed": [r["test"] for r in group],
            "best_epochs": [r["best_epoch"] for r in group],
            "val_accuracy": [[e["val_accuracy"] for e in r["history"]] for r in group],
            "config": group[0]["config"],
        }
        for name, group in by_method.items()
    }
    return {
        "dataset": {
            "source": dataset.source,
            "class_names": list(dataset.class_names),
            "sizes": {s: int(len(getattr(dataset, f"{s}_labels"))) for s in ("train", "val", "test")},
            "class_counts": {
                s: np.bincount(getattr(dataset, f"{s}_labels"), minlength=dataset.num_classes).tolist()
                for s in ("train", "val", "test")
            },
            "skipped_files": len(dataset.skipped),
        },
        "teacher": {
            "model": teacher_meta["model"],
            "test": teacher_test,
            "val_accuracy": [e["val_accuracy"] for e in teacher_meta.get("history", [])],
        },
        "student_model": config.student.model,
        "methods": rows,
        "selection": "checkpoint with the best validation accuracy; metrics on the test split",
    }


def _cell(stat) -> str:
    if isinstance(stat, dict):
        if stat["n"] > 1:
            return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"
        return f"{100 * stat['mean']:.2f}"
    return f"{100 * stat:.2f}"


def results_table(results: dict) -> str:
    """A Markdown table laid out like the paper's Table 1: the teacher row, then one row per method (%)."""
    header = ["model", "method", *TABLE_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    t = results["teacher"]
    lines.append(
        "| "
        + " | ".join(
            [t["model"], "teacher", *[_cell(t["test"][m]) if m in t["test"] else "" for m in TABLE_METRICS]]
        )
        + " |"
    )
    for name, row in results["methods"].items():
        cells = [_cell(row["test"][m]) if m in row["test"] else "" for m in TABLE_METRICS]
        lines.append("| " + " | ".join([row["model"], name, *cells]) + " |")
    return "\n".join(lines)


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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    workdir_lib.atomic_write_bytes(path, buf.getvalue())


def write_results(workdir: str, results: dict, basename: str = "results") -> None:
    """results.json, results.md and the plot. Results are never overwritten: an older, different results.json
    is kept, with its results.md and plot, as results.<time>.json/.md and val_accuracy.<time>.png; identical
    results (a re-run that reused every finished run) leave the files as they are."""
    json_path = os.path.join(workdir, f"{basename}.json")
    plot_path = os.path.join(workdir, "val_accuracy.png")
    old = workdir_lib.read_json(json_path)
    if old is not None and old == json.loads(json.dumps(results, default=workdir_lib._json_default)):
        if os.path.exists(os.path.join(workdir, f"{basename}.md")) and os.path.exists(plot_path):
            return
    elif os.path.exists(json_path):
        for src in (json_path, os.path.join(workdir, f"{basename}.md"), plot_path):
            workdir_lib.keep_aside(src)
    workdir_lib.write_json(json_path, results)
    table = results_table(results)
    d = results["dataset"]
    md = (
        f"# Results\n\nData: `{d['source']}` ({', '.join(d['class_names'])}), "
        f"train/val/test = {d['sizes']['train']}/{d['sizes']['val']}/{d['sizes']['test']}. "
        f"Test metrics in %, {results['selection']}; mean ± std over seeds where there are several.\n\n"
        f"{table}\n\n![validation accuracy](val_accuracy.png)\n"
    )
    workdir_lib.atomic_write_bytes(os.path.join(workdir, f"{basename}.md"), md.encode())
    plot_val_accuracy(results, plot_path)
