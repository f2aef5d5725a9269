"""Speed benchmarks, side by side in one run on one machine: writes BENCHMARKS.md and benchmarks.json.

    python -m debkd_jax.bench --quick              # a few minutes; extrapolates epochs from a few steps
    python -m debkd_jax.bench --full --out=DIR     # the numbers to report (tens of minutes)
    python -m debkd_jax.bench --smoke              # seconds, tiny models: what the tests run
    python -m debkd_jax.bench --quick --only=train_step,loss

Sections (keys of benchmarks.json):
  train_step   student train step, images/s: this project's `train.make_train_step` (CE and DeBKD objectives,
               targets precomputed; its default conv backward and the plain XLA one) vs the PyTorch peer
               (third_party/torch_peer: SGD momentum, channels_last)
  epoch        one distillation epoch, ResNet-50 teacher -> ResNet-8 student: DeBKD with precomputed
               targets vs KD with the teacher run online every step, in JAX and in the peer
  overhead     DeBKD step vs cross-entropy step of the same student
  flops        FLOPs per image (closed form and XLA's cost analysis), achieved FLOP/s of the train step as a
               share of a large float32 GEMM measured in the same run
  memory       peak resident memory of the main job (a subprocess), step time vs batch size
  inference    exported (BatchNorm-folded) and in-process students and teachers: images/s, latency, size
  loss         `debkd_loss` with its gradient vs softmax cross entropy with its gradient, (1024, k)
  levers       what was tried to speed the step up: XLA flags and thread settings (subprocesses), bfloat16 and
               the conv backward (in process)

Timing: every comparison is interleaved (A, B, C, then B, C, A, ...) for several rounds in this one
process, each sample the mean of a few calls that wait for their result; the tables give the median over
rounds (and the best), and ratios are medians of per-round ratios, which stay meaningful on a busy machine.
The machine's load average is recorded before and after. PyTorch is optional (`pip install -e .[peer]`):
without it the peer rows are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from debkd_jax import xla_cpu

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("train_step", "epoch", "overhead", "flops", "memory", "inference", "loss", "levers")
NOISY_LOAD = 1.5


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    train_models: tuple[str, ...]
    all_variants: tuple[
        str, ...
    ]  # models that also get the DeBKD + plain-XLA-conv row in the train-step table
    batch: int
    rounds: int
    steps: dict  # model -> calls per round in the train-step comparison
    epoch_teacher: str
    epoch_student: str
    epoch_images: int  # training images of one epoch (Dogs vs Cats: 70% of 25,000)
    epoch_batch: int
    epoch_rounds: int
    epoch_steps: int  # calls per round; the epoch time is extrapolated from them
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
    lever_flags: tuple[tuple[str, dict], ...]  # (label, environment) for subprocess workers
    lever_steps: int


_FLAGS_QUICK = (
    ("default", {}),
    ("--xla_cpu_multi_thread_eigen=false", {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}),
    ("--xla_cpu_use_xnnpack=true", {"XLA_FLAGS": "--xla_cpu_use_xnnpack=true"}),
    (
        "XLA's own defaults, YNNPACK fusions on (DEBKD_XLA_CPU_DEFAULTS=0)",
        {xla_cpu.OPT_OUT: "0"},
    ),
)
_FLAGS_FULL = _FLAGS_QUICK + (
    (
        "oneDNN (--xla_cpu_use_onednn --xla_cpu_experimental_onednn_custom_call)",
        {"XLA_FLAGS": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true"},
    ),
    ("--xla_cpu_enable_fast_math=true", {"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}),
    ("JAX_DEFAULT_MATMUL_PRECISION=bfloat16", {"JAX_DEFAULT_MATMUL_PRECISION": "bfloat16"}),
    ("OMP_NUM_THREADS=1 (no effect expected: XLA does not use OpenMP)", {"OMP_NUM_THREADS": "1"}),
    (
        "2 CPU devices, batch split over them (--xla_force_host_platform_device_count=2)",
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    ),
    ("default (again, for drift)", {}),
)

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
        lever_flags=(),
        lever_steps=1,
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
        lever_flags=_FLAGS_QUICK,
        lever_steps=8,
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
        lever_flags=_FLAGS_FULL,
        lever_steps=20,
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Timing.


SETTLE_S = 0.2


def interleaved(
    fns: dict[str, Callable[[], Any]], *, rounds: int, calls, warmup: int = 1, settle: float | None = None
) -> dict[str, list]:
    """Per-call seconds of each function, one sample per round (the mean of `calls` calls), interleaved.

    The order rotates every round so that no function always runs right after the same other one. Each
    function must wait for its own result. `calls` is an int or {name: int}. Before each sample the process
    sleeps `settle` seconds: XLA's and PyTorch's worker threads spin for a while after their last task, and
    without the pause one runtime's spinning threads slowed the other's next calls by up to 10x on a 2-core
    machine.
    """
    settle = SETTLE_S if settle is None else settle
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples: dict[str, list] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            n = calls[name] if isinstance(calls, dict) else calls
            if settle:
                time.sleep(settle)
            t0 = time.perf_counter()
            for _ in range(n):
                fns[name]()
            samples[name].append((time.perf_counter() - t0) / n)
    return samples


def summary(seconds: Sequence[float], images: int | None = None) -> dict:
    """Median and best of per-call seconds (and images/s when `images` per call is given)."""
    s = np.asarray(seconds, np.float64)
    out = {"median_s": float(np.median(s)), "best_s": float(np.min(s)), "samples_s": [float(v) for v in s]}
    if images:
        out["images_per_s"] = images / out["median_s"]
        out["best_images_per_s"] = images / out["best_s"]
    return out


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a_r / b_r (e.g. time of b relative to a when a, b are times: speed-up of b)."""
    return float(np.median(np.asarray(a, np.float64) / np.asarray(b, np.float64)))


def _block(x):
    return jax.block_until_ready(x)


def _call(fn, *args):
    return jax.block_until_ready(fn(*args))


# ----------------------------------------------------------------------------------------------------------
# The PyTorch peer: optional, imported lazily from the repository's third_party folder.


def load_peer():
    """(torch, peer models, peer train) or (None, reason)."""
    if importlib.util.find_spec("torch") is None:
        return None, "PyTorch is not installed (pip install -e .[peer])"
    third_party = os.path.join(REPO_ROOT, "third_party")
    if not os.path.isdir(os.path.join(third_party, "torch_peer")):
        return (
            None,
            f"the peer's source {third_party}/torch_peer is not here "
            "(an installed, not a checked-out, package)",
        )
    if third_party not in sys.path:
        sys.path.insert(0, third_party)
    import torch
    from torch_peer import models as peer_models
    from torch_peer import train as peer_train

    return (torch, peer_models, peer_train), None


