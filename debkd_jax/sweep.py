"""Sweeps over method fields: one teacher, one student per value (and per seed), one table and one plot.

    python -m debkd_jax.sweep --config=configs/sweep_regions.py --workdir=runs/dogs     # the paper's Table 2
    python -m debkd_jax.sweep --config=configs/sweep_beta.py --workdir=runs/dogs        # its section 4.4.2
    python -m debkd_jax.sweep --config=configs/sweep_regions.py:digits,smoke --workdir=/tmp/sweep   # minutes

A sweep config is a run config (`config_lib.base_config`) with a `sweep` block:

    config.sweep.name = "regions"          # names the output files
    config.sweep.method = "DeBKD"          # a key of config.methods: the method every point starts from
    config.sweep.field = "num_regions"     # a method field; "beta,temperature" sweeps several together
    config.sweep.grid = (8, 10, 12, 14, 16)     # one value per point; several fields: one tuple per point
    config.sweep.x_label = "learning freedom 1/n"
    config.sweep.tick_format = "1/{}"      # how a value is printed ("{}" as is)

The teacher is trained once (or reused: same `workdir/teacher` as `debkd_jax.main`, or `teacher.checkpoint`),
its logits are computed once and cached, and each point's student is trained by `pipeline.train_student` for
seeds `seed, seed+1, ...`. A finished point is reused on a re-run: its folder
`sweeps/<name>-<student>/<point>-seed<s>-<hash>` is keyed by everything that decides its result (method,
student training config, data, teacher), so a changed config trains new points instead of reusing stale ones,
and an interrupted point resumes from its last checkpoint. Writes `sweep-<name>-<student>.{md,json,png}` into
the workdir: per point, mean ± std over seeds of the test metrics; the point chosen on validation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import jax
import ml_collections

from debkd_jax import cli, config_lib, methods, metrics, pipeline, report, training, workdir_lib, xla_cpu
from debkd_jax.errors import UserError

log = logging.getLogger("debkd_jax")


def sweep_block(name: str, method: str, field: str, grid, x_label: str = "", tick_format: str = "{}"):
    """The `config.sweep` block of a sweep config (see the module docstring)."""
    return ml_collections.ConfigDict(
        dict(
            name=name,
            method=method,
            field=field,
            grid=tuple(grid),
            x_label=x_label or field,
            tick_format=tick_format,
        )
    )


@dataclasses.dataclass(frozen=True)
class Point:
    """One value of the sweep: the overridden fields, its label and its method config."""

    values: dict[str, Any]
    label: str
    method_cfg: ml_collections.ConfigDict

    @property
    def slug(self) -> str:
        return workdir_lib.safe_name(",".join(f"{k}={v}" for k, v in self.values.items()))


def _fields(sweep) -> tuple[str, ...]:
    return tuple(f.strip() for f in str(sweep.field).split(",") if f.strip())


def _coerce(field: str, value):
    """A value as the type of the field's default: 12.0 -> 12 for num_regions, 1 -> 1.0 for beta."""
    default = methods.DEFAULTS[field]
    if isinstance(default, bool) or isinstance(value, bool):
        return value
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    return value


def sweep_points(config) -> list[Point]:
    """The sweep's points, validated: unknown fields, a missing base method or a bad value are UserErrors."""
    if "sweep" not in config:
        raise UserError(
            "this config has no `sweep` block; use a configs/sweep_*.py config (see debkd_jax/sweep.py)."
        )
    sweep = config.sweep
    if sweep.method not in config.methods:
        raise UserError(
            f"sweep.method={sweep.method!r} is not a key of config.methods {sorted(config.methods)}; "
            "the sweep starts every point from that method's config."
        )
    fields = _fields(sweep)
    if not fields:
        raise UserError("sweep.field is empty: name the method field to sweep, e.g. 'num_regions'.")
    unknown = [f for f in fields if f not in methods.DEFAULTS]
    if unknown:
        raise UserError(
            f"sweep.field names {unknown}, not method fields; valid fields: {sorted(methods.DEFAULTS)}."
        )
    grid = tuple(sweep.grid)
    if not grid:
        raise UserError("sweep.grid is empty: list at least one value.")
    base = config.methods[sweep.method].to_dict()
    points, labels = [], set()
    for value in grid:
        combo = tuple(value) if len(fields) > 1 and isinstance(value, (tuple, list)) else (value,)
        if len(combo) != len(fields):
            raise UserError(
                f"sweep.grid has {value!r}: with fields {fields} each value must be a tuple of "
                f"{len(fields)} values."
            )
        overrides = {f: _coerce(f, v) for f, v in zip(fields, combo, strict=True)}
        if len(fields) == 1:
            label = _format(sweep.tick_format, overrides[fields[0]])
        else:
            label = ", ".join(f"{f}={v}" for f, v in overrides.items())
        if label in labels:
            raise UserError(f"sweep.grid lists {value!r} twice.")
        labels.add(label)
        cfg = methods.method(**{**base, **overrides})
        name = f"{sweep.method} {label}"
        try:
            methods.validate(name, cfg)
        except ValueError as e:
            raise UserError(str(e)) from None
        points.append(Point(values=overrides, label=label, method_cfg=cfg))
    return points


