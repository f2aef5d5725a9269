"""Train state, optimizer and metric accumulators of one model."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
    batch_stats: Any


def learning_rate_schedule(cfg, steps_per_epoch: int) -> optax.Schedule:
    """`cfg.lr_schedule`: "cosine" (default: `warmup_epochs` of linear warm-up from 0, then cosine decay to 0
    at the last step) or "step" (the ImageNet recipe: `learning_rate` times `lr_decay_rate` at each epoch of
    `lr_decay_epochs`), over `cfg.num_epochs` epochs of `steps_per_epoch` steps."""
    total = max(cfg.num_epochs * steps_per_epoch, 1)
    if cfg.get("lr_schedule", "cosine") == "step":
        boundaries = {int(e * steps_per_epoch): cfg.get("lr_decay_rate", 0.1) for e in cfg.lr_decay_epochs}
        return optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, total, end_value=0.0)


def make_optimizer(cfg, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with (Nesterov, unless `cfg.nesterov` is False) momentum, weight decay on kernels, and the learning
    rate of `learning_rate_schedule`."""
    kernels = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key == "kernel", params)
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=kernels),
        optax.sgd(
            learning_rate_schedule(cfg, steps_per_epoch),
            momentum=cfg.momentum,
            nesterov=cfg.get("nesterov", True),
        ),
    )


@functools.lru_cache(maxsize=16)
def jitted_init(model: nn.Module) -> Callable:
    """One jitted `model.init` per distinct model (Linen modules compare by their fields), so that the teacher
    and students of one architecture, or repeated fits, compile it once."""
    return jax.jit(functools.partial(model.init, train=False))


def init_state(rng, model: nn.Module, tx, image_shape) -> TrainState:
    # Initialisation runs once: compiling it unoptimised takes ~1 s instead of ~6 s (XLA's CPU backend is slow
    # to optimise the random-number code); the run stays deterministic.
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        variables = jax.block_until_ready(jitted_init(model)(rng, jnp.zeros((1, *image_shape))))
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
    )


def zero_metrics() -> dict[str, jax.Array]:
    return {
        "loss_sum": jnp.zeros((), jnp.float32),
        "correct": jnp.zeros((), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
        "first_nonfinite_step": jnp.full((), np.iinfo(np.int32).max, jnp.int32),
    }


def variables_of(state) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def host_copy(tree):
    """A host copy: the step donates the state's buffers, so anything kept across steps must not alias
    them."""
    return jax.tree.map(lambda a: np.array(jax.device_get(a)), tree)
