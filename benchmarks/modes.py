"""The run sizes (smoke, quick, full, accelerator) and what every section receives."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

SECTIONS = ("train_step", "fresh_pairs", "data")


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    train_models: tuple[str, ...]
    all_variants: tuple[str, ...]  # models that also get the DeBKD + plain-XLA-conv row in train_step
    batch: int
    rounds: int
    steps: (
        dict  # model -> calls per sample in the train-step comparison at `batch` (scaled for other batches)
    )
    data_source: str
    data_model: str
    data_steps: int
    train_batches: tuple[int, ...] = ()  # train_step's batches; () is (batch,)
    train_dtypes: tuple[str, ...] = ("float32",)  # train_step's compute dtypes (config.dtype; peer: autocast)
    train_methods: tuple[str, ...] = ("CE", "DeBKD")  # train_step's JAX steps (the peer runs CE)
    pair_models: tuple[str, ...] = ()  # fresh_pairs: the models timed in fresh processes against the peer
    pair_rounds: int = 0  # fresh_pairs: rounds of (JAX 2 threads, JAX 1 thread, peer), rotating order
    pair_calls: dict = dataclasses.field(default_factory=dict)  # fresh_pairs: model -> samples per process
    peer_threads: int | None = None  # None: every CPU
    peer_timeout_s: float = 600.0  # any one request to the peer worker
    worker_timeout_s: float = 900.0  # any one subprocess: a fresh_pairs sample, a job of `benchmarks.scale`


_DOGS_VS_CATS = "folder:../shared/data/dogs_vs_cats_32"

MODES = {
    "smoke": Mode(
        name="smoke",
        train_models=("resnet_tiny",),
        all_variants=(),
        batch=16,
        rounds=2,
        steps={"resnet_tiny": 1},
        data_source="digits",
        data_model="resnet_tiny",
        data_steps=2,
        peer_threads=1,
        peer_timeout_s=600.0,
        worker_timeout_s=600.0,
    ),
    "quick": Mode(
        name="quick",
        train_models=("resnet8", "resnet18"),
        all_variants=("resnet8",),
        batch=128,
        rounds=3,
        steps={"resnet8": 4, "resnet18": 1},
        data_source=_DOGS_VS_CATS,
        data_model="resnet8",
        data_steps=10,
        pair_models=("resnet8", "resnet18"),
        pair_rounds=6,
        pair_calls={"resnet8": 5, "resnet18": 3},
    ),
    "full": Mode(
        name="full",
        train_models=("resnet8", "resnet18"),
        all_variants=("resnet8", "resnet18"),
        batch=128,
        rounds=7,
        steps={"resnet8": 10, "resnet18": 2},
        data_source=_DOGS_VS_CATS,
        data_model="resnet8",
        data_steps=20,
        pair_models=("resnet8", "resnet18"),
        pair_rounds=8,
        pair_calls={"resnet8": 8, "resnet18": 4},
        peer_timeout_s=1800.0,
        worker_timeout_s=1800.0,
    ),
}


# The train step at the batches and precisions a GPU/TPU user runs (`--accelerator --only=train_step`); the
# other sections keep the quick sizes.
MODES["accelerator"] = dataclasses.replace(
    MODES["quick"],
    name="accelerator",
    all_variants=(),
    batch=512,
    rounds=7,
    steps={"resnet8": 20, "resnet18": 8},
    train_batches=(512, 2048),
    train_dtypes=("float32", "bfloat16"),
    train_methods=("CE",),
)


@dataclasses.dataclass
class Context:
    """What a section's `measure` gets: the mode, the peer (None when skipped) and a logger."""

    mode: Mode
    peer: Any
    log: Callable[[str], None]