def _peer_batch(torch, batch: int, num_classes: int, image_size: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return images, labels


# ----------------------------------------------------------------------------------------------------------
# This project's steps on synthetic data.


def _unoptimized_jit_call(fn, *args):
    """Runs a one-off jitted function compiled without XLA's optimizations (initialization: seconds saved)."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        return _block(jax.jit(fn)(*args))
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


def init_variables(model, seed: int = 0, image_size: int = 32):
    return _unoptimized_jit_call(
        lambda key: model.init(key, jnp.zeros((1, image_size, image_size, 3)), train=False),
        jax.random.key(seed),
    )


def synthetic_teacher_logits(n: int, k: int, seed: int = 0, accuracy_margin: float = 2.5):
    """Labels (n,) and teacher-like logits (n, k): the true class raised by `accuracy_margin`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n).astype(np.int32)
    logits = rng.normal(size=(n, k)).astype(np.float32) * 2.0
    logits[np.arange(n), labels] += accuracy_margin
    return labels, logits


class JaxStep:
    """One `train.make_train_step` step of a student on one fixed synthetic batch; calling it runs a step."""

    def __init__(
        self,
        model_name: str,
        method: str = "CE",
        *,
        batch: int,
        num_classes: int = 2,
        dtype: str = "float32",
        teacher_name: str | None = None,
        seed: int = 0,
        conv_backward: str = "auto",
        **method_overrides,
    ):
        """conv_backward: as `config.conv_backward` ("auto": the project's default, "materialized" on CPU;
        "xla": the plain `lax.conv_general_dilated` backward); `self.conv_backward` is the resolved value."""
        from debkd_jax import methods, models, train

        mesh = train.create_mesh()
        self.conv_backward = train.resolve_conv_backward(conv_backward, mesh)
        method_cfg = methods.preset(method, **method_overrides)
        objective = methods.objective(method_cfg, 15)
        labels, t_logits = synthetic_teacher_logits(batch, num_classes, seed)
        targets = methods.method_targets(method_cfg, t_logits, labels)
        kw = {}
        self.teacher_vars = None
        if objective.needs_teacher_online:
            teacher = models.get_model(teacher_name, num_classes, dtype, self.conv_backward)
            kw["teacher"] = teacher
            self.teacher_vars = init_variables(teacher, seed + 1)
        backbone = models.get_model(model_name, num_classes, dtype, self.conv_backward)
        self.spec = train.StepSpec(
            model=train.Student(backbone),
            objective=objective,
            steps_per_epoch=100,
            augment=False,
            dtype=jnp.dtype(dtype),
            method_cfg=method_cfg,
            **kw,
        )
        cfg = ml_collections.ConfigDict(
            dict(num_epochs=15, warmup_epochs=1.0, learning_rate=0.05, weight_decay=5e-4, momentum=0.9)
        )
        self.state = train.init_state(
            jax.random.key(seed), self.spec.model, train.make_optimizer(cfg, 100), (32, 32, 3)
        )
        self.acc = train.zero_metrics()
        self.step = train.make_train_step(self.spec, mesh, seed)
        rng = np.random.default_rng(seed)
        # As `train.fit` places them: state (and teacher) replicated, the batch sharded over the 'data' axis.
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        self.state = jax.device_put(self.state, replicated)
        self.acc = jax.device_put(self.acc, replicated)
        if self.teacher_vars is not None:
            self.teacher_vars = jax.device_put(self.teacher_vars, replicated)
        self.batch = jax.device_put(
            {
                "image": rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8),
                "label": labels,
                "rows": jax.tree.map(np.asarray, targets),
            },
            sharded,
        )
        self.images = batch
        t0 = time.perf_counter()
        self()
        self.compile_s = time.perf_counter() - t0

    def __call__(self):
        self.state, self.acc = self.step(self.state, self.acc, self.batch, self.teacher_vars, None)
        _block(self.acc)

    def lowered(self):
        return self.step.lower(self.state, self.acc, self.batch, self.teacher_vars, None)


_STEPS: dict = {}


def get_step(model_name: str, method: str = "CE", **kw) -> JaxStep:
    """A `JaxStep`, built once per run for each configuration, shared between sections (compiles are slow)."""
    key = (model_name, method, tuple(sorted(kw.items())))
    if key not in _STEPS:
        _STEPS[key] = JaxStep(model_name, method, **kw)
    return _STEPS[key]


def peer_step(peer, model_name: str, batch: int, num_classes: int = 2, teacher_name: str | None = None):
    torch, peer_models, peer_train = peer
    torch.manual_seed(0)
    student = peer_models.get_model(model_name, num_classes)
    if teacher_name is None:
        step = peer_train.make_train_step(student)
    else:
        step = peer_train.make_kd_train_step(student, peer_models.get_model(teacher_name, num_classes))
    images, labels = _peer_batch(torch, batch, num_classes)
    return lambda: step(images, labels)


# ----------------------------------------------------------------------------------------------------------
# FLOPs.


