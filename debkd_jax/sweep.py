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

The teacher is trained once (or reused: same `workdir/teacher` as `debkd_jax.main`, or `teacher.checkpoint`;
or given: `teacher.variables`, `teacher.logits`), its logits are computed once and cached, and each point's
student is trained by `pipeline.train_student` for seeds `seed, seed+1, ...`. A finished point is reused on a
re-run: its folder `sweeps/<name>-<student>/<point>-seed<s>-<hash>` holds the run whose identity
(`pipeline.student_identity`, the same as `main`'s: method, student training config, data, teacher logits)
it was claimed with, so a changed config trains new points instead of reusing stale ones, and an interrupted
point resumes from its last checkpoint. Writes `sweep-<name>-<student>.{md,json,png}` into the workdir: per
point, mean ± std over seeds of the test metrics; the point chosen on validation.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections

from debkd_jax import cli, console, methods, pipeline, report, workdir_lib, xla_cpu
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


def _basename(config) -> str:
    return f"sweep-{workdir_lib.safe_name(config.sweep.name)}-{workdir_lib.safe_name(config.student.model)}"


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Teacher (once) -> cached logits -> one student per point and seed -> table, JSON and plot. Returns the
    results dict written to `sweep-<name>-<student>.json`."""
    points = sweep_points(config)
    setup = pipeline.check(config, workdir)
    source, mesh = setup.source, setup.mesh
    workdir = workdir_lib.expand(workdir)
    basename = _basename(config)
    sweep_dir = os.path.join(workdir, "sweeps", basename[len("sweep-") :])
    writer = jax.process_index() == 0
    with workdir_lib.Workdir(workdir, writer=writer):
        if writer:
            workdir_lib.atomic_write_bytes(
                os.path.join(sweep_dir, "config.json"), config.to_json_best_effort(indent=2).encode()
            )
        pipeline.record_data(source, sweep_dir, writer, setup.why)
        log.info(
            "sweep %s: %s over %s = %s, %d point(s) x %d seed(s)",
            config.sweep.name,
            config.sweep.method,
            ",".join(_fields(config.sweep)),
            [p.label for p in points],
            len(points),
            config.seeds,
        )
        teacher = pipeline.get_teacher(
            config=config,
            source=source,
            teacher_dir=os.path.join(workdir, "teacher"),
            mesh=mesh,
            given=setup.given,
        )

        targets = pipeline.student_targets(
            config=config,
            source=source,
            teacher=teacher,
            teacher_dir=os.path.join(workdir, "teacher"),
            mesh=mesh,
        )
        jobs = [(p, config.seed + s) for p in points for s in range(config.seeds)]
        runs: dict[str, list[dict]] = {p.label: [] for p in points}
        bar = console.progress(
            jobs, desc=f"sweep {config.sweep.name}", total=len(jobs), disable=not config.progress, unit="run"
        )
        for point, seed in bar:
            identity = pipeline.student_identity(
                config=config,
                method_cfg=point.method_cfg,
                seed=seed,
                source=source,
                teacher=teacher,
                targets=targets,
            )
            run_dir = pipeline.run_folder(sweep_dir, f"{point.slug}-seed{seed}", identity)
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"{point.label}, seed {seed}")
            result = pipeline.train_student(
                config=config,
                method_name=f"{config.sweep.method} {point.label}",
                method_cfg=point.method_cfg,
                seed=seed,
                source=source,
                teacher=teacher,
                targets=targets,
                mesh=mesh,
                run_dir=run_dir,
            )
            runs[point.label].append({**result, "run_dir": os.path.relpath(run_dir, workdir)})

        results = report.sweep_summary(
            config=config,
            points=points,
            runs=runs,
            source=source,
            teacher_meta=teacher.meta,
            teacher_test=teacher.test_metrics(source),
        )
        if writer:
            report.write_sweep_results(workdir, basename, results)
        return results


# ----------------------------------------------------------------------------------------------------------
# The command line.


def main(argv) -> int:
    from absl import flags

    cli.start(argv)
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    cli.supervise(config)
    console.log_to_stderr()
    with cli.user_errors(workdir):
        results = run_sweep(config, workdir)
    basename = _basename(config)
    print()
    print(report.sweep_table(results))
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
