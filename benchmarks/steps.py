"""This project's train step on a fixed synthetic batch, built by the same factory training uses."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.timing import block
from debkd_jax import config_lib, methods, training


def unoptimized_jit_call(fn, *args):
    """Runs a one-off jitted function compiled without XLA's optimizations (initialization: seconds saved)."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        return block(jax.jit(fn)(*args))
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


def init_variables(model, seed: int = 0, image_size: int = 32):
    return unoptimized_jit_call(
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
    """One `training.make_train_step` step of a student on one fixed synthetic batch; calling it runs a step.

    method: a preset whose targets are precomputed (CE, DeBKD, ...; no teacher online).
    conv_backward: as `config.conv_backward` ("auto" resolves as `training.resolve_conv_backward` does: on one
    CPU "onednn" where the native conv runs, else "materialized"; "xla" is the plain backward);
    `self.conv_backward` is the resolved value.
    """

    def __init__(
        self,
        model_name: str,
        method: str = "CE",
        *,
        batch: int,
        num_classes: int = 2,
        dtype: str = "float32",
        seed: int = 0,
        conv_backward: str = "auto",
        image_size: int = 32,
    ):
        mesh = training.create_mesh()
        self.conv_backward = training.resolve_conv_backward(conv_backward, mesh, dtype)
        method_cfg = methods.preset(method)
        cfg = config_lib.train_config(model_name, num_epochs=15, batch_size=batch)
        objective = methods.objective(method_cfg, cfg.num_epochs)
        labels, t_logits = synthetic_teacher_logits(batch, num_classes, seed)
        targets = methods.method_targets(method_cfg, t_logits, labels)
        self.spec = training.build_step_spec(
            cfg, num_classes, dtype, objective, 100, False, self.conv_backward, method_cfg=method_cfg
        )
        state = training.init_state(
            jax.random.key(seed),
            self.spec.model,
            training.make_optimizer(cfg, 100),
            (image_size, image_size, 3),
        )
        self.step = training.make_train_step(self.spec, mesh)
        # As `training.fit` places them: state replicated, the batch sharded on 'data'.
        replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        self.state = jax.device_put(state, replicated)
        self.acc = jax.device_put(training.zero_metrics(), replicated)
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
        rows = jax.tree.map(np.asarray, targets)
        self.batch = jax.device_put({"image": images, "label": labels, "rows": rows}, sharded)
        t0 = time.perf_counter()
        self()
        self.compile_s = time.perf_counter() - t0

    def __call__(self):
        self.state, self.acc = self.step(self.state, self.acc, self.batch, None, None)
        block(self.acc)

    def lowered(self):
        return self.step.lower(self.state, self.acc, self.batch, None, None)


_STEPS: dict = {}


def get_step(model_name: str, method: str = "CE", **kw) -> JaxStep:
    """A `JaxStep`, built once per run for each configuration and shared between sections."""
    key = (model_name, method, tuple(sorted(kw.items())))
    if key not in _STEPS:
        _STEPS[key] = JaxStep(model_name, method, **kw)
    return _STEPS[key]


def clear_steps() -> None:
    _STEPS.clear()