def _format(fmt: str, value) -> str:
    try:
        return str(fmt or "{}").format(value)
    except (IndexError, KeyError, ValueError):
        return str(value)


def point_key(config, point: Point, seed: int, teacher_meta: dict) -> str:
    """A short hash of everything that decides a point's result."""
    payload = {
        "method": point.method_cfg.to_dict(),
        "student": config.student.to_dict(),
        "data": {k: v for k, v in config.data.to_dict().items() if k not in ("cache_dir", "tfds_data_dir")},
        "dtype": config.dtype,
        "seed": seed,
        "split_seed": config.seed,
        "teacher": {k: teacher_meta.get(k) for k in ("model", "data", "num_classes", "image_size")},
    }
    if "out_of_fold" in teacher_meta:
        payload["teacher_folds"] = teacher_meta["out_of_fold"]["folds"]
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def _basename(config) -> str:
    return f"sweep-{workdir_lib.safe_name(config.sweep.name)}-{workdir_lib.safe_name(config.student.model)}"


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Teacher (once) -> cached logits -> one student per point and seed -> table, JSON and plot. Returns the
    results dict written to `sweep-<name>-<student>.json`."""
    points = sweep_points(config)
    training.initialize_distributed(config)
    config_lib.validate_config(config)
    for field in ("logits", "variables"):
        if config.teacher.get(field, ""):
            raise UserError(
                f"teacher.{field}={config.teacher[field]!r}: sweeps do not take a teacher from elsewhere "
                f"yet; run python -m debkd_jax.main with it, or leave teacher.{field} empty."
            )
    workdir = workdir_lib.expand(workdir)
    basename = _basename(config)
    sweep_dir = os.path.join(workdir, "sweeps", basename[len("sweep-") :])
    writer = jax.process_index() == 0
    with workdir_lib.Workdir(workdir, writer=writer):
        if writer:
            workdir_lib.atomic_write_bytes(
                os.path.join(sweep_dir, "config.json"), config.to_json_best_effort(indent=2).encode()
            )
        mesh = training.create_mesh()
        dataset = pipeline.load_data(config)
        pipeline.check_folds(config, dataset)
        if dataset.skipped and writer:
            report.write_skipped_csv(dataset.skipped, os.path.join(sweep_dir, "skipped_files.csv"))
        log.info(
            "sweep %s: %s over %s = %s on %s, %d point(s) x %d seed(s)",
            config.sweep.name,
            config.sweep.method,
            ",".join(_fields(config.sweep)),
            [p.label for p in points],
            dataset.source,
            len(points),
            config.seeds,
        )
        teacher_dir = os.path.join(workdir, "teacher")
        teacher_vars, teacher_meta = pipeline.train_teacher(config, dataset, teacher_dir, mesh)
        t_logits = pipeline.teacher_logits(config, teacher_vars, teacher_meta, dataset, teacher_dir, mesh)
        t_logits, teacher_meta = pipeline.with_out_of_fold_logits(
            config, dataset, t_logits, teacher_meta, teacher_dir, mesh
        )
        teacher_test = metrics.classification_metrics(
            t_logits["test"], dataset.test_labels, num_classes=dataset.num_classes
        )
        jobs = [(p, config.seed + s) for p in points for s in range(config.seeds)]
        runs: dict[str, list[dict]] = {p.label: [] for p in points}
        bar = report.progress(
            jobs, desc=f"sweep {config.sweep.name}", total=len(jobs), disable=not config.progress, unit="run"
        )
        for point, seed in bar:
            run_dir = os.path.join(
                sweep_dir, f"{point.slug}-seed{seed}-{point_key(config, point, seed, teacher_meta)}"
            )
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"{point.label}, seed {seed}")
            result = pipeline.train_student(
                config,
                f"{config.sweep.method} {point.label}",
                point.method_cfg,
                seed,
                dataset,
                (teacher_vars, teacher_meta),
                t_logits,
                mesh,
                run_dir,
            )
            runs[point.label].append({**result, "run_dir": os.path.relpath(run_dir, workdir)})
        results = summarize(config, points, runs, dataset, teacher_meta, teacher_test)
        if writer:
            write_results(workdir, basename, results)
        return results


def summarize(config, points, runs: dict[str, list[dict]], dataset, teacher_meta, teacher_test) -> dict:
    """Per point: mean/std over seeds of the test metrics and of the best validation accuracy."""
    rows = []
    for p in points:
        group = runs[p.label]
        best_val = [max((e["val_accuracy"] for e in r["history"]), default=float("nan")) for r in group]
        rows.append(
            {
                "label": p.label,
                "values": p.values,
                **report.seed_summary(group),
                "val_accuracy": metrics.mean_std([{"best": v} for v in best_val])["best"],
                "run_dirs": [r["run_dir"] for r in group],
            }
        )
    chosen = max(range(len(rows)), key=lambda i: rows[i]["val_accuracy"]["mean"]) if rows else None
    sweep = config.sweep
    return {
        "sweep": {
            "name": sweep.name,
            "method": sweep.method,
            "fields": list(_fields(sweep)),
            "x_label": sweep.x_label,
            "base_method": config.methods[sweep.method].to_dict(),
        },
        "dataset": report.dataset_summary(dataset),
        "teacher": {"model": teacher_meta["model"], "test": teacher_test},
        "student_model": config.student.model,
        "student_epochs": config.student.num_epochs,
        "points": rows,
        "chosen": rows[chosen]["label"] if rows else None,
        "selection": "each run: checkpoint with the best validation accuracy; the chosen point: the best "
        "mean validation accuracy over seeds; all metrics on the test split",
    }


def results_table(results: dict) -> str:
    """Markdown: one row per point, test metrics in %, mean ± std over seeds."""
    rows = [
        [
            row["label"] + (" (chosen)" if row["label"] == results["chosen"] else ""),
            *report.metric_cells(row["test"]),
            report.stat_cell(row["val_accuracy"]),
            str(len(row["seeds"])),
        ]
        for row in results["points"]
    ]
    header = [results["sweep"]["x_label"], *report.TABLE_METRICS, "val accuracy", "seeds"]
    return report.markdown_table(header, rows)


def write_results(workdir: str, basename: str, results: dict) -> None:
    """`<basename>.json`, `.md` and `.png` through the one report path (`report.write_report`)."""
    s, d, t = results["sweep"], results["dataset"], results["teacher"]
    md = (
        f"# Sweep `{s['name']}`: {s['method']} over {', '.join(s['fields'])}\n\n"
        f"Data: `{d['source']}` ({', '.join(d['class_names'])}), train/val/test = "
        f"{d['sizes']['train']}/{d['sizes']['val']}/{d['sizes']['test']}. Teacher {t['model']}: test "
        f"accuracy {100 * t['test']['accuracy']:.2f}%. Students: {results['student_model']}, "
        f"{results['student_epochs']} epochs. Test metrics in %, mean ± std over seeds; "
        f"{results['selection']}.\n\n"
        f"{results_table(results)}\n\n![test accuracy]({basename}.png)\n"
    )
    report.write_report(workdir, basename, results, md, {f"{basename}.png": plot})


def plot(results: dict, path: str) -> None:
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
    report.teacher_line(ax, results)
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
    report.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# The command line.


def main(argv) -> int:
    from absl import flags

    cli.start(argv)
    report.log_to_stderr()
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    with cli.user_errors(workdir):
        results = run_sweep(config, workdir)
    basename = _basename(config)
    print()
    print(results_table(results))
    print(f"\nResults in {workdir}: {basename}.md, {basename}.json, {basename}.png")
    return 0


def run() -> None:
    """`python -m debkd_jax.sweep --config=configs/sweep_regions.py --workdir=DIR [--config.FIELD=V]`."""
    from absl import app, flags
    from ml_collections import config_flags

    # Defined here, not at import: tests import this module beside debkd_jax.main, which defines them too.
    flags.DEFINE_string(
        "workdir", "./workdir", "Folder of the run (its teacher/ is reused) and the sweep's results."
    )
    config_flags.DEFINE_config_file(
        "config", None, "A sweep config, e.g. configs/sweep_regions.py.", lock_config=True
    )
    flags.mark_flags_as_required(["config"])
    xla_cpu.apply_defaults()
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
