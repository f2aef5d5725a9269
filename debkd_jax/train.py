"""The training loop: teacher, teacher targets, students, evaluation. `train_and_evaluate` is the main job.

One generic `fit` trains any model (the teacher with plain CE, each student with its method's objective) with a
jitted, data-parallel step: `jax.jit` over a `Mesh` of all devices, the batch sharded on the 'data' axis
(`NamedSharding(mesh, P('data'))`), the state replicated and donated. BatchNorm statistics are those of the global
batch (XLA reduces across devices). Metrics accumulate on device and reach the host once per epoch.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import functools
import hashlib
import io
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from debkd_jax import data as data_lib
from debkd_jax import losses, methods, metrics, models, report, workdir_lib
from debkd_jax import targets as targets_lib
from debkd_jax.errors import UserError

log = logging.getLogger("debkd_jax")


class TrainState(train_state.TrainState):
    batch_stats: Any


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
            models.HintRegressor(
                c, dtype=self.backbone.dtype, conv=self.backbone.conv, name=f"hint_{i}"
            )(blocks[tap], (h, w), train)
            for i, (tap, (h, w, c)) in enumerate(zip(self.taps, self.hint_shapes, strict=True))
        )
        return logits, hints


def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh ('data',) over all (global) devices."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), ("data",))


CONV_BACKWARD_SETTINGS = ("auto", *models.CONV_BACKWARDS)
"""Values of `config.conv_backward`: "auto" or a `models.ResNet.conv_backward`."""


def resolve_conv_backward(setting: str, mesh: Mesh) -> str:
    """`config.conv_backward` for the models trained on `mesh`: "auto" is "materialized" when every device is
    a CPU (the conv VJP through a fusion barrier, 1.15-1.24x faster there) and "xla" otherwise (on GPU/TPU the
    barrier's `lax.cond` would cost a device-to-host sync). Gradients are the same either way."""
    if setting not in CONV_BACKWARD_SETTINGS:
        raise UserError(f"conv_backward={setting!r} is not one of {CONV_BACKWARD_SETTINGS}.")
    if setting != "auto":
        return setting
    on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    return "materialized" if on_cpu else "xla"


def make_optimizer(cfg, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with Nesterov momentum, decoupled-from-BN weight decay on kernels, linear warm-up then cosine decay."""
    total = max(cfg.num_epochs * steps_per_epoch, 1)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, total, end_value=0.0)
    kernels = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key == "kernel", params)
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=kernels),
        optax.sgd(schedule, momentum=cfg.momentum, nesterov=True),
    )


@functools.lru_cache(maxsize=16)
def _jitted_init(model: nn.Module) -> Callable:
    """One jitted `model.init` per distinct model (Linen modules compare by their fields), so that the teacher
    and students of one architecture, or repeated fits, compile it once."""
    return jax.jit(functools.partial(model.init, train=False))


def init_state(rng, model: nn.Module, tx, image_shape) -> TrainState:
    # Initialisation runs once: compiling it unoptimised takes ~1 s instead of ~6 s (XLA's CPU backend is slow
    # to optimise the random-number code); the run stays deterministic.
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        variables = jax.block_until_ready(_jitted_init(model)(rng, jnp.zeros((1, *image_shape))))
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


def make_train_step(spec: StepSpec, mesh: Mesh, seed: int) -> Callable:
    """Returns the jitted `step(state, acc, batch, teacher_vars, infusion) -> (state, acc)`.

    batch: {'image': uint8 (B, H, W, 3), 'label': int32 (B,), 'rows': Targets rows (B, ...)} sharded on 'data'.
    teacher_vars / infusion: replicated, used only when the objective runs the teacher online.
    """
    aug_key = jax.random.key(seed)
    objective = spec.objective

    def step(state: TrainState, acc, batch, teacher_vars, infusion):
        images, labels, rows = batch["image"], batch["label"], batch["rows"]
        if spec.augment:
            images = data_lib.augment(jax.random.fold_in(aug_key, state.step), images)
        x = data_lib.normalize(images, spec.dtype)
        teacher_feats = ()
        if objective.needs_teacher_online:
            t_logits, t_blocks = spec.teacher.apply(teacher_vars, x, train=False)
            teacher_feats = tuple(jax.lax.stop_gradient(t_blocks[i]) for i in spec.teacher_taps)
            if spec.method_cfg.online_targets:
                # Every row, `correct` included, from the teacher on this (augmented) batch, so BTKD's easy/hard
                # split matches the rows that were rectified or infused; KI's table is the precomputed one.
                rows = methods.build_targets(spec.method_cfg, t_logits, labels, infusion=infusion)
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
    """Logits of every image, in order: batches padded to a multiple of the mesh size. -> (N, k) float32.

    Every process passes the same `images` (the whole split) and gets all the logits back: with several
    processes each device takes its rows from its host's identical copy and the sharded result is gathered
    with `multihost_utils.process_allgather` (`jax.device_get` cannot read shards held by other hosts).
    """
    n = len(images)
    ndev = mesh.devices.size
    batch_size = max(ndev, batch_size - batch_size % ndev)
    sharding = NamedSharding(mesh, P("data"))
    out = []
    starts = range(0, n, batch_size)
    for start in report.progress(starts, desc=progress, total=len(starts), disable=progress is None):
        chunk = images[start : start + batch_size]
        pad = (-len(chunk)) % ndev
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        # Each device takes its rows of the (identical on every process) host chunk: valid on several hosts.
        batch = jax.make_array_from_callback(chunk.shape, sharding, lambda index, chunk=chunk: chunk[index])
        logits = predict(variables, batch)[0]
        if jax.process_count() > 1:
            host = multihost_utils.process_allgather(logits, tiled=True)
        else:
            host = jax.device_get(logits)
        out.append(np.asarray(host)[: len(chunk) - pad])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _variables(state) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def _host_copy(tree):
    """A host copy: the step donates the state's buffers, so anything kept across steps must not alias them."""
    return jax.tree.map(lambda a: np.array(jax.device_get(a)), tree)


class NonFiniteLoss(UserError):
    pass


@dataclasses.dataclass
class FitResult:
    best_variables: dict
    history: list[dict]
    best_epoch: int


def fit(
    *,
    name: str,
    spec: StepSpec,
    train_cfg,
    dataset: data_lib.Dataset,
    train_targets: targets_lib.Targets,
    run_dir: str,
    mesh: Mesh,
    seed: int,
    teacher_vars=None,
    infusion=None,
    on_epoch: Callable[[dict], None] | None = None,
    show_progress: bool = True,
) -> FitResult:
    """Trains `spec.model` for `train_cfg.num_epochs`, checkpointing every epoch (orbax) and resuming from the
    last complete checkpoint in `run_dir`. The best epoch on validation accuracy is kept; returns it."""
    n_train = len(dataset.train_labels)
    steps_per_epoch = n_train // train_cfg.batch_size
    if steps_per_epoch < 1:
        raise UserError(
            f"{name}: batch_size={train_cfg.batch_size} is larger than the {n_train} training images; "
            "lower the batch size."
        )
    tx = make_optimizer(train_cfg, steps_per_epoch)
    init_rng = jax.random.key(seed)
    state = init_state(init_rng, spec.model, tx, dataset.train_images.shape[1:])
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(state, replicated)
    history: list[dict] = []
    best = {"epoch": -1, "val_accuracy": -1.0}
    best_variables = _host_copy(_variables(state))

    ckpt = workdir_lib.checkpoint_manager(os.path.join(run_dir, "checkpoints"))
    writer = None
    try:
        latest = ckpt.latest_step()
        if latest is not None:
            restored = ckpt.restore(
                latest,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(state),
                    best_variables=ocp.args.StandardRestore(best_variables),
                    history=ocp.args.JsonRestore(),
                ),
            )
            state = jax.device_put(restored["state"], replicated)
            best_variables = _host_copy(restored["best_variables"])
            history = list(restored["history"]["epochs"])
            best = restored["history"]["best"]
            log.info("%s: resumed from the checkpoint of epoch %d", name, len(history))

        step_fn = make_train_step(spec, mesh, seed)
        predict = make_predict_fn(spec.model, spec.dtype)
        batch_sharding = NamedSharding(mesh, P("data"))
        writer = report.MetricWriter(run_dir) if jax.process_index() == 0 else None
        if teacher_vars is not None:
            teacher_vars = jax.device_put(teacher_vars, replicated)
        if infusion is not None:
            infusion = jax.device_put(jnp.asarray(infusion), replicated)
        host_targets = jax.tree.map(np.asarray, train_targets)

        start_epoch = len(history)
        epochs = report.progress(
            range(start_epoch, train_cfg.num_epochs),
            desc=f"{name}",
            total=train_cfg.num_epochs,
            initial=start_epoch,
            disable=not show_progress,
            unit="epoch",
        )
        for epoch in epochs:
            t0 = time.perf_counter()
            acc = jax.device_put(zero_metrics(), replicated)
            order = data_lib.batch_indices(n_train, train_cfg.batch_size, seed=seed, epoch=epoch)
            local = _process_local(order)
            steps = report.progress(
                local,
                desc=f"  epoch {epoch + 1}",
                total=len(local),
                leave=False,
                disable=not show_progress or len(local) < 20,
                unit="step",
            )
            for idx in steps:
                batch = data_lib.make_global_batch(
                    {"image": dataset.train_images[idx], "label": dataset.train_labels[idx]}, batch_sharding
                )
                batch["rows"] = jax.tree.map(
                    lambda a, idx=idx: jax.make_array_from_process_local_data(batch_sharding, a[idx]),
                    host_targets,
                )
                state, acc = step_fn(state, acc, batch, teacher_vars, infusion)
            acc = jax.device_get(acc)
            if acc["first_nonfinite_step"] != np.iinfo(np.int32).max:
                bad = int(acc["first_nonfinite_step"]) + 1
                total = train_cfg.num_epochs * steps_per_epoch
                if history:
                    kept = (
                        f"the last good checkpoint (epoch {len(history)}) is kept in {run_dir}/checkpoints. "
                        f"Lower the learning rate (now {train_cfg.learning_rate}) or check the data, then "
                        "re-run with --config.overwrite=True (the diverged run is set aside) or a new --workdir"
                    )
                else:
                    kept = (
                        f"nothing was saved yet. Lower the learning rate (now {train_cfg.learning_rate}) or "
                        "check the data, then re-run"
                    )
                raise NonFiniteLoss(
                    f"{name}: the loss or its gradient became NaN/Inf at step {bad} of {total} (epoch "
                    f"{epoch + 1}); training stopped and {kept}."
                )
            val_logits = predict_logits(
                predict, _variables(state), dataset.val_images, train_cfg.eval_batch_size, mesh
            )
            val_acc = float(np.mean(np.argmax(val_logits, -1) == dataset.val_labels))
            # Only values that the config and seed decide: a resumed or repeated run writes the same records.
            record = {
                "epoch": epoch + 1,
                "step": int(jax.device_get(state.step)),
                "train_loss": float(acc["loss_sum"] / max(acc["count"], 1)),
                "train_accuracy": float(acc["correct"] / max(acc["count"], 1)),
                "val_accuracy": val_acc,
            }
            history.append(record)
            if val_acc > best["val_accuracy"]:
                best = {"epoch": epoch + 1, "val_accuracy": val_acc}
                best_variables = _host_copy(_variables(state))
            _save_checkpoint(
                ckpt,
                epoch + 1,
                ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    best_variables=ocp.args.StandardSave(best_variables),
                    history=ocp.args.JsonSave({"epochs": history, "best": best}),
                ),
                run_dir,
            )
            seconds = time.perf_counter() - t0
            if writer is not None:
                writer.write(record, extra_scalars={"seconds_per_epoch": seconds})
            if on_epoch is not None:
                on_epoch(record)
            if hasattr(epochs, "set_postfix"):
                epochs.set_postfix(loss=f"{record['train_loss']:.3f}", val_acc=f"{val_acc:.3f}")
            else:
                log.info(
                    "%s: epoch %d/%d loss %.4f train_acc %.4f val_acc %.4f (%.1f s)",
                    name,
                    epoch + 1,
                    train_cfg.num_epochs,
                    record["train_loss"],
                    record["train_accuracy"],
                    val_acc,
                    seconds,
                )
    finally:
        # Also on an error or Ctrl-C: the last epoch's (asynchronous) checkpoint is committed before leaving.
        try:
            _wait_for_checkpoint(ckpt, run_dir)
        finally:
            ckpt.close()
            if writer is not None:
                writer.close()
    return FitResult(best_variables=best_variables, history=history, best_epoch=best["epoch"])


