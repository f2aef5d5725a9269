"""debkd_jax: de-biased knowledge distillation (DeBKD, KD, FKD, BTKD, DKD) in JAX/Flax.

The core is pure functions of arrays: `targets` turns a teacher's logits into per-sample target arrays once,
`losses` scores a student's logits against them inside a jitted step.

The names below are imported on first use (PEP 562), so that `import debkd_jax.config_lib` and the command
lines' launching process (`debkd_jax.supervisor`) start without importing JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "losses": (
        "box_projection",
        "btkd_loss",
        "cross_entropy",
        "debiased_kl",
        "debkd_loss",
        "dkd_loss",
        "dynamic_weight",
        "hint_loss",
        "kd_loss",
        "region_hit_rate",
        "region_hits",
        "soft_kl",
    ),
    "targets": (
        "Targets",
        "build_targets",
        "debiased_regions",
        "infusion_table",
        "knowledge_infusion",
        "label_interval",
        "rectify_logits",
        "teacher_correct",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from debkd_jax.losses import (  # noqa: F401
        box_projection,
        btkd_loss,
        cross_entropy,
        debiased_kl,
        debkd_loss,
        dkd_loss,
        dynamic_weight,
        hint_loss,
        kd_loss,
        region_hit_rate,
        region_hits,
        soft_kl,
    )
    from debkd_jax.targets import (  # noqa: F401
        Targets,
        build_targets,
        debiased_regions,
        infusion_table,
        knowledge_infusion,
        label_interval,
        rectify_logits,
        teacher_correct,
    )


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'debkd_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"debkd_jax.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *__all__})
