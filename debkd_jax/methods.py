"""A method is a config: the named presets of every method, and the one function that turns a method config
into (target transforms, loss function).

A method config is a flat `ml_collections.ConfigDict` with the fields of `DEFAULTS`. `loss` picks the loss
(`ce`, `kd`, `debkd`, `btkd`, `dkd`), `transforms` the teacher-logit transforms applied before targets and
regions are built (`knowledge_infusion`, `rectify`, in order), `hint_weight > 0` adds FitNets hints (FKD), and
`weight_schedule` puts BTKD's `cos^2` schedule on the distillation weight of any loss. docs/methods.md lists
the presets; docs/method.md gives their formulas and the choices made where the papers are silent (§15).

Schedules use the integer epoch `e = floor(step / steps_per_epoch)`, counted from 0:
- `cos2`: `b(e) = cos^2(pi/2 * e / E)` (docs/method.md §10). It is BTKD's easy/hard split `b`; on any other
  loss it multiplies the distillation weight (KD's `alpha`, DeBKD's `beta`, DKD's `alpha` and `beta`). BTKD
  without it keeps `b = 1/2`.
- DKD's warm-up: the distillation term is multiplied by `min((e + 1) / warmup_epochs, 1)`, as mdistiller's
  `min(epoch / warmup, 1)` with its epochs counted from 1.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from debkd_jax import losses, targets
from debkd_jax.method_configs import (  # noqa: F401 - part of this module's interface
    DEFAULTS,
    LOSSES,
    PRESETS,
    RENAMED,
    SCHEDULES,
    check_fields,
    method,
    ordered,
    preset,
)

log = logging.getLogger("debkd_jax")


def validate(name: str, cfg) -> None:
    """Checks one method config; raises ValueError naming the method, the field and the valid values."""
    check_fields(cfg.keys(), f"method {name!r}: unknown field")

    def bad(field, why):
        return ValueError(f"method {name!r}: {field}={cfg[field]!r} {why}.")

    if cfg.loss not in LOSSES:
        raise bad("loss", f"is not one of {LOSSES}")
    transforms = _as_tuple(cfg.transforms)
    for t in transforms:
        if t not in targets.TRANSFORMS:
            raise bad("transforms", f"has {t!r}, not one of {targets.TRANSFORMS}")
    if len(set(transforms)) != len(transforms):
        raise bad("transforms", "names a transform twice")
    for field in ("temperature", "num_regions", "beta", "alpha", "lam", "hint_weight", "warmup_epochs"):
        if isinstance(cfg[field], bool) or not isinstance(cfg[field], (int, float)):
            raise bad(field, "must be a number")
    for field in ("scale_by_t2",):
        if not isinstance(cfg[field], bool):
            raise bad(field, "must be True or False")
    if cfg.ki_mode not in targets.INFUSION_MODES:
        raise bad("ki_mode", f"is not one of {targets.INFUSION_MODES}")
    if cfg.rectify_mode not in targets.RECTIFY_MODES:
        raise bad("rectify_mode", f"is not one of {targets.RECTIFY_MODES}")
    if cfg.weight_schedule not in SCHEDULES:
        raise bad("weight_schedule", f"is not one of {SCHEDULES}")
    if not cfg.temperature > 0:
        raise bad("temperature", "must be > 0")
    if not (int(cfg.num_regions) == cfg.num_regions and cfg.num_regions >= 1):
        raise bad("num_regions", "must be an integer >= 1")
    for field in ("beta", "hint_weight", "warmup_epochs"):
        if cfg[field] < 0:
            raise bad(field, "must be >= 0")
    for field in ("alpha", "lam"):
        if not 0 <= cfg[field] <= 1:
            raise bad(field, "must lie in [0, 1]")
    read = fields_read(cfg)
    for field, default in DEFAULTS.items():
        if field not in read and _differs(cfg[field], default):
            raise ValueError(
                f"method {name!r}: {field}={cfg[field]!r} is not read by its loss {cfg.loss!r} with "
                "transforms "
                f"{transforms}; leave it at its default {default!r} (or pick a loss that reads it)."
            )


LOSS_FIELDS = {
    "ce": set(),
    "kd": {"alpha"},
    "debkd": {"beta", "scale_by_t2"},
    "btkd": {"lam", "rectify_mode"},
    "dkd": {"alpha", "beta", "warmup_epochs"},
}
"""The method fields each loss reads besides the ones every method reads (`fields_read`)."""


def fields_read(cfg) -> set[str]:
    """The fields of a method config that its training or its report reads: every method's targets (and so the
    region hit rate of its test report) use `transforms`, `temperature` and `num_regions`, and `hint_weight`
    adds FitNets hints to any loss; the rest depend on the loss and the transforms."""
    transforms = _as_tuple(cfg.transforms)
    read = {"loss", "transforms", "temperature", "num_regions", "hint_weight", *LOSS_FIELDS[cfg.loss]}
    if cfg.loss != "ce":
        read.add("weight_schedule")
    if "knowledge_infusion" in transforms:
        read.add("ki_mode")
    if "rectify" in transforms:
        read.add("rectify_mode")
    return read


def _differs(value, default) -> bool:
    if isinstance(value, (tuple, list)) or isinstance(default, (tuple, list)):
        return tuple(_as_tuple(value)) != tuple(default)
    return value != default


def _as_tuple(transforms) -> tuple[str, ...]:
    if isinstance(transforms, str):
        return tuple(t.strip() for t in transforms.split(",") if t.strip())
    return tuple(transforms)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a train step needs from a method: static switches and the loss of a batch."""

    transforms: tuple[str, ...]
    needs_teacher_online: bool
    uses_hints: bool
    loss_fn: Callable  # (logits, labels, rows: Targets, hint_loss, epoch) -> scalar; epoch may be traced