def conv_dense_macs(model_name: str, num_classes: int = 2, image_size: int = 32) -> dict:
    """Multiply-accumulates per image of every Conv and Dense layer, found by tracing the forward pass.

    Returns {'forward': MACs, 'first_layer': MACs of the stem (no input gradient is needed there)}.
    """
    import flax.linen as nn

    from debkd_jax import models

    model = models.get_model(model_name, num_classes)
    found = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
            kernel = module.get_variable("params", "kernel")
            per_output = math.prod(kernel.shape[:-1])
            if isinstance(module, nn.Conv):
                per_output //= module.feature_group_count
            found.append(math.prod(out.shape[1:]) * per_output)
        return out

    def forward(x):
        variables = model.init(jax.random.key(0), x, train=False)
        found.clear()
        with nn.intercept_methods(record):
            return model.apply(variables, x, train=False)

    jax.eval_shape(forward, jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
    return {"forward": int(sum(found)), "first_layer": int(found[0]), "layers": len(found)}


def training_flops_per_image(macs: dict) -> int:
    """Closed form: 2 FLOPs per MAC; forward + weight gradient + input gradient (none for the first layer)."""
    return 2 * (3 * macs["forward"] - macs["first_layer"])


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def gemm_peak(n: int, rounds: int = 5) -> dict:
    """float32 (n, n) @ (n, n) with XLA: FLOP/s of the best and median call."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n), np.float32))
    b = jnp.asarray(rng.standard_normal((n, n), np.float32))
    matmul = jax.jit(lambda a, b: a @ b)
    _block(matmul(a, b))
    times = interleaved({"gemm": lambda: _block(matmul(a, b))}, rounds=rounds, calls=1, warmup=0)["gemm"]
    flops = 2.0 * n**3
    return {
        "n": n,
        "flops_per_s": flops / float(np.min(times)),
        "median_flops_per_s": flops / float(np.median(times)),
    }


# ----------------------------------------------------------------------------------------------------------
# Sections. Each returns a JSON-able dict; `render_*` turns it into Markdown.


def section_train_step(mode: Mode, peer, log) -> dict:
    out = {"batch": mode.batch, "image_size": 32, "models": {}}
    for name in mode.train_models:
        log(f"train_step: {name}, batch {mode.batch}")
        fns = {
            "jax_ce": get_step(name, "CE", batch=mode.batch),
            "jax_debkd": get_step(name, "DeBKD", batch=mode.batch),
            "jax_ce_xla_conv": get_step(name, "CE", batch=mode.batch, conv_backward="xla"),
        }
        if name in mode.all_variants:  # the DeBKD + plain XLA conv row; skipped for slow models in quick mode
            fns["jax_debkd_xla_conv"] = get_step(name, "DeBKD", batch=mode.batch, conv_backward="xla")
        compile_s = {k: f.compile_s for k, f in fns.items()}
        if peer[0] is not None:
            fns["torch_ce"] = peer_step(peer[0], name, mode.batch)
        calls = mode.steps.get(name, 1)
        samples = interleaved(fns, rounds=mode.rounds, calls=calls)
        row = {k: summary(v, mode.batch) for k, v in samples.items()}
        for k, s in compile_s.items():
            row[k]["compile_s"] = s
        if "torch_ce" in samples:
            row["speedup_vs_torch"] = {
                k: paired_ratio(samples["torch_ce"], samples[k]) for k in fns if k.startswith("jax_")
            }
        # The default step (config.conv_backward="auto", resolved here) over the plain XLA conv backward.
        row["conv_backward"] = fns["jax_ce"].conv_backward
        row["speedup_over_xla_conv"] = {"ce": paired_ratio(samples["jax_ce_xla_conv"], samples["jax_ce"])}
        if "jax_debkd_xla_conv" in samples:
            row["speedup_over_xla_conv"]["debkd"] = paired_ratio(
                samples["jax_debkd_xla_conv"], samples["jax_debkd"]
            )
        out["models"][name] = row
    return out


def section_epoch(mode: Mode, peer, log) -> dict:
    t, s, b = mode.epoch_teacher, mode.epoch_student, mode.epoch_batch
    steps_per_epoch = mode.epoch_images // b
    log(f"epoch: teacher {t} -> student {s}, batch {b}, {steps_per_epoch} steps per epoch")
    fns = {
        "jax_debkd_precomputed": get_step(s, "DeBKD", batch=b),
        "jax_kd_online": get_step(s, "KD", batch=b, teacher_name=t, online_targets=True),
    }
    if peer[0] is not None:
        fns["torch_kd_online"] = peer_step(peer[0], s, b, teacher_name=t)
    samples = interleaved(fns, rounds=mode.epoch_rounds, calls=mode.epoch_steps)
    rows = {k: summary(v, b) for k, v in samples.items()}
    for r in rows.values():
        r["epoch_s"] = r["median_s"] * steps_per_epoch

    # The one-off teacher pass DeBKD pays instead: eval-mode logits of all splits (train is 70% of them).
    from debkd_jax import models, train

    teacher = models.get_model(t, 2)
    variables = init_variables(teacher, 1)
    predict = train.make_predict_fn(teacher, jnp.float32)
    eval_batch = 256 if mode.name != "smoke" else 16
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (eval_batch, 32, 32, 3), dtype=np.uint8))
    _block(predict(variables, images))
    pass_s = interleaved(
        {"teacher": lambda: _block(predict(variables, images))}, rounds=2, calls=1, warmup=0
    )["teacher"]
    all_images = round(mode.epoch_images / 0.7)
    teacher_pass_s = float(np.median(pass_s)) * all_images / eval_batch
    out = {
        "teacher": t,
        "student": s,
        "batch": b,
        "train_images": mode.epoch_images,
        "steps_per_epoch": steps_per_epoch,
        "measured_steps": mode.epoch_rounds * mode.epoch_steps,
        "extrapolated": True,
        "rows": rows,
        "teacher_pass_s": teacher_pass_s,
        "teacher_pass_images": all_images,
        "speedup_precomputed_vs_jax_online": paired_ratio(
            samples["jax_kd_online"], samples["jax_debkd_precomputed"]
        ),
    }
    if "torch_kd_online" in samples:
        out["speedup_precomputed_vs_torch_online"] = paired_ratio(
            samples["torch_kd_online"], samples["jax_debkd_precomputed"]
        )
        out["speedup_jax_online_vs_torch_online"] = paired_ratio(
            samples["torch_kd_online"], samples["jax_kd_online"]
        )
    epochs = 15
    out["run_of_15_epochs"] = {
        "epochs": epochs,
        "debkd_precomputed_s": teacher_pass_s + epochs * rows["jax_debkd_precomputed"]["epoch_s"],
        "kd_online_s": epochs * rows["jax_kd_online"]["epoch_s"],
    }
    return out


def section_overhead(mode: Mode, peer, log) -> dict:
    name = mode.train_models[0]
    log(f"overhead: DeBKD vs CE step, {name}, batch {mode.batch}")
    fns = {"ce": get_step(name, "CE", batch=mode.batch), "debkd": get_step(name, "DeBKD", batch=mode.batch)}
    if mode.name != "smoke":
        fns["kd"] = get_step(name, "KD", batch=mode.batch)
    samples = interleaved(fns, rounds=mode.overhead_rounds, calls=mode.overhead_steps)
    out = {
        "model": name,
        "batch": mode.batch,
        "rows": {k: summary(v, mode.batch) for k, v in samples.items()},
    }
    for k in fns:
        if k != "ce":
            out[f"{k}_over_ce"] = paired_ratio(samples[k], samples["ce"]) - 1.0
    return out


def section_flops(mode: Mode, peer, log, results: dict) -> dict:
    log(f"flops: GEMM {mode.gemm_n}^2 and cost analyses")
    from debkd_jax import models, train

    peak = gemm_peak(mode.gemm_n)
    names = sorted(set(mode.train_models) | set(mode.inference_models) | {mode.epoch_teacher})
    per_model = {}
    for name in names:
        macs = conv_dense_macs(name)
        model = models.get_model(name, 2)
        variables = jax.eval_shape(functools.partial(init_variables_abstract, model))
        predict = train.make_predict_fn(model, jnp.float32)
        images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.uint8)
        xla_fwd = _xla_flops(predict.lower(variables, images).compile())
        per_model[name] = {
            "macs_per_image": macs["forward"],
            "forward_flops_per_image": 2 * macs["forward"],
            "training_flops_per_image": training_flops_per_image(macs),
            "xla_forward_flops_per_image": xla_fwd,
            "parameters": models.count_params(variables["params"]),
        }
    achieved = {}
    step_rows = results.get("train_step", {}).get("models", {})
    for name in mode.train_models:
        row = step_rows.get(name)
        if row is None:
            continue
        step = get_step(name, "CE", batch=mode.batch)
        xla_step = _xla_flops(step.lowered().compile())
        per_image = per_model[name]["training_flops_per_image"]
        ips = row["jax_ce"]["images_per_s"]
        achieved[name] = {
            "training_flops_per_step": per_image * mode.batch,
            "xla_flops_per_step": xla_step,
            "achieved_flops_per_s": per_image * ips,
            "share_of_gemm_peak": per_image * ips / peak["flops_per_s"],
        }
        if "torch_ce" in row:
            t_ips = row["torch_ce"]["images_per_s"]
            achieved[name]["torch_achieved_flops_per_s"] = per_image * t_ips
            achieved[name]["torch_share_of_gemm_peak"] = per_image * t_ips / peak["flops_per_s"]
    return {
        "gemm": peak,
        "models": per_model,
        "train_step": achieved,
        "convention": "FLOPs = 2 x multiply-accumulates of Conv and Dense layers (BatchNorm, ReLU, adds, "
        "pooling and the optimizer not counted); a training step = forward + weight gradient "
        "+ input gradient (none for the first layer) ~= 3 x forward. XLA's cost analysis "
        "counts every HLO op, elementwise ones included.",
    }


def init_variables_abstract(model):
    return model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


_LAUNCHER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}, f)
"""


def _memory_of_main(config_arg: str, log) -> dict:
    workdir = tempfile.mkdtemp(prefix="debkd-bench-main-")
    config = os.path.join(REPO_ROOT, "configs", "debkd.py") + (f":{config_arg}" if config_arg else "")
    cmd = [
        sys.executable,
        "-m",
        "debkd_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        "--config.progress=False",
        f"--config.data.cache_dir={os.path.join(workdir, 'cache')}",
    ]
    log("memory: " + " ".join(cmd[1:]))
    env = {**os.environ}
    env["XLA_FLAGS"] = " ".join(
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    )
    log_path = os.path.join(workdir, "main.log")
    usage_path = os.path.join(workdir, "usage.json")
    t0 = time.perf_counter()
    with open(log_path, "wb") as log_file:
        # A small launcher starts the job and reports its rusage from wait4 (ru_maxrss, KiB on Linux). Started
        # from this big process directly, the job's high-water mark would start at this process's size: a
        # forked child inherits it, and exec keeps it.
        done = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, usage_path, *cmd],
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    seconds = time.perf_counter() - t0
    with open(usage_path, encoding="utf-8") as f:
        usage = json.load(f)
    rss_kib = usage["maxrss_kib"]
    proc = argparse.Namespace(returncode=usage.get("returncode", done.returncode))
    with open(log_path, "rb") as f:
        output = f.read()
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "command": " ".join(["python", *cmd[1:3]]),
        "config": config_arg or "default",
        "returncode": proc.returncode,
        "seconds": seconds,
        "peak_rss_mib": rss_kib / 1024,
        "tail": output.decode(errors="replace")[-600:] if proc.returncode else "",
    }


