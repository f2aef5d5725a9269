"""Method configs without JAX: the fields of a method and their defaults (`DEFAULTS`), the papers' presets
(`PRESETS`), and `method`/`preset`, which config files call. `debkd_jax.methods` adds their validation and
turns a config into its loss; this module stays importable without JAX, so that loading a config file
(a distributed job's launching process does) does not import it."""

from __future__ import annotations

from typing import Any

import ml_collections

LOSSES = ("ce", "kd", "debkd", "btkd", "dkd")
SCHEDULES = ("constant", "cos2")

DEFAULTS = dict(
    loss="debkd",
    transforms=("knowledge_infusion",),
    ki_mode="pooled",
    rectify_mode="swap",
    temperature=4.0,
    num_regions=12,
    beta=0.2,  # DeBKD: weight of the de-biased term; DKD: weight of NCKD
    alpha=0.9,  # KD: weight of the soft term; DKD: weight of TCKD
    lam=0.5,  # BTKD: weight of CE
    scale_by_t2=True,
    hint_weight=0.0,  # FKD: gamma of sum_l MSE over the hint taps (runs the teacher online)
    weight_schedule="constant",  # "cos2": multiply the distillation weight by b(e) = cos^2(pi/2 e/E)
    warmup_epochs=0,  # DKD: linear warm-up of the distillation term over this many epochs
)
RENAMED = {"online_targets": "config.targets = 'online' (one setting for every method: docs/method.md)"}


def check_fields(fields, prefix: str) -> None:
    """ValueError `{prefix}(s) [...]` for fields not in `DEFAULTS`, naming a renamed one's new place."""
    unknown = sorted(set(fields) - set(DEFAULTS))
    renamed = [f"{f} is now {RENAMED[f]}" for f in unknown if f in RENAMED]
    if renamed:
        raise ValueError(f"{prefix}(s) {unknown}: {'; '.join(renamed)}.")
    if unknown:
        raise ValueError(f"{prefix}(s) {unknown}; valid fields: {sorted(DEFAULTS)}.")


def method(**overrides) -> ml_collections.ConfigDict:
    """A method config: `DEFAULTS` with `overrides`; unknown fields are an error."""
    check_fields(overrides, "unknown method field")
    return ml_collections.ConfigDict({**DEFAULTS, **overrides})


# The papers' methods and their combinations (docs/method.md §3-9 and DeBKD's Table 3 ablation).
PRESETS: dict[str, dict] = {
    "CE": dict(loss="ce", transforms=()),
    "KD": dict(loss="kd", transforms=()),
    "KD+KI": dict(loss="kd", transforms=("knowledge_infusion",)),
    "FKD": dict(loss="kd", transforms=(), hint_weight=1.0),
    "FKD+KI": dict(loss="kd", transforms=("knowledge_infusion",), hint_weight=1.0),
    "DeBKD": dict(loss="debkd", transforms=("knowledge_infusion",)),
    "DeBKD-noKI": dict(loss="debkd", transforms=()),
    "BTKD-swap": dict(loss="btkd", transforms=("rectify",), rectify_mode="swap", weight_schedule="cos2"),
    "BTKD-released": dict(
        loss="btkd", transforms=("rectify",), rectify_mode="released", weight_schedule="cos2"
    ),
    "DeBKD+BTKD": dict(loss="debkd", transforms=("rectify",), rectify_mode="swap"),
    "DeBKD-cos2": dict(loss="debkd", transforms=("knowledge_infusion",), weight_schedule="cos2"),
    "DKD": dict(loss="dkd", transforms=(), alpha=1.0, beta=8.0, warmup_epochs=20),
}


def preset(name: str, **overrides) -> ml_collections.ConfigDict:
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; valid methods: {sorted(PRESETS)}.")
    return method(**{**PRESETS[name], **overrides})


def ordered(method_cfgs) -> list[tuple[str, Any]]:
    """(name, config) pairs in the order of `PRESETS` (ConfigDict sorts its keys), other names after."""
    rank = {name: i for i, name in enumerate(PRESETS)}
    return sorted(method_cfgs.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
