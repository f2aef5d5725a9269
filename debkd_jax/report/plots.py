"""Plots (PNG) generated from a results JSON alone: test accuracy per seed, validation accuracy per epoch (the
paper's Figure 4), two runs compared seed by seed, and a sweep's test accuracy against the swept value."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from debkd_jax import workdir_lib


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
    """The paper's Figure 4: validation accuracy per epoch for each method (mean over seeds) and the
    teacher."""
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


def plot_sweep(results: dict, path: str) -> None:
    """Test accuracy vs the swept value, error bars one std over seeds; the teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["points"]
    values = [list(r["values"].values()) for r in rows]
    numeric = len(results["sweep"]["fields"]) == 1 and all(
        isinstance(v[0], (int, float)) and not isinstance(v[0], bool) for v in values
    )
    x = [v[0] for v in values] if numeric else list(range(len(rows)))
    mean = [100 * r["test"]["accuracy"]["mean"] for r in rows]
    std = [100 * r["test"]["accuracy"]["std"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.errorbar(x, mean, yerr=std, marker="o", capsize=4, label=f"{results['student_model']} students")
    for xi, r in zip(x, rows, strict=True):
        if r["label"] == results["chosen"]:
            ax.plot(
                [xi],
                [100 * r["test"]["accuracy"]["mean"]],
                marker="*",
                markersize=14,
                color="C3",
                linestyle="none",
                label="chosen on validation",
            )
    teacher_line(ax, results)
    ax.set_xticks(x)
    ax.set_xticklabels([r["label"] for r in rows])
    ax.set_xlabel(results["sweep"]["x_label"])
    ax.set_ylabel("test accuracy (%)")
    n_seeds = max((len(r["seeds"]) for r in rows), default=0)
    ax.set_title(
        f"{results['sweep']['method']} on {results['dataset']['source']} ({n_seeds} seed(s))", fontsize=9
    )
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