def schedule_weight(cfg, epoch, num_epochs: int):
    """The `weight_schedule` factor at (fractional, possibly traced) `epoch`: `b(floor(epoch))` or 1."""
    if cfg.weight_schedule == "cos2":
        return losses.dynamic_weight(jnp.floor(epoch), num_epochs)
    return jnp.float32(1.0)


def warmup_weight(cfg, epoch):
    """DKD's warm-up factor at (fractional, possibly traced) `epoch`: `min((floor(epoch) + 1) / W, 1)`,
    optax's linear schedule from 0 to 1 over `W` epochs counted from 1."""
    if not cfg.warmup_epochs:
        return jnp.float32(1.0)
    return optax.linear_schedule(0.0, 1.0, transition_steps=cfg.warmup_epochs)(jnp.floor(epoch) + 1.0)


def objective(cfg, num_epochs: int, online_targets: bool = False) -> Objective:
    """Turns a method config into its `Objective`. `epoch` (float: step / steps_per_epoch, traced) drives the
    schedules, which act on the integer epoch (module docstring). `online_targets` (`config.targets =
    "online"`): the targets come from the teacher run in the step on the batch's views (CE needs none)."""
    kind, t = cfg.loss, cfg.temperature
    if kind == "dkd" and cfg.warmup_epochs > num_epochs:
        log.warning(
            "DKD: warmup_epochs=%s > num_epochs=%s: its distillation term ramps to %.2f of full weight only.",
            cfg.warmup_epochs,
            num_epochs,
            num_epochs / cfg.warmup_epochs,
        )

    def loss_fn(logits, labels, rows: targets.Targets, hints, epoch):
        w = schedule_weight(cfg, epoch, num_epochs)
        if kind == "ce":
            loss = jnp.mean(losses.cross_entropy(logits, labels))
        elif kind == "kd":
            loss = losses.kd_loss(logits, rows.logits, labels, alpha=cfg.alpha * w, temperature=t)
        elif kind == "debkd":
            loss = losses.debkd_loss(
                logits,
                labels,
                rows.lo,
                rows.hi,
                beta=cfg.beta * w,
                temperature=t,
                scale_by_t2=cfg.scale_by_t2,
            )
        elif kind == "btkd":
            # BTKD's own schedule is b(e) on the easy/hard split; without "cos2" the split stays at b = 1/2.
            b = w if cfg.weight_schedule == "cos2" else jnp.float32(0.5)
            rectified = "rectify" in _as_tuple(cfg.transforms)
            loss = losses.btkd_loss(
                logits,
                rows.logits,
                labels,
                easy_weight=b,
                lam=cfg.lam,
                temperature=t,
                rectify=None if rectified else cfg.rectify_mode,
                teacher_correct=rows.correct,
            )
        else:
            loss = losses.dkd_loss(
                logits,
                rows.logits,
                labels,
                alpha=cfg.alpha,
                beta=cfg.beta,
                temperature=t,
                warmup=warmup_weight(cfg, epoch) * w,
            )
        if cfg.hint_weight:
            loss = loss + cfg.hint_weight * hints
        return loss

    uses_hints = bool(cfg.hint_weight)
    return Objective(
        transforms=_as_tuple(cfg.transforms),
        needs_teacher_online=uses_hints or (online_targets and cfg.loss != "ce"),
        uses_hints=uses_hints,
        loss_fn=loss_fn,
    )


def method_targets(cfg, teacher_logits, labels, infusion=None) -> targets.Targets:
    """The method's `Targets` for a set of teacher logits: `targets.build_targets` with the config's options.

    On host arrays the inputs are validated here (clear errors, e.g. knowledge infusion with no
    teacher-correct sample) and the transforms run as one compiled call rather than op by op; on traced arrays
    (online targets, inside the jitted step) it is the pure composition itself. (N, k), (N,) -> N rows.
    """
    transforms = _as_tuple(cfg.transforms)
    kw = dict(transforms=transforms, ki_mode=cfg.ki_mode, rectify_mode=cfg.rectify_mode)
    numeric = dict(temperature=cfg.temperature, num_regions=int(cfg.num_regions))
    traced = any(isinstance(a, jax.core.Tracer) for a in (teacher_logits, labels, infusion))
    ki_first = transforms[:1] == ("knowledge_infusion",)
    if traced or ("knowledge_infusion" in transforms and infusion is None and not ki_first):
        return targets.build_targets(teacher_logits, labels, infusion=infusion, **kw, **numeric)
    targets.check_logits_and_labels(teacher_logits, labels)
    if ki_first and infusion is None and not np.any(np.argmax(teacher_logits, -1) == np.asarray(labels)):
        targets.infusion_table(teacher_logits, labels, cfg.ki_mode)  # raises its message: no correct sample
    return _build_targets_jit(
        teacher_logits,
        jnp.asarray(labels, jnp.int32),
        infusion,
        numeric["temperature"],
        numeric["num_regions"],
        **kw,
    )


@functools.partial(jax.jit, static_argnames=("transforms", "ki_mode", "rectify_mode"))
def _build_targets_jit(
    teacher_logits, labels, infusion, temperature, num_regions, *, transforms, ki_mode, rectify_mode
):
    return targets.build_targets(
        teacher_logits,
        labels,
        transforms=transforms,
        ki_mode=ki_mode,
        rectify_mode=rectify_mode,
        temperature=temperature,
        num_regions=num_regions,
        infusion=infusion,
    )
