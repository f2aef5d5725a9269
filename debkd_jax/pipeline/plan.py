"""What a job will do, without doing it: `plan(config, workdir)` checks the config exactly as the job does
(nothing is written) and describes the run from what the job builds from it: the data source, the teacher's
origin, each model's learning-rate schedule and optimizer, each method's loss and targets on a fixed probe
batch, the run identities. `python -m debkd_jax.main --plan` prints it.

A field that changes none of this is a field the job ignores; `tests/test_config_fields.py` walks every field
of the configs, on both kinds of data, and requires each to change the plan or to be refused here in one line.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np

from debkd_jax import methods, training, workdir_lib
from debkd_jax.data import source as source_lib
from debkd_jax.data import views as views_lib
from debkd_jax.data.batching import PAD
from debkd_jax.pipeline.identity import student_identity, teacher_identity
from debkd_jax.pipeline.job import check
from debkd_jax.pipeline.teacher import Teacher
from debkd_jax.pipeline.teacher_pass import stored_top_k
from debkd_jax.pipeline.teacher_training import teacher_meta

PROBE_ROWS = 8


def plan(config, workdir: str) -> dict:
    """The plan of `train_and_evaluate(config, workdir)` (module docstring), JSON-able."""
    setup = check(config, workdir)
    source, mesh = setup.source, setup.mesh
    return {
        "run": {
            "seeds": list(range(config.seed, config.seed + config.seeds)),
            "dtype": config.dtype,
            "conv_backward": training.resolve_conv_backward(
                config.get("conv_backward", "auto"), mesh, config.dtype
            ),
            "progress": bool(config.progress),
            "overwrite": bool(config.overwrite),
            "distributed": training.distributed_kwargs(config) if config.distributed else None,
            "devices": int(mesh.devices.size),
        },
        "data": data_plan(config, source, setup.why),
        "targets": targets_plan(config, source),
        "teacher": teacher_plan(config, source, setup.given),
        "students": [
            student_plan(config, name, method_cfg, seed, source)
            for name, method_cfg in methods.ordered(config.methods)
            for seed in range(config.seed, config.seed + config.seeds)
        ],
    }


def data_plan(config, source: source_lib.DataSource, why: str) -> dict:
    rows = {
        name: hashlib.sha256(
            "\n".join(f"{i},{y}" for i, y in zip(split.ids, split.labels, strict=True)).encode()
        ).hexdigest()[:16]
        for name, split in source.splits.items()
    }
    out = {
        "kind": source.kind,
        "why": why,
        "source": source.name,
        "fingerprint": source.fingerprint,
        "classes": list(source.class_names),
        "rows": rows,
        "preprocessing": source.preprocessing,
        "augment": source.augment,
        "augments_on_device": source.augments_on_device,
        "cache_dir": workdir_lib.expand(config.data.cache_dir) if config.data.cache_dir else None,
    }
    if source.kind == "files":
        out.update(workers=source.workers, logits_chunk_rows=config.data.logits_chunk_rows)
    return out


def targets_plan(config, source: source_lib.DataSource) -> dict:
    """Where the students' targets will come from, and the views a model trains on: with augmentation, the
    first images' view parameters (crop offsets and flips; with mixup, partners and ratios) of the first
    views."""
    mode = config.get("targets", "fixed")
    out = {"mode": mode, "views": None}
    if source.augment:
        rows = np.arange(min(4, len(source.splits["train"])))
        keys = np.concatenate(
            [views_lib.view_keys(source.view_seed, rows, v) for v in range(min(3, source.views))]
        )
        offsets, flips = views_lib.crop_params(keys, PAD)
        out["views"] = {"count": source.views, "offsets": offsets.tolist(), "flips": flips.tolist()}
        if source.mixup:
            partners, lam = views_lib.mixup_params(keys, len(source.splits["train"]), source.mixup)
            out["views"].update(partners=partners.tolist(), mix=np.round(lam, 6).tolist())
    if mode == "stored" and source.augment:
        top_k = stored_top_k(config, source) or None
        out["stored"] = {"rows": source.views * len(source.splits["train"]), "top_k": top_k}
    return out


def training_plan(cfg, num_rows: int) -> dict:
    """A model's training as the job builds it: its schedule sampled at the first steps, at every epoch's
    start and at the last step, and its optimizer's other settings."""
    steps = num_rows // cfg.batch_size
    schedule = training.learning_rate_schedule(cfg, max(steps, 1))
    total = cfg.num_epochs * steps
    samples = sorted({0, 1, 2, *(e * steps for e in range(cfg.num_epochs)), max(total - 1, 0)})
    return {
        "model": cfg.model,
        "epochs": cfg.num_epochs,
        "batch_size": cfg.batch_size,
        "steps_per_epoch": steps,
        "learning_rate": [round(float(schedule(s)), 9) for s in samples],
        "momentum": cfg.momentum,
        "nesterov": bool(cfg.get("nesterov", True)),
        "weight_decay": cfg.weight_decay,
        "eval_batch_size": cfg.eval_batch_size,
    }


