"""debkd_jax: de-biased knowledge distillation (DeBKD, KD, FKD, BTKD, DKD) in JAX/Flax.

The core is pure functions of arrays: `targets` turns a teacher's logits into per-sample target arrays once,
`losses` scores a student's logits against them inside a jitted step.
"""

from debkd_jax.losses import (
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
from debkd_jax.targets import (
    Targets,
    build_targets,
    debiased_regions,
    infusion_table,
    knowledge_infusion,
    label_interval,
    rectify_logits,
    teacher_correct,
)

__version__ = "0.1.0"

__all__ = [
    "Targets",
    "box_projection",
    "btkd_loss",
    "build_targets",
    "cross_entropy",
    "debiased_kl",
    "debiased_regions",
    "debkd_loss",
    "dkd_loss",
    "dynamic_weight",
    "hint_loss",
    "infusion_table",
    "kd_loss",
    "knowledge_infusion",
    "label_interval",
    "rectify_logits",
    "region_hit_rate",
    "region_hits",
    "soft_kl",
    "teacher_correct",
]