def _save_checkpoint(ckpt: ocp.CheckpointManager, step: int, args, run_dir: str) -> None:
    try:
        ckpt.save(step, args=args)
    except (OSError, ValueError, RuntimeError) as e:
        error = _checkpoint_error(e, run_dir)
        if error is e:
            raise
        raise error from e


def _wait_for_checkpoint(ckpt: ocp.CheckpointManager, run_dir: str) -> None:
    try:
        ckpt.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as e:
        error = _checkpoint_error(e, run_dir)
        if error is e:
            raise
        raise error from e


_IO_FAILURES = {
    errno.ENOSPC: ("No space left on device", "RESOURCE_EXHAUSTED"),
    errno.EACCES: ("Permission denied",),
    errno.EROFS: ("Read-only file system",),
    errno.EDQUOT: ("Disk quota exceeded",),
}


def _checkpoint_error(error: Exception, run_dir: str) -> Exception:
    """Orbax reports a failed write as OSError or, from tensorstore, as ValueError('RESOURCE_EXHAUSTED: ... No
    space left on device'): those become a `UserError` naming the folder; anything else is re-raised as is."""
    where = os.path.join(run_dir, "checkpoints")
    if isinstance(error, OSError) and error.errno is not None:
        return workdir_lib.disk_error(where, error)
    text = str(error)
    for code, needles in _IO_FAILURES.items():
        if any(n in text for n in needles):
            return workdir_lib.disk_error(where, OSError(code, os.strerror(code)))
    return error