def teacher_plan(config, source: source_lib.DataSource, given: Teacher | None) -> dict:
    t = config.teacher
    out = {
        "folds": t.get("folds", 1),
        "logits_dtype": t.get("logits_dtype", "float32"),
        "eval_batch_size": t.eval_batch_size,
    }
    if given is not None and given.logits is not None:
        return {
            **out,
            "origin": "logits file",
            "sha256": given.meta["logits_sha256"],
            "splits": given.meta["splits"],
        }
    if given is not None:
        return {**out, "origin": "variables", "path": given.meta["variables"], "model": given.meta["model"]}
    if t.get("checkpoint", ""):
        out.update(origin="checkpoint", path=workdir_lib.expand(t.checkpoint), model=t.model)
        if t.get("folds", 1) == 1:  # the fold teachers train here with the teacher's config
            return out
    else:
        out["origin"] = "trained here"
    meta = teacher_meta(config, source)
    return {
        **out,
        "training": training_plan(t, len(source.splits["train"])),
        "identity": teacher_identity(config, meta, source),
    }


def objective_probe(method_cfg, num_epochs: int, num_classes: int, online: bool = False) -> dict:
    """The method's loss on a fixed probe batch at its first, middle and last epochs, and the targets it
    builds from fixed teacher logits (which its test report's region hit rate reads): what every method field
    acts on."""
    rng = np.random.default_rng(0)
    labels = np.arange(PROBE_ROWS, dtype=np.int32) % num_classes
    teacher = (rng.normal(size=(PROBE_ROWS, num_classes)) * 3).astype(np.float32)
    teacher[np.arange(PROBE_ROWS // 2), labels[: PROBE_ROWS // 2]] += 6.0  # some right, some wrong
    student = (rng.normal(size=(PROBE_ROWS, num_classes)) * 2).astype(np.float32)
    rows = methods.method_targets(method_cfg, teacher, labels)
    objective = methods.objective(method_cfg, num_epochs, online_targets=online)
    epochs = sorted({0, num_epochs // 2, max(num_epochs - 1, 0)})
    loss = [round(float(objective.loss_fn(student, labels, rows, 0.25, float(e))), 7) for e in epochs]
    return {
        "loss": loss,
        "targets": {
            name: np.round(np.asarray(getattr(rows, name), np.float64), 5).tolist()
            for name in ("logits", "lo", "hi")
        },
        "teacher_in_step": objective.needs_teacher_online,
        "hints": objective.uses_hints,
    }


def student_plan(config, name: str, method_cfg, seed: int, source: source_lib.DataSource) -> dict:
    unknown_teacher = Teacher(None, {}, None, "decided by the teacher's logits")
    return {
        "method": name,
        "seed": seed,
        "objective": objective_probe(
            method_cfg,
            config.student.num_epochs,
            source.num_classes,
            config.get("targets", "fixed") == "online",
        ),
        "training": training_plan(config.student, len(source.splits["train"])),
        "identity": student_identity(
            config=config, method_cfg=method_cfg, seed=seed, source=source, teacher=unknown_teacher
        ),
    }


def json_ready(tree):
    """The plan with every leaf a plain JSON value."""
    return jax.tree.map(lambda v: v.item() if isinstance(v, np.generic) else v, workdir_lib.jsonable(tree))
