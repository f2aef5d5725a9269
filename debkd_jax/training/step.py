"""The one train-step factory that training, benchmarks and tests use, and the eval-mode forward.

`make_train_step` returns `jax.jit(step)` over a `Mesh`: the batch sharded on 'data'
(`NamedSharding(mesh, P('data'))`), the state replicated and donated. BatchNorm statistics are those of the
global batch (XLA reduces across devices). Metrics accumulate on device and reach the host once per epoch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from debkd_jax import data as data_lib
from debkd_jax import losses, methods, models
from debkd_jax.data import views as views_lib
from debkd_jax.training.state import TrainState


class Student(nn.Module):
    """A backbone plus, for feature distillation, one `HintRegressor` per tapped block.

    Returns (logits (B, k), hints): hints[i] is block `taps[i]` mapped to `hint_shapes[i] = (h, w, c)`.
    The deployable model is the `backbone` subtree alone.
    """

    backbone: nn.Module
    taps: tuple[int, ...] = ()
    hint_shapes: tuple[tuple[int, int, int], ...] = ()

    @nn.compact
    def __call__(self, x, train: bool = True):
        logits, blocks = self.backbone(x, train=train)
        hints = tuple(
            models.HintRegressor(c, dtype=self.backbone.dtype, conv=self.backbone.conv, name=f"hint_{i}")(
                blocks[tap], (h, w), train
            )
            for i, (tap, (h, w, c)) in enumerate(zip(self.taps, self.hint_shapes, strict=True))
        )
        return logits, hints


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about one model's train step."""

    model: nn.Module
    objective: methods.Objective
    steps_per_epoch: int
    augment: bool
    dtype: Any
    teacher: nn.Module | None = None
    teacher_taps: tuple[int, ...] = ()
    method_cfg: Any = None
    online_targets: bool = False  # the targets from the teacher on this batch (config.targets = "online")


def build_step_spec(
    model_cfg, num_classes: int, dtype, objective, steps_per_epoch, augment, conv_backward="xla", **kw
) -> StepSpec:
    backbone = models.get_model(model_cfg.model, num_classes, dtype, conv_backward)
    return StepSpec(
        model=Student(backbone, **kw.pop("student_kw", {})),
        objective=objective,
        steps_per_epoch=steps_per_epoch,
        augment=augment,
        dtype=jnp.dtype(dtype),
        **kw,
    )


def make_train_step(spec: StepSpec, mesh: Mesh) -> Callable:
    """Returns the jitted `step(state, acc, batch, teacher_vars, infusion) -> (state, acc)`.

    batch: {'image': uint8 (B, H, W, 3), 'label': int32 (B,), and 'rows': Targets rows (B, ...), or
    'teacher_logits' (B, k) from which the step builds the method's targets, or neither for CE; with
    `spec.augment` also each view's crop (and mixup) parameters, `data.views.view_batch`}, sharded on 'data'.
    teacher_vars: replicated, used when the objective runs the teacher in the step (FKD's hints, or
    `spec.online_targets`: the targets from the teacher on this batch's views). infusion: knowledge infusion's
    table (k, k), replicated.
    """
    objective = spec.objective

    def step(state: TrainState, acc, batch, teacher_vars, infusion):
        images, labels = batch["image"], batch["label"]
        if "rows" in batch:
            rows = batch["rows"]
        elif "teacher_logits" in batch:  # streamed: the batch's rows of the logits store -> targets, here
            rows = methods.method_targets(spec.method_cfg, batch["teacher_logits"], labels, infusion=infusion)
        else:  # CE needs no targets
            rows = None
        if spec.augment:  # the memory kind's views: crops (and mixes) drawn per (image, view) on the host
            images = views_lib.apply_views(batch, data_lib.PAD)
        x = data_lib.normalize(images, spec.dtype)
        teacher_feats = ()
        if objective.needs_teacher_online:
            t_logits, t_blocks = spec.teacher.apply(teacher_vars, x, train=False)
            teacher_feats = tuple(jax.lax.stop_gradient(t_blocks[i]) for i in spec.teacher_taps)
            if spec.online_targets:
                # Every row, `correct` included, from the teacher on this (augmented) batch, so BTKD's
                # easy/hard
                # split matches the rows that were rectified or infused; KI's table is the precomputed one.
                rows = methods.method_targets(spec.method_cfg, t_logits, labels, infusion=infusion)
        epoch = state.step.astype(jnp.float32) / spec.steps_per_epoch

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            (logits, hints), updates = spec.model.apply(variables, x, train=True, mutable=["batch_stats"])
            hint = losses.hint_loss(hints, teacher_feats) if objective.uses_hints else 0.0
            loss = objective.loss_fn(logits, labels, rows, hint, epoch)
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        )
        acc = {
            "loss_sum": acc["loss_sum"] + jnp.where(finite, loss, 0.0) * labels.shape[0],
            "correct": acc["correct"] + jnp.sum(jnp.argmax(logits, -1) == labels),
            "count": acc["count"] + labels.shape[0],
            "first_nonfinite_step": jnp.where(
                finite, acc["first_nonfinite_step"], jnp.minimum(acc["first_nonfinite_step"], state.step - 1)
            ),
        }
        return state, acc

    replicated = NamedSharding(mesh, P())
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=(replicated, replicated))


def make_predict_fn(model: nn.Module, dtype) -> Callable:
    """Jitted eval-mode forward: (variables, uint8 images) -> (logits float32, block outputs)."""

    @jax.jit
    def predict(variables, images):
        return model.apply(variables, data_lib.normalize(images, dtype), train=False)

    return predict


def predict_logits(
    predict: Callable, variables, images: np.ndarray, batch_size: int, mesh: Mesh, progress: str | None = None
) -> np.ndarray:
    """Logits of every image of a uint8 array (N, S, S, 3), in order, on every process: the one evaluation
    pass (`evaluate.split_logits`) over the array as a memory-kind split. -> (N, k) float32.

    Batches are `batch_size` rows rounded down to a multiple of the mesh (fewer images than that: their count
    rounded up to one), padded with black images, so that `predict` compiles for one shape. Every process
    passes the same `images` (the whole split)."""
    from debkd_jax.data import source as source_lib
    from debkd_jax.training.evaluate import split_logits

    images = np.asarray(images)
    split = source_lib.Split(
        np.arange(len(images)).astype(str), np.zeros(len(images), np.int32), images=images
    )
    holder = source_lib.DataSource("memory", "array", ("",), {"eval": split}, int(images.shape[1]), "")
    logits, _ = split_logits(
        predict, variables, holder, split, eval_batch_size=batch_size, mesh=mesh, progress=progress
    )
    return logits