def _process_local(order: np.ndarray) -> np.ndarray:
    """This process's share of each global batch: (steps, B) -> (steps, B / process_count)."""
    n = jax.process_count()
    if n == 1:
        return order
    per = order.shape[1] // n
    i = jax.process_index()
    return order[:, i * per : (i + 1) * per]


# ----------------------------------------------------------------------------------------------------------
# The main job.


def _fingerprint(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _load_data(config) -> data_lib.Dataset:
    """The configured data set; its errors (missing folder, one class, too few images) are `UserError`s."""
    d = config.data
    try:
        return _load_dataset(config, d)
    except UserError:
        raise
    except ValueError as e:
        raise UserError(f"data.source={d.source!r}: {e}") from e
    except OSError as e:
        raise UserError(f"data.source={d.source!r}: cannot read it ({e}).") from e


def _load_dataset(config, d) -> data_lib.Dataset:
    dataset = data_lib.load_dataset(
        d.source,
        cache_dir=workdir_lib.expand(d.cache_dir) if d.cache_dir else None,
        seed=config.seed,
        image_size=d.image_size,
        max_per_class=d.max_per_class or None,
        digits_classes=d.digits_classes,
        tfds_data_dir=d.tfds_data_dir or None,
        use_dataset_test_split=d.use_dataset_test_split,
        progress=config.progress,
    )
    return dataset


def _step_spec(
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


def train_teacher(config, dataset, run_dir: str, mesh: Mesh) -> tuple[dict, dict]:
    """Trains (or reloads) the teacher; returns its eval variables and its metadata."""
    meta = {
        "model": config.teacher.model,
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "image_size": int(dataset.train_images.shape[1]),
        "data": _fingerprint(dataset.train_images, dataset.train_labels),
        "dtype": config.dtype,
    }
    final = os.path.join(run_dir, "final")
    source = workdir_lib.expand(config.teacher.checkpoint) if config.teacher.checkpoint else run_dir
    # teacher.checkpoint naming this run's own teacher folder means "train it here, or reuse it".
    trains_here = source == workdir_lib.expand(run_dir)
    if trains_here:
        # The teacher trained here: refuse to resume or reuse one trained with other settings.
        workdir_lib.claim_run_dir(
            run_dir, _teacher_identity(config, meta), "a teacher", jax.process_index() == 0, config.overwrite
        )
        _sync_processes("claim " + run_dir)
    saved = workdir_lib.read_json(os.path.join(source, "teacher.json"))
    if saved is not None:
        workdir_lib.check_teacher_matches(saved, meta, source)
        variables = workdir_lib.restore_variables(os.path.join(source, "final"))
        log.info("teacher: reusing %s (%s)", source, saved["model"])
        if source != run_dir:
            os.makedirs(run_dir, exist_ok=True)
        return variables, saved
    if not trains_here:
        raise UserError(
            f"teacher.checkpoint={config.teacher.checkpoint!r} holds no finished teacher (no teacher.json); "
            "point it at the 'teacher' folder of a finished run, or leave it empty to train one."
        )
    objective = methods.objective(methods.preset("CE"), config.teacher.num_epochs)
    steps = len(dataset.train_labels) // config.teacher.batch_size
    spec = _step_spec(
        config.teacher,
        dataset.num_classes,
        config.dtype,
        objective,
        steps,
        config.data.augment,
        resolve_conv_backward(config.get("conv_backward", "auto"), mesh),
    )
    dummy = _dummy_targets(len(dataset.train_labels), dataset.num_classes)
    result = fit(
        name="teacher",
        spec=spec,
        train_cfg=config.teacher,
        dataset=dataset,
        train_targets=dummy,
        run_dir=run_dir,
        mesh=mesh,
        seed=config.seed,
        show_progress=config.progress,
    )
    variables = {
        "params": result.best_variables["params"]["backbone"],
        "batch_stats": result.best_variables["batch_stats"]["backbone"],
    }
    meta.update(best_epoch=result.best_epoch, history=result.history)
    # Every process takes part in an orbax save (it synchronises them); process 0 writes the JSON files.
    workdir_lib.save_variables(final, variables)
    if jax.process_index() == 0:
        workdir_lib.write_json(os.path.join(run_dir, "teacher.json"), meta)
    return variables, meta


def _training_fields(train_cfg) -> dict:
    """The fields of a teacher/student config that decide its training (not eval_batch_size, checkpoint)."""
    skip = ("eval_batch_size", "checkpoint")
    return {k: v for k, v in train_cfg.to_dict().items() if k not in skip}


def _teacher_identity(config, meta: dict) -> dict:
    return {
        "teacher": _training_fields(config.teacher),
        "seed": config.seed,
        "dtype": config.dtype,
        "augment": config.data.augment,
        "data": meta["data"],
        "class_names": meta["class_names"],
        "image_size": meta["image_size"],
    }


def _student_identity(config, method_cfg, seed: int, dataset, t_logits) -> dict:
    return {
        "method": method_cfg.to_dict(),
        "student": _training_fields(config.student),
        "seed": seed,
        "dtype": config.dtype,
        "augment": config.data.augment,
        "data": _fingerprint(dataset.train_images, dataset.train_labels),
        "teacher_logits": _fingerprint(t_logits["train"], t_logits["val"], t_logits["test"]),
    }


def _dummy_targets(n: int, k: int) -> targets_lib.Targets:
    z = np.zeros((n, k), np.float32)
    return targets_lib.Targets(logits=z, lo=z, hi=z + 1.0, correct=np.ones((n,), bool))


def teacher_logits(
    config, teacher_vars, meta, dataset, teacher_dir: str, mesh: Mesh
) -> dict[str, np.ndarray]:
    """The teacher's eval-mode logits on every split, cached beside its checkpoint (keyed to it and the data)."""
    key = _fingerprint(
        *jax.tree.leaves(jax.tree.map(np.asarray, teacher_vars)), dataset.train_images, dataset.test_images
    )
    path = os.path.join(teacher_dir, "logits.npz")
    cached = workdir_lib.read_npz(path)
    splits = ("train", "val", "test")
    if cached is not None and str(cached.get("key")) == key and all(s in cached for s in splits):
        return {s: cached[s] for s in splits}
    model = models.get_model(meta["model"], dataset.num_classes, config.dtype)
    predict = make_predict_fn(model, jnp.dtype(config.dtype))
    out = {
        split: predict_logits(
            predict,
            teacher_vars,
            getattr(dataset, f"{split}_images"),
            config.teacher.eval_batch_size,
            mesh,
            progress=f"teacher logits ({split})" if config.progress else None,
        )
        for split in ("train", "val", "test")
    }
    if jax.process_index() == 0:
        workdir_lib.write_npz(path, key=np.asarray(key), **out)
    return out


def train_student(
    config, method_name: str, method_cfg, seed: int, dataset, teacher, t_logits, mesh: Mesh, run_dir: str
) -> dict:
    """Trains one student with one method and seed; returns its test metrics and history.

    A finished run in `run_dir` (result.json) with the same settings is reused, an interrupted one resumes
    from its last checkpoint; a folder started with other settings is refused (`workdir_lib.claim_run_dir`).
    With `config.overwrite`, an existing folder is set aside (renamed `<run_dir>.<time>`) and the student
    retrained.
    """
    writer = jax.process_index() == 0
    identity = _student_identity(config, method_cfg, seed, dataset, t_logits)
    if config.overwrite and os.path.isdir(run_dir):
        if writer:
            moved = workdir_lib.keep_aside(run_dir)
            log.info("%s (seed %d): overwrite=True, the previous run is kept in %s", method_name, seed, moved)
    workdir_lib.claim_run_dir(run_dir, identity, f"a {method_name} student (seed {seed})", writer)
    _sync_processes("claim " + run_dir)
    done = workdir_lib.read_json(os.path.join(run_dir, "result.json"))
    if done is not None:
        log.info("%s (seed %d): finished before, reusing %s", method_name, seed, run_dir)
        return done
    teacher_vars, teacher_meta = teacher
    scfg = config.student
    objective = methods.objective(method_cfg, scfg.num_epochs)
    train_targets = methods.build_targets(method_cfg, t_logits["train"], dataset.train_labels)
    infusion = None
    if "knowledge_infusion" in objective.transforms:
        infusion = targets_lib.infusion_table(t_logits["train"], dataset.train_labels, method_cfg.ki_mode)
    steps = len(dataset.train_labels) // scfg.batch_size
    kw: dict[str, Any] = {"method_cfg": method_cfg}
    conv_backward = resolve_conv_backward(config.get("conv_backward", "auto"), mesh)
    if objective.needs_teacher_online:
        kw["teacher"] = models.get_model(
            teacher_meta["model"], dataset.num_classes, config.dtype, conv_backward
        )
    if objective.uses_hints:
        t_shapes = jax.eval_shape(
            lambda x: kw["teacher"].apply(teacher_vars, x, train=False)[1], dataset.train_images[:1] * 0.0
        )
        student_blocks = len(
            jax.eval_shape(
                lambda x: models.get_model(scfg.model, dataset.num_classes).init_with_output(
                    jax.random.key(0), x, train=False
                )[0][1],
                dataset.train_images[:1] * 0.0,
            )
        )
        t_taps = models.feature_taps(len(t_shapes), "teacher")
        s_taps = models.feature_taps(student_blocks, "student")
        n = min(len(t_taps), len(s_taps))
        t_taps, s_taps = t_taps[:n], s_taps[:n]
        kw["teacher_taps"] = t_taps
        kw["student_kw"] = {
            "taps": s_taps,
            "hint_shapes": tuple(tuple(int(d) for d in t_shapes[i].shape[1:]) for i in t_taps),
        }
    spec = _step_spec(
        scfg, dataset.num_classes, config.dtype, objective, steps, config.data.augment, conv_backward, **kw
    )
    started = time.perf_counter()
    result = fit(
        name=f"{method_name} (seed {seed})",
        spec=spec,
        train_cfg=scfg,
        dataset=dataset,
        train_targets=train_targets,
        run_dir=run_dir,
        mesh=mesh,
        seed=seed,
        teacher_vars=teacher_vars if objective.needs_teacher_online else None,
        infusion=infusion,
        show_progress=config.progress,
    )
    backbone = models.get_model(scfg.model, dataset.num_classes, config.dtype)
    student_vars = {k: v["backbone"] for k, v in result.best_variables.items()}
    predict = make_predict_fn(backbone, jnp.dtype(config.dtype))
    test_logits = predict_logits(predict, student_vars, dataset.test_images, scfg.eval_batch_size, mesh)
    test_targets = methods.build_targets(method_cfg, t_logits["test"], dataset.test_labels, infusion=infusion)
    hits = np.asarray(
        losses.region_hits(
            test_logits,
            dataset.test_labels,
            test_targets.lo,
            test_targets.hi,
            temperature=method_cfg.temperature,
        )
    )
    test = metrics.classification_metrics(
        test_logits,
        dataset.test_labels,
        num_classes=dataset.num_classes,
        teacher_logits=t_logits["test"],
        region_hits=hits,
    )
    out = {
        "method": method_name,
        "seed": seed,
        "model": scfg.model,
        "config": method_cfg.to_dict(),
        "best_epoch": result.best_epoch,
        # Training and evaluation time of this process (after a resume: of the part run since).
        "wall_seconds": time.perf_counter() - started,
        "test": test,
        "history": result.history,
    }
    workdir_lib.save_variables(
        os.path.join(run_dir, "final"), student_vars
    )  # every process: orbax syncs them
    if jax.process_index() == 0:
        workdir_lib.write_json(
            os.path.join(run_dir, "model.json"),
            {
                "model": scfg.model,
                "num_classes": dataset.num_classes,
                "class_names": list(dataset.class_names),
                "image_size": int(dataset.train_images.shape[1]),
                "dtype": config.dtype,
            },
        )
        workdir_lib.write_json(os.path.join(run_dir, "result.json"), out)
    return out


def initialize_distributed(config) -> None:
    """With `config.distributed`, `jax.distributed.initialize()` (once, before anything touches the devices):
    several processes (hosts) then form one job; each feeds its share of every batch, process 0 writes."""
    if not config.get("distributed", False) or jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize()
    except (RuntimeError, ValueError) as e:
        raise UserError(
            f"distributed=True but jax.distributed.initialize() failed: {str(e).splitlines()[0][:300]}. It "
            "needs a multi-process launch (a Cloud TPU pod slice, SLURM, or JAX_COORDINATOR_ADDRESS / "
            "JAX_NUM_PROCESSES / JAX_PROCESS_ID set for each process); on one machine leave distributed=False."
        ) from e


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and math.isfinite(x)


def validate_config(config) -> None:
    """Checks the whole config up front, with messages naming the field and the valid values.

    Raises `UserError` (the CLI prints it and exits with status 2). With `config.distributed` it first calls
    `jax.distributed.initialize()`, since the batch-size check needs the global device count.
    """
    if not config.methods:
        raise UserError("config.methods is empty: name at least one method, e.g. 'DeBKD'.")
    for name, mcfg in config.methods.items():
        try:
            methods.validate(name, mcfg)
        except (ValueError, TypeError) as e:
            raise UserError(str(e)) from e
    initialize_distributed(config)
    for part in ("teacher", "student"):
        c = config[part]
        if c.model not in models.MODELS:
            raise UserError(f"{part}.model={c.model!r} is not one of {sorted(models.MODELS)}.")
        for field in ("num_epochs", "batch_size", "eval_batch_size"):
            if not (_is_int(c[field]) and c[field] >= 1):
                raise UserError(f"{part}.{field}={c[field]!r} must be an integer >= 1.")
        for field, ok, want in (
            ("learning_rate", lambda v: v > 0, "> 0"),
            ("weight_decay", lambda v: v >= 0, ">= 0"),
            ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("warmup_epochs", lambda v: v >= 0, ">= 0"),
        ):
            if not (_is_number(c[field]) and ok(c[field])):
                raise UserError(f"{part}.{field}={c[field]!r} must be a finite number {want}.")
        ndev = jax.device_count()
        if c.batch_size % ndev:
            raise UserError(
                f"{part}.batch_size={c.batch_size} is not divisible by the {ndev} devices; "
                f"use a multiple of {ndev}."
            )
    if not isinstance(config.teacher.get("checkpoint", ""), str):
        raise UserError(f"teacher.checkpoint={config.teacher.checkpoint!r} must be a path (a string).")
    if not (_is_int(config.seeds) and config.seeds >= 1):
        raise UserError(f"seeds={config.seeds!r} must be an integer >= 1.")
    if not (_is_int(config.seed) and config.seed >= 0):
        raise UserError(f"seed={config.seed!r} must be an integer >= 0.")
    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype={config.dtype!r} is not one of ('float32', 'bfloat16', 'float16').")
    conv_backward = config.get("conv_backward", "auto")
    if conv_backward not in CONV_BACKWARD_SETTINGS:
        raise UserError(f"conv_backward={conv_backward!r} is not one of {CONV_BACKWARD_SETTINGS}.")
    d = config.data
    if not (isinstance(d.source, str) and d.source):
        raise UserError(f"data.source={d.source!r} must be 'digits', 'folder:PATH' or 'tfds:NAME'.")
    if not (_is_int(d.image_size) and d.image_size >= 1):
        raise UserError(f"data.image_size={d.image_size!r} must be an integer >= 1.")
    if not (_is_int(d.max_per_class) and (d.max_per_class == 0 or d.max_per_class >= 3)):
        raise UserError(
            f"data.max_per_class={d.max_per_class!r} must be 0 (all images) or an integer >= 3 (one image "
            "per class for each of train, val and test)."
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Teacher -> cached teacher logits -> targets -> each method's student for each seed -> results.

    Writes into `workdir`: config.json, teacher/ (checkpoints, final model, teacher.json, logits.npz),
    students/<method>-seed<s>/ (checkpoints, final model, run.json, metrics.jsonl, TensorBoard events,
    result.json), results.json, results.md, val_accuracy.png, and skipped_files.csv when images were
    unreadable. Re-running the same command resumes an interrupted run and reuses finished parts; see
    docs/reliability.md.
    """
    validate_config(config)
    workdir = workdir_lib.expand(workdir)
    writer = jax.process_index() == 0
    with workdir_lib.Workdir(workdir, writer=writer) as wd:
        wd.write_config(config)
        mesh = create_mesh()
        dataset = _load_data(config)
        log.info(
            "data: %s, %d classes %s, train/val/test = %d/%d/%d",
            dataset.source,
            dataset.num_classes,
            dataset.class_names,
            len(dataset.train_labels),
            len(dataset.val_labels),
            len(dataset.test_labels),
        )
        if dataset.skipped:
            skipped_csv = os.path.join(workdir, "skipped_files.csv")
            if writer:
                write_skipped_csv(dataset.skipped, skipped_csv)
            log.warning(
                "data: skipped %d unreadable file(s), listed in %s", len(dataset.skipped), skipped_csv
            )
        teacher_dir = os.path.join(workdir, "teacher")
        teacher_vars, teacher_meta = train_teacher(config, dataset, teacher_dir, mesh)
        t_logits = teacher_logits(config, teacher_vars, teacher_meta, dataset, teacher_dir, mesh)
        teacher_test = metrics.classification_metrics(
            t_logits["test"], dataset.test_labels, num_classes=dataset.num_classes
        )
        runs = []
        for method_name, method_cfg in methods.ordered(config.methods):
            for s in range(config.seeds):
                seed = config.seed + s
                run_dir = os.path.join(
                    workdir, "students", f"{workdir_lib.safe_name(method_name)}-seed{seed}"
                )
                runs.append(
                    train_student(
                        config,
                        method_name,
                        method_cfg,
                        seed,
                        dataset,
                        (teacher_vars, teacher_meta),
                        t_logits,
                        mesh,
                        run_dir,
                    )
                )
        results = report.summarize(config, dataset, teacher_meta, teacher_test, runs)
        if writer:
            report.write_results(workdir, results)
        return results


def write_skipped_csv(skipped, path: str) -> None:
    """`path,reason` rows, one per unreadable file, written atomically."""
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(["path", "reason"])
    out.writerows(skipped)
    workdir_lib.atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