def section_memory(mode: Mode, peer, log) -> dict:
    out: dict[str, Any] = {}
    if mode.memory_config is None:
        out["main_job"] = {"skipped": "smoke mode"}
    else:
        out["main_job"] = _memory_of_main(mode.memory_config, log)
    log(f"memory: step time vs batch size {mode.sweep}")
    name = "resnet8" if mode.name != "smoke" else "resnet_tiny"
    fns, calls = {}, {}
    for b in mode.sweep:
        fns[f"jax_{b}"] = get_step(name, "CE", batch=b)
        calls[f"jax_{b}"] = max(1, 512 // b // (4 if mode.name == "quick" else 1))
        if peer[0] is not None:
            fns[f"torch_{b}"] = peer_step(peer[0], name, b)
            calls[f"torch_{b}"] = calls[f"jax_{b}"]
    samples = interleaved(fns, rounds=mode.sweep_rounds, calls=calls)
    rows = {}
    for b in mode.sweep:
        rows[b] = {"jax": summary(samples[f"jax_{b}"], b)}
        if f"torch_{b}" in samples:
            rows[b]["torch"] = summary(samples[f"torch_{b}"], b)
            rows[b]["speedup_vs_torch"] = paired_ratio(samples[f"torch_{b}"], samples[f"jax_{b}"])
    out["batch_sweep"] = {"model": name, "rows": rows}
    return out


def _dir_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def section_inference(mode: Mode, peer, log) -> dict:
    from debkd_jax import export, models, train, workdir_lib

    out = {"batch": mode.inference_batch, "models": {}}
    tmp = tempfile.mkdtemp(prefix="debkd-bench-export-")
    try:
        for name in mode.inference_models:
            log(f"inference: {name}")
            model = models.get_model(name, 2)
            variables = init_variables(model)
            ckpt = os.path.join(tmp, name)
            workdir_lib.save_variables(ckpt, variables)
            exported = export.export_model(model, variables, 32)
            blob = exported.serialize()
            call = jax.jit(exported.call)
            predict = train.make_predict_fn(model, jnp.float32)
            rng = np.random.default_rng(0)
            big = jnp.asarray(rng.integers(0, 256, (mode.inference_batch, 32, 32, 3), dtype=np.uint8))
            one = big[:1]
            fns = {
                "exported": lambda big=big, call=call: _block(call(big)),
                "flax_eval": lambda big=big, predict=predict, v=variables: _block(predict(v, big)[0]),
            }
            lat = {"exported": lambda one=one, call=call: _block(call(one))}
            if peer[0] is not None:
                torch, peer_models, _ = peer[0]
                net = peer_models.get_model(name, 2).eval().to(memory_format=torch.channels_last)
                tb, _ = _peer_batch(torch, mode.inference_batch, 2)
                t1 = tb[:1].contiguous(memory_format=torch.channels_last)

                def torch_eval(x, net=net, torch=torch):
                    with torch.inference_mode():
                        return net(x)[0].sum().item()

                fns["torch_eval"] = functools.partial(torch_eval, tb)
                lat["torch_eval"] = functools.partial(torch_eval, t1)
            thr = interleaved(fns, rounds=max(2, mode.rounds - 1), calls=1)
            lat_s = interleaved(lat, rounds=max(2, mode.rounds - 1), calls=mode.latency_calls)
            row = {
                "parameters": models.count_params(variables["params"]),
                "checkpoint_bytes": _dir_size(ckpt),
                "exported_bytes": len(blob),
                "throughput": {k: summary(v, mode.inference_batch) for k, v in thr.items()},
                "latency_ms_batch1": {k: 1e3 * float(np.median(v)) for k, v in lat_s.items()},
            }
            if "torch_eval" in thr:
                row["exported_speedup_vs_torch"] = paired_ratio(thr["torch_eval"], thr["exported"])
                row["exported_latency_speedup_vs_torch"] = paired_ratio(
                    lat_s["torch_eval"], lat_s["exported"]
                )
            row["exported_speedup_vs_flax_eval"] = paired_ratio(thr["flax_eval"], thr["exported"])
            out["models"][name] = row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------------------
# The DeBKD loss (issue 2).


def loss_inputs(batch: int, k: int, case: str, seed: int = 0):
    """(student logits, labels, lo, hi) as during training ('realistic') or far from the regions ('worst').

    realistic: regions from teacher-like logits after knowledge infusion (n = 12, T = 4); the student's logits
    are the teacher's plus noise scaled so that most samples' probabilities sit just outside their region.
    worst: student logits of scale 10, unrelated to the teacher: p far from every region.
    """
    from debkd_jax import methods

    labels, t_logits = synthetic_teacher_logits(batch, k, seed)
    targets = methods.method_targets(methods.preset("DeBKD"), t_logits, labels)
    rng = np.random.default_rng(seed + 1)
    if case == "realistic":
        noise = 1.5 if k == 2 else 3.0
        student = np.asarray(targets.logits) + noise * rng.standard_normal((batch, k)).astype(np.float32)
    else:
        student = 10.0 * rng.standard_normal((batch, k)).astype(np.float32)
    return (
        jnp.asarray(student, jnp.float32),
        jnp.asarray(labels),
        jnp.asarray(targets.lo),
        jnp.asarray(targets.hi),
    )


def section_loss(mode: Mode, peer, log) -> dict:
    import optax

    from debkd_jax import losses

    out = {"batch": mode.loss_batch, "rows": []}
    ce = jax.jit(jax.value_and_grad(lambda s, y: jnp.mean(losses.cross_entropy(s, y))))
    optax_ce = jax.jit(
        jax.value_and_grad(lambda s, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(s, y)))
    )
    debkd = jax.jit(jax.value_and_grad(lambda s, y, lo, hi: losses.debkd_loss(s, y, lo, hi)))
    project = jax.jit(losses.box_projection)
    for k in mode.loss_ks:
        for case in ("realistic", "worst"):
            log(f"loss: k={k}, {case}")
            s, y, lo, hi = loss_inputs(mode.loss_batch, k, case)
            p = jax.nn.softmax(s / 4.0)
            fns = {
                "ce": functools.partial(_call, ce, s, y),
                "optax_ce": functools.partial(_call, optax_ce, s, y),
                "debkd": functools.partial(_call, debkd, s, y, lo, hi),
                "box_projection": functools.partial(_call, project, p, lo, hi),
            }
            samples = interleaved(fns, rounds=max(3, mode.rounds), calls=mode.loss_calls)
            inside = float(jnp.mean(jnp.all((p >= lo) & (p <= hi), axis=-1)))
            out["rows"].append(
                {
                    "k": k,
                    "case": case,
                    "share_inside_region": inside,
                    "newton_iterations": newton_iterations(p, lo, hi),
                    "us": {name: 1e6 * float(np.median(v)) for name, v in samples.items()},
                    "debkd_over_ce": paired_ratio(samples["debkd"], samples["ce"]),
                    "debkd_over_optax_ce": paired_ratio(samples["debkd"], samples["optax_ce"]),
                }
            )
    return out


