"""The three run sizes (smoke, quick, full), the lever settings, and what every section receives."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

SECTIONS = ("train_step", "epoch", "overhead", "flops", "memory", "inference", "loss", "levers", "data")


@dataclasses.dataclass(frozen=True)
class Lever:
    """One XLA/thread setting, compared with the command-line default in alternating subprocess pairs."""

    name: str
    label: str
    add_flags: str = ""  # appended to the default XLA_FLAGS
    drop_flags: tuple[str, ...] = ()  # XLA flags (prefixes) removed from the default
    env: tuple[tuple[str, str], ...] = ()  # other environment variables


YNNPACK_ON = Lever(
    "ynnpack_on",
    "YNNPACK fusions on (XLA's own default; DEBKD_XLA_CPU_DEFAULTS=0)",
    drop_flags=("--xla_cpu_experimental_ynn_fusion_type",),
    env=(("DEBKD_XLA_CPU_DEFAULTS", "0"),),
)
LEVERS_FULL = (
    YNNPACK_ON,
    Lever("eigen_single", "--xla_cpu_multi_thread_eigen=false", "--xla_cpu_multi_thread_eigen=false"),
    Lever("xnnpack", "--xla_cpu_use_xnnpack=true", "--xla_cpu_use_xnnpack=true"),
    Lever(
        "onednn",
        "oneDNN custom calls",
        "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    ),
    Lever("fast_math", "--xla_cpu_enable_fast_math=true", "--xla_cpu_enable_fast_math=true"),
    Lever("two_devices", "2 CPU devices, batch split over them", "--xla_force_host_platform_device_count=2"),
    Lever("omp_1", "OMP_NUM_THREADS=1", env=(("OMP_NUM_THREADS", "1"),)),
)


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
    epoch_teacher: str
    epoch_student: str
    epoch_images: int  # training images of one epoch (Dogs vs Cats: 70% of 25,000)
    epoch_batch: int
    epoch_rounds: int
    epoch_steps: int  # calls per sample; the epoch time is extrapolated from them
    overhead_rounds: int
    overhead_steps: int
    gemm_n: int
    memory_config: str | None  # configs/debkd.py argument; None skips the subprocess
    sweep: tuple[int, ...]
    sweep_rounds: int
    inference_models: tuple[str, ...]
    inference_batch: int
    latency_calls: int
    loss_batch: int
    loss_ks: tuple[int, ...]
    loss_calls: int
    levers: tuple[Lever, ...]
    lever_workloads: tuple[tuple[str, str, int], ...]  # (kind, model, batch): kind train_step | teacher_pass
    lever_pairs: int
    lever_calls: int
    data_source: str
    data_model: str
    data_steps: int
    train_batches: tuple[int, ...] = ()  # train_step's batches; () is (batch,)
    train_dtypes: tuple[str, ...] = ("float32",)  # train_step's compute dtypes (config.dtype; peer: autocast)
    train_methods: tuple[str, ...] = ("CE", "DeBKD")  # train_step's JAX steps (the peer runs CE)
    peer_threads: int | None = None  # None: every CPU
    peer_timeout_s: float = 600.0  # any one request to the peer worker
    worker_timeout_s: float = 900.0  # any one lever or memory subprocess


_LEVER_WORKLOADS = (
    ("train_step", "resnet8", 128),
    ("train_step", "resnet18", 128),
    ("teacher_pass", "resnet8x4", 256),
)
_DOGS_VS_CATS = "folder:../shared/data/dogs_vs_cats_32"

MODES = {
    "smoke": Mode(
        name="smoke",
        train_models=("resnet_tiny",),
        all_variants=(),
        batch=16,
        rounds=2,
        steps={"resnet_tiny": 1},
        epoch_teacher="resnet_tiny",
        epoch_student="resnet_tiny",
        epoch_images=256,
        epoch_batch=16,
        epoch_rounds=1,
        epoch_steps=1,
        overhead_rounds=2,
        overhead_steps=1,
        gemm_n=128,
        memory_config=None,
        sweep=(16,),
        sweep_rounds=1,
        inference_models=("resnet_tiny",),
        inference_batch=8,
        latency_calls=2,
        loss_batch=64,
        loss_ks=(2, 10),
        loss_calls=3,
        levers=(),
        lever_workloads=(),
        lever_pairs=0,
        lever_calls=1,
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
        epoch_teacher="resnet50",
        epoch_student="resnet8",
        epoch_images=17_500,
        epoch_batch=64,
        epoch_rounds=2,
        epoch_steps=1,
        overhead_rounds=6,
        overhead_steps=4,
        gemm_n=2048,
        memory_config="smoke",
        sweep=(32, 64, 128, 256, 512),
        sweep_rounds=2,
        inference_models=("resnet8", "resnet50"),
        inference_batch=32,
        latency_calls=20,
        loss_batch=1024,
        loss_ks=(2, 100),
        loss_calls=50,
        levers=(YNNPACK_ON,),
        lever_workloads=_LEVER_WORKLOADS,
        lever_pairs=4,
        lever_calls=3,
        data_source=_DOGS_VS_CATS,
        data_model="resnet8",
        data_steps=10,
    ),
    "full": Mode(
        name="full",
        train_models=("resnet8", "resnet18"),
        all_variants=("resnet8", "resnet18"),
        batch=128,
        rounds=7,
        steps={"resnet8": 10, "resnet18": 2},
        epoch_teacher="resnet50",
        epoch_student="resnet8",
        epoch_images=17_500,
        epoch_batch=64,
        epoch_rounds=3,
        epoch_steps=3,
        overhead_rounds=15,
        overhead_steps=10,
        gemm_n=4096,
        memory_config="",
        sweep=(32, 64, 128, 256, 512),
        sweep_rounds=3,
        inference_models=("resnet8", "resnet18", "resnet8x4", "resnet50"),
        inference_batch=256,
        latency_calls=100,
        loss_batch=1024,
        loss_ks=(2, 100),
        loss_calls=200,
        levers=LEVERS_FULL,
        lever_workloads=_LEVER_WORKLOADS,
        lever_pairs=6,
        lever_calls=6,
        data_source=_DOGS_VS_CATS,
        data_model="resnet8",
        data_steps=20,
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
    """What a section's `measure` gets: the mode, the peer (None when skipped), a logger, earlier results."""

    mode: Mode
    peer: Any
    log: Callable[[str], None]
    results: dict