def newton_iterations(p, lo, hi) -> int:
    """How many Newton/bisection steps `losses.box_projection` takes on these rows (0 for k = 2: a clip)."""
    from debkd_jax import losses

    if p.shape[-1] == 2:
        return 0
    return int(losses._projection_shift(*(jnp.asarray(a, jnp.float32) for a in (p, lo, hi)))[1])


# ----------------------------------------------------------------------------------------------------------
# Levers: XLA flags and thread settings in subprocess workers, bfloat16 in process.


def _worker_step(model: str, batch: int, steps: int, dtype: str) -> dict:
    step = get_step(model, "CE", batch=batch, dtype=dtype)
    samples = interleaved({"step": step}, rounds=3, calls=max(1, steps // 3))["step"]
    return {"compile_s": step.compile_s, **summary(samples, batch)}


def section_levers(mode: Mode, peer, log) -> dict:
    name = mode.train_models[0]
    out = {"model": name, "batch": mode.batch, "flags": [], "in_process": {}}
    for label, env in mode.lever_flags:
        log(f"levers: {label}")
        run_env = {**os.environ}
        # The workers start from the bench's own flags (the CLI defaults of xla_cpu.py included) without the
        # fake-device count; the opt-out row drops the CLI default too.
        dropped = ["--xla_force_host_platform_device_count"]
        if env.get(xla_cpu.OPT_OUT) == "0":
            dropped.append(xla_cpu.YNNPACK_OFF)
        base_flags = " ".join(
            f for f in run_env.get("XLA_FLAGS", "").split() if not any(f.startswith(d) for d in dropped)
        )
        for key, value in env.items():
            run_env[key] = f"{base_flags} {value}".strip() if key == "XLA_FLAGS" else value
        if "XLA_FLAGS" not in env:
            run_env["XLA_FLAGS"] = base_flags
        cmd = [
            sys.executable,
            "-m",
            "debkd_jax.bench",
            "--worker",
            json.dumps({"model": name, "batch": mode.batch, "steps": mode.lever_steps, "dtype": "float32"}),
        ]
        done = subprocess.run(cmd, env=run_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
        row = {"label": label, "env": env}
        if done.returncode == 0:
            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            row["error"] = (done.stderr or done.stdout)[-400:]
        out["flags"].append(row)
    base = [r for r in out["flags"] if not r["env"] and "images_per_s" in r]
    if base:
        ref = float(np.mean([r["images_per_s"] for r in base]))
        for r in out["flags"]:
            if "images_per_s" in r:
                r["relative_to_default"] = r["images_per_s"] / ref
    if mode.name == "smoke":
        out["in_process"]["bfloat16"] = {"skipped": "smoke mode"}
        return out
    log("levers: bfloat16 compute dtype and the plain XLA conv backward (in process, interleaved)")
    fns = {
        "float32": get_step(name, "CE", batch=mode.batch),
        "bfloat16": get_step(name, "CE", batch=mode.batch, dtype="bfloat16"),
        "float32, plain XLA conv": get_step(name, "CE", batch=mode.batch, conv_backward="xla"),
        "bfloat16, plain XLA conv": get_step(
            name, "CE", batch=mode.batch, dtype="bfloat16", conv_backward="xla"
        ),
    }
    samples = interleaved(fns, rounds=mode.rounds, calls=mode.steps.get(name, 1))
    out["in_process"] = {
        "conv_backward": fns["float32"].conv_backward,
        "rows": {k: summary(v, mode.batch) for k, v in samples.items()},
        "speedup": {k: paired_ratio(samples["float32"], v) for k, v in samples.items()},
    }
    out["in_process"]["bfloat16"] = {"speedup": out["in_process"]["speedup"]["bfloat16"]}
    return out


# ----------------------------------------------------------------------------------------------------------
# What was tried while making the step fast: measured during development (see docs/performance.md), rendered
# into every BENCHMARKS.md beside the numbers of the run itself.

FINDINGS = """\
Where the time of the ResNet-8 train step goes (CE, batch 128, float32; `jax.profiler` trace of 6 steps on a
quiet machine, load 0.4; XLA thunk time summed over both threads, ops classified from the compiled HLO):

| part | ms/step | share |
|---|---|---|
| convolutions (YNNPACK fusions: forward, input and weight gradients) | 114 | 41% |
| transposes feeding the weight-gradient convolutions | 106 | 39% |
| elementwise (BatchNorm, ReLU, residual adds, optimizer) | 34 | 12% |
| reductions (BatchNorm statistics and their gradients) | 15 | 6% |
| wall time of the step | 274 | |

The summed thread time equals the wall time: on average only one of the two cores is busy.

XLA computes a convolution's weight gradient as another convolution with the batch as the contracted feature
dimension, so it transposes the layer input `(B, H, W, C) -> (C, H, W, B)` and the output gradient
`-> (H, W, B, C)`. It also fuses the input's producers (BatchNorm, ReLU, the residual add: up to 10 operands)
into that transpose and recomputes them at a strided access pattern; those transposes were 39% of the step.

What helped:

- **A convolution VJP that reads its saved input through a fusion barrier**
  (`models.conv_general_dilated_materialized`, an identity `lax.cond`): transposes 106 -> 22 ms, elementwise
  34 -> 46 ms (the materializing copies), wall 274 -> 227 ms per step. Paired, interleaved runs: **1.15x** on
  the quiet machine (8 rounds x 4 steps), 1.19-1.41x wall and 1.25-1.36x CPU time under load. Same values and
  gradients (a `custom_vjp` around the same `lax.conv_general_dilated`). In the quick benchmark on a quiet
  machine (2026-11-22): 1.22x ResNet-8 CE, 1.09x ResNet-8 DeBKD, 1.24x ResNet-18 CE, 1.11x in the levers
  table; 0.9-1.1x in runs under heavy load. Applied by default on CPU: `config.conv_backward="auto"` gives
  every conv of the trained models `conv_backward="materialized"` when the devices are CPUs, and the plain
  XLA conv (`"xla"`) on GPU/TPU, where the `lax.cond`'s predicate would cost a device-to-host sync.
- **bfloat16 compute** (`config.dtype="bfloat16"`; YNNPACK uses the CPU's AVX512-BF16): 1.08-1.23x, on top of
  the conv VJP too; changes the numerics, so it stays a config choice.

What did not help (measured, then dropped):

- `lax.optimization_barrier` as the fusion barrier: XLA's CPU pipeline expands barriers before fusion; the
  compiled HLO was unchanged.
- Weight gradients as GEMMs (C=16, 32x32, batch 128, vs XLA's 24 ms): im2col + one GEMM 109 ms, nine shifted
  GEMMs 104 ms, one einsum 136 ms, three row-shift GEMMs 83 ms (as the earlier notes found).
- Doing the whole weight-gradient convolution inside the `lax.cond` branch: 40x slower (no YNNPACK in branch
  computations). Transposing inside the branch and convolving outside: no better than the plain barrier.
- Explicit transposes without a barrier: XLA fuses them back (0.93-1.05x).
- XLA flags (one subprocess each; see the table above): `--xla_cpu_multi_thread_eigen=false`,
  `--xla_cpu_use_xnnpack=true`, YNNPACK off, oneDNN custom calls, fast math, tiling propagation
  (`--xla_cpu_experimental_enable_tiling_propagation`: transposes 3-4x slower), two CPU devices with the batch
  split over them (509 vs 517 img/s): within noise or slower, except `--xla_cpu_multi_thread_eigen=false`
  (1.01-1.12x in two runs, not adopted) and YNNPACK off: 1.2x on the ResNet-8 step and 1.8x on ResNet-18 in
  alternating subprocess pairs, now the command-line tools' default (`debkd_jax/xla_cpu.py`).
  `JAX_DEFAULT_MATMUL_PRECISION` and
  `OMP_NUM_THREADS` do not change float32 convolutions on CPU.
- Larger batches: images/s fall from batch 32 to 512 (the table above): the step is memory-bound.
- For the loss: an exact sort-based projection (sort the 2k breakpoints, evaluate f at all of them by
  cumulative
  sums): XLA:CPU's sort of a (1024, 200) array alone takes 36 ms, 50x the whole current projection.

Measurement: interleaving JAX and PyTorch calls in one process without a pause slowed whichever ran second
by up
to 10x on this 2-core machine (the other runtime's worker threads keep spinning after their last task); every
timed sample now starts after a 0.2 s pause.
"""


# ----------------------------------------------------------------------------------------------------------
# Report.


def _fmt(x, digits=0) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.{digits}f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `python -m debkd_jax.bench --{meta['mode']}` on {meta['date']}. Machine: {meta['cpu']}, "
        f"{meta['cpus']} CPU(s); jax {meta['versions']['jax']}, flax {meta['versions']['flax']}, "
        f"torch {meta['versions'].get('torch') or 'not installed'}. Load average before/after: "
        f"{meta['load_before']:.2f} / {meta['load_after']:.2f}"
        + (
            " -- **a busy machine: absolute numbers are low and noisy; the ratios, measured side by side "
            "(interleaved rounds, medians of per-round ratios), are the numbers to read.**"
            if meta["noisy"]
            else "."
        ),
        "",
        f"XLA_FLAGS: `{meta['env']['XLA_FLAGS'] or '(none)'}` (the command-line tools' default, "
        "`debkd_jax/xla_cpu.py`, unless set otherwise).",
        "",
        "Every comparison below ran side by side in this one run. Images/s are medians over rounds "
        "(best round in brackets); `x` columns are speed-ups (> 1: the first is faster).",
        "",
    ]
    if meta.get("peer_skipped"):
        lines += [f"PyTorch peer rows skipped: {meta['peer_skipped']}.", ""]
    r = results.get("train_step")
    if r:
        lines += [f"## a. Student train step (batch {r['batch']}, 32x32, float32)", ""]
        labels = {
            "jax_ce": "JAX CE (`train.make_train_step`)",
            "jax_debkd": "JAX DeBKD, targets precomputed",
            "jax_ce_xla_conv": "JAX CE, plain XLA conv backward",
            "jax_debkd_xla_conv": "JAX DeBKD, plain XLA conv backward",
            "torch_ce": "PyTorch peer CE",
        }
        rows = []
        for name, row in r["models"].items():
            sp = row.get("speedup_vs_torch", {})
            for key, label in labels.items():
                if key not in row:
                    continue
                rows.append(
                    [
                        name,
                        label,
                        f"{_fmt(row[key]['images_per_s'])} ({_fmt(row[key]['best_images_per_s'])})",
                        "1.00x"
                        if key == "torch_ce"
                        else (f"**{sp[key]:.2f}x**" if key in sp else "n/a (no peer)"),
                    ]
                )
        lines += _table(["model", "step", "img/s (best)", "vs PyTorch"], rows)
        lines += [""]
        for name, row in r["models"].items():
            m = row["speedup_over_xla_conv"]
            debkd = f" and {m['debkd']:.2f}x (DeBKD)" if "debkd" in m else ""
            lines += [
                f"- {name}: the project's default conv backward (`config.conv_backward='auto'`, here "
                f"`{row['conv_backward']}`) vs the plain XLA conv backward (`'xla'`): **{m['ce']:.2f}x** "
                f"(CE){debkd}, same values and gradients."
            ]
        lines += [
            "",
            "JAX rows without a conv note use the default: on CPU the conv VJP through a fusion barrier "
            "(`models.conv_general_dilated_materialized`), the plain XLA conv on GPU/TPU.",
        ]
        lines += [
            "",
            "PyTorch: `third_party/torch_peer` eager, SGD momentum, channels_last. Target: >= 1.0x the "
            "peer, aim 1.5x.",
            "",
        ]
    r = results.get("epoch")
    if r:
        rows = r["rows"]
        lines += [
            f"## b. One distillation epoch: {r['teacher']} teacher -> {r['student']} student",
            "",
            f"{r['train_images']:,} training images, batch {r['batch']}, {r['steps_per_epoch']} steps; "
            f"extrapolated from {r['measured_steps']} measured steps per variant.",
            "",
        ]
        names = {
            "jax_debkd_precomputed": "DeBKD, targets precomputed (JAX)",
            "jax_kd_online": "KD, teacher online every step (JAX)",
            "torch_kd_online": "KD, teacher online every step (PyTorch peer)",
        }
        lines += _table(
            ["variant", "img/s", "epoch (s)"],
            [[names[k], _fmt(v["images_per_s"], 1), _fmt(v["epoch_s"], 1)] for k, v in rows.items()],
        )
        lines += [
            "",
            f"- precomputed vs JAX online: **{r['speedup_precomputed_vs_jax_online']:.1f}x** faster per "
            "epoch (target >= 5x)",
        ]
        if "speedup_precomputed_vs_torch_online" in r:
            lines += [
                f"- precomputed vs PyTorch online: **{r['speedup_precomputed_vs_torch_online']:.1f}x**; "
                f"JAX online vs PyTorch online: {r['speedup_jax_online_vs_torch_online']:.2f}x"
            ]
        run = r["run_of_15_epochs"]
        lines += [
            f"- the precomputed targets cost one teacher pass over all {r['teacher_pass_images']:,} "
            f"images first: {r['teacher_pass_s']:.1f} s (eval mode, batch 256). A 15-epoch run: "
            f"{run['debkd_precomputed_s']:.0f} s with it vs {run['kd_online_s']:.0f} s online "
            f"({run['kd_online_s'] / run['debkd_precomputed_s']:.1f}x).",
            "",
        ]
    r = results.get("overhead")
    if r:
        lines += [f"## c. DeBKD vs cross-entropy step ({r['model']}, batch {r['batch']})", ""]
        lines += _table(
            ["objective", "img/s", "vs CE"],
            [
                [k, _fmt(v["images_per_s"]), "" if k == "ce" else f"{100 * r[k + '_over_ce']:+.1f}%"]
                for k, v in r["rows"].items()
            ],
        )
        lines += [
            "",
            f"DeBKD's overhead over CE: **{100 * r['debkd_over_ce']:+.1f}%** (target <= 3%; median of "
            "per-round ratios, so round-to-round noise of a few % shows here too).",
            "",
        ]
    r = results.get("flops")
    if r:
        g = r["gemm"]
        lines += [
            "## d. FLOPs and achieved FLOP/s",
            "",
            f"float32 GEMM {g['n']}x{g['n']} (XLA, this run): **{g['flops_per_s'] / 1e9:.1f} GFLOP/s** "
            f"best, {g['median_flops_per_s'] / 1e9:.1f} median — the peak used below.",
            "",
        ]
        lines += _table(
            ["model", "params", "fwd GFLOP/img (closed form)", "fwd GFLOP/img (XLA)", "train GFLOP/img"],
            [
                [
                    k,
                    _fmt(v["parameters"]),
                    f"{v['forward_flops_per_image'] / 1e9:.4f}",
                    f"{v['xla_forward_flops_per_image'] / 1e9:.4f}"
                    if v["xla_forward_flops_per_image"]
                    else "n/a",
                    f"{v['training_flops_per_image'] / 1e9:.4f}",
                ]
                for k, v in r["models"].items()
            ],
        )
        lines += [""]
        if r["train_step"]:
            lines += _table(
                [
                    "model",
                    "train GFLOP/step",
                    "XLA GFLOP/step",
                    "JAX GFLOP/s",
                    "share of peak",
                    "PyTorch GFLOP/s",
                    "share of peak",
                ],
                [
                    [
                        k,
                        f"{v['training_flops_per_step'] / 1e9:.2f}",
                        f"{v['xla_flops_per_step'] / 1e9:.2f}" if v["xla_flops_per_step"] else "n/a",
                        f"{v['achieved_flops_per_s'] / 1e9:.1f}",
                        f"{100 * v['share_of_gemm_peak']:.1f}%",
                        f"{v['torch_achieved_flops_per_s'] / 1e9:.1f}"
                        if "torch_achieved_flops_per_s" in v
                        else "n/a",
                        f"{100 * v['torch_share_of_gemm_peak']:.1f}%"
                        if "torch_share_of_gemm_peak" in v
                        else "n/a",
                    ]
                    for k, v in r["train_step"].items()
                ],
            )
        lines += ["", f"Convention: {r['convention']}", ""]
    r = results.get("memory")
    if r:
        lines += ["## e. Memory and batch size", ""]
        m = r["main_job"]
        if "skipped" in m:
            lines += [f"Main job: skipped ({m['skipped']}).", ""]
        else:
            lines += [
                f"Peak resident memory of `{m['command']}` ({m['config']} config"
                + (", the smoke config in quick mode" if m["config"] == "smoke" else "")
                + f"): **{m['peak_rss_mib']:.0f} MiB** (ru_maxrss of the child; it ran "
                f"{m['seconds']:.0f} s, exit status {m['returncode']}).",
                "",
            ]
        sw = r["batch_sweep"]
        lines += _table(
            ["batch", "JAX ms/step", "JAX img/s", "PyTorch img/s", "JAX vs PyTorch"],
            [
                [
                    b,
                    _fmt(1e3 * v["jax"]["median_s"], 1),
                    _fmt(v["jax"]["images_per_s"]),
                    _fmt(v["torch"]["images_per_s"]) if "torch" in v else "skipped",
                    f"{v['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in v else "n/a",
                ]
                for b, v in sw["rows"].items()
            ],
        )
        lines += ["", f"Train step ({sw['model']}, CE) at each batch size, interleaved.", ""]
    r = results.get("inference")
    if r:
        lines += [f"## f. Inference (eval mode, throughput at batch {r['batch']}, latency at batch 1)", ""]
        rows = []
        for name, v in r["models"].items():
            t = v["throughput"]
            rows.append(
                [
                    name,
                    _fmt(v["parameters"]),
                    f"{v['checkpoint_bytes'] / 1e6:.2f}",
                    f"{v['exported_bytes'] / 1e6:.2f}",
                    _fmt(t["exported"]["images_per_s"]),
                    _fmt(t["flax_eval"]["images_per_s"]),
                    _fmt(t["torch_eval"]["images_per_s"]) if "torch_eval" in t else "skipped",
                    f"{v['latency_ms_batch1']['exported']:.2f}",
                    f"{v['latency_ms_batch1']['torch_eval']:.2f}" if "torch_eval" in t else "skipped",
                ]
            )
        lines += _table(
            [
                "model",
                "params",
                "checkpoint MB",
                "exported MB",
                "exported img/s",
                "Flax eval img/s",
                "PyTorch img/s",
                "exported ms/img (b=1)",
                "PyTorch ms/img (b=1)",
            ],
            rows,
        )
        lines += [
            "",
            "Exported: `debkd_jax.export` (StableHLO via jax.export, BatchNorm folded, uint8 in, "
            "normalization inside), called through `jax.export`. Flax eval: `train.make_predict_fn`.",
            "",
        ]
    r = results.get("loss")
    if r:
        lines += [f"## g. DeBKD loss with its gradient vs softmax cross entropy (batch {r['batch']})", ""]
        lines += _table(
            [
                "k",
                "case",
                "inside region",
                "Newton steps",
                "CE us",
                "optax CE us",
                "DeBKD us",
                "DeBKD / CE",
                "DeBKD / optax CE",
                "projection us",
            ],
            [
                [
                    v["k"],
                    v["case"],
                    f"{100 * v['share_inside_region']:.0f}%",
                    v["newton_iterations"],
                    _fmt(v["us"]["ce"]),
                    _fmt(v["us"]["optax_ce"]),
                    _fmt(v["us"]["debkd"]),
                    f"**{v['debkd_over_ce']:.2f}x**",
                    f"{v['debkd_over_optax_ce']:.2f}x",
                    _fmt(v["us"]["box_projection"]),
                ]
                for v in r["rows"]
            ],
        )
        lines += [
            "",
            "Target: DeBKD / CE <= 2x, CE being `losses.cross_entropy` (optax's formulation: logsumexp "
            "minus the gathered label logit; optax's own function is the next column). realistic: regions "
            "of teacher-like logits after knowledge infusion (n=12, T=4), student = teacher logits + noise "
            "(most samples inside, the rest just outside their region); worst: student logits of scale 10 "
            "unrelated to the regions. Newton steps: those `losses.box_projection` ran on the batch.",
            "",
        ]
    r = results.get("levers")
    if r:
        lines += [f"## Levers tried on the train step ({r['model']}, batch {r['batch']}, CE)", ""]
        if r["flags"]:
            lines += _table(
                ["setting (subprocess, run one after another)", "img/s", "vs default"],
                [
                    [
                        f["label"],
                        _fmt(f.get("images_per_s")),
                        f"{f['relative_to_default']:.2f}x"
                        if "relative_to_default" in f
                        else f"failed: {f.get('error', '')[:80]}",
                    ]
                    for f in r["flags"]
                ],
            )
            lines += [""]
        ip = r["in_process"]
        if "rows" in ip:
            lines += _table(
                ["in process, interleaved", "img/s (best)", "vs float32"],
                [
                    [
                        k,
                        f"{_fmt(v['images_per_s'])} ({_fmt(v['best_images_per_s'])})",
                        f"{ip['speedup'][k]:.2f}x",
                    ]
                    for k, v in ip["rows"].items()
                ],
            )
            lines += [
                "",
                "bfloat16: `config.dtype='bfloat16'` (compute in bfloat16, parameters float32); it "
                "changes the numerics, so it stays a choice, not a default on CPU. float32 and bfloat16 rows "
                f"use the default conv backward (here `{ip.get('conv_backward', 'n/a')}`); 'plain XLA conv': "
                "`config.conv_backward='xla'`.",
                "",
            ]
    if results["meta"]["mode"] != "smoke":
        lines += ["## What was tried to make the step fast", "", FINDINGS]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions(peer) -> dict:
    import flax
    import jaxlib

    v = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
    }
    if peer[0] is not None:
        v["torch"] = peer[0][0].__version__
        v["torch_threads"] = peer[0][0].get_num_threads()
    return v


def _run_sections(mode: Mode, only, peer, log, results: dict) -> None:
    for name in SECTIONS:
        if name in only:
            fn = globals()[f"section_{name}"]
            results[name] = fn(mode, peer, log, results) if name == "flops" else fn(mode, peer, log)


def run(mode: Mode, out_dir: str, only: Sequence[str] = SECTIONS, log=print) -> dict:
    peer = load_peer()
    load_before = os.getloadavg()[0]
    results: dict[str, Any] = {
        "meta": {
            "mode": mode.name,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpu": _cpu_name(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "jax_backend": jax.default_backend(),
            "jax_devices": jax.device_count(),
            "versions": _versions(peer),
            "peer_skipped": peer[1],
            "env": {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "JAX_PLATFORMS")},
            "load_before": load_before,
            "sections": list(only),
        },
        "notes": [],
    }
    t0 = time.perf_counter()
    _STEPS.clear()
    previous_opt = jax.config.values["jax_disable_most_optimizations"]
    global SETTLE_S
    previous_settle = SETTLE_S
    if mode.name == "smoke":  # seconds, not minutes: the smoke run checks the plumbing, not the speed
        jax.config.update("jax_disable_most_optimizations", True)
        SETTLE_S = 0.0
    try:
        _run_sections(mode, only, peer, log, results)
    finally:
        _STEPS.clear()
        jax.config.update("jax_disable_most_optimizations", previous_opt)
        SETTLE_S = previous_settle
    meta = results["meta"]
    meta["load_after"] = os.getloadavg()[0]
    meta["noisy"] = max(meta["load_before"], meta["load_after"]) > NOISY_LOAD
    meta["seconds"] = time.perf_counter() - t0
    if mode.name == "quick":
        results["notes"].append(
            "Quick mode: epochs are extrapolated from a few steps, the main job's memory is "
            "that of the smoke config (`configs/debkd.py:smoke`), few rounds."
        )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "benchmarks.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    with open(os.path.join(out_dir, "BENCHMARKS.md"), "w", encoding="utf-8") as f:
        f.write(render(results) + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m debkd_jax.bench", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    for name in MODES:
        group.add_argument(f"--{name}", dest="mode", action="store_const", const=name)
    parser.add_argument("--out", default=".", help="folder for BENCHMARKS.md and benchmarks.json")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker_step(**json.loads(args.worker))))
        return 0
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    mode = MODES[args.mode or "quick"]
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)
    results = run(mode, args.out, only, log)
    print(render(results))
    print(
        f"\nwrote {os.path.join(args.out, 'BENCHMARKS.md')} and benchmarks.json "
        f"({results['meta']['seconds']:.0f} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    xla_cpu.apply_defaults()
    sys.exit(main())
