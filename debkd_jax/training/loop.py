"""`fit`: trains one model for its epochs with the train step, checkpoints every epoch (orbax) and resumes.

The checkpoint manager keeps the newest checkpoint and the best one on validation accuracy
(`workdir_lib.checkpoint_manager`); each holds the train state and the history up to its epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from debkd_jax import console, workdir_lib
from debkd_jax import data as data_lib
from debkd_jax import targets as targets_lib
from debkd_jax.errors import UserError
from debkd_jax.training.distributed import process_local
from debkd_jax.training.metric_writer import MetricWriter
from debkd_jax.training.state import host_copy, init_state, make_optimizer, variables_of, zero_metrics
from debkd_jax.training.step import StepSpec, make_predict_fn, make_train_step, predict_logits
from debkd_jax.training.streamed import StreamTrainData

log = logging.getLogger("debkd_jax")


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
    dataset: data_lib.Dataset | None,
    train_targets: targets_lib.Targets | None,
    run_dir: str,
    mesh: Mesh,
    seed: int,
    teacher_vars=None,
    infusion=None,
    on_epoch: Callable[[dict], None] | None = None,
    show_progress: bool = True,
    stream: StreamTrainData | None = None,
) -> FitResult:
    """Trains `spec.model` for `train_cfg.num_epochs`, checkpointing every epoch (orbax) and resuming from the
    last complete checkpoint in `run_dir`. Returns the variables of the best epoch on validation accuracy (of
    equal ones the earliest), restored from its checkpoint.

    `stream` (instead of `dataset` and `train_targets`): batches from grain (`StreamTrainData`), whose
    iterator
    position is saved with every checkpoint and restored with it."""
    n_train = len(stream.train) if stream is not None else len(dataset.train_labels)
    steps_per_epoch = n_train // train_cfg.batch_size
    if steps_per_epoch < 1:
        raise UserError(
            f"{name}: batch_size={train_cfg.batch_size} is larger than the {n_train} training images; "
            "lower the batch size."
        )
    tx = make_optimizer(train_cfg, steps_per_epoch)
    init_rng = jax.random.key(seed)
    image_shape = (stream.image_size,) * 2 + (3,) if stream is not None else dataset.train_images.shape[1:]
    state = init_state(init_rng, spec.model, tx, image_shape)
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(state, replicated)
    history: list[dict] = []
    data_state = None

    ckpt = workdir_lib.checkpoint_manager(os.path.join(run_dir, "checkpoints"))
    writer = None
    batches = None
    try:
        latest = ckpt.latest_step()
        if latest is not None:
            if ckpt.best_step() is None:
                raise UserError(
                    f"{name}: the checkpoints in {run_dir}/checkpoints were written by an older debkd_jax "
                    "(no validation metrics beside them); re-run with --config.overwrite=True (the old run "
                    "is set aside) or a new --workdir."
                )
            items = {"state": ocp.args.StandardRestore(host_copy(state)), "history": ocp.args.JsonRestore()}
            if stream is not None:
                items[_DATA_ITEM] = ocp.args.JsonRestore()
            restored = ckpt.restore(latest, args=ocp.args.Composite(**items))
            state = jax.device_put(restored["state"], replicated)
            history = list(restored["history"]["epochs"])
            if stream is not None:
                data_state = restored[_DATA_ITEM][f"process_{jax.process_index()}"]
            log.info("%s: resumed from the checkpoint of epoch %d", name, len(history))

        step_fn = make_train_step(spec, mesh, seed)
        predict = make_predict_fn(spec.model, spec.dtype)
        batch_sharding = NamedSharding(mesh, P("data"))
        writer = MetricWriter(run_dir) if jax.process_index() == 0 else None
        if teacher_vars is not None:
            teacher_vars = jax.device_put(teacher_vars, replicated)
        if infusion is not None:
            infusion = jax.device_put(jnp.asarray(infusion), replicated)
        host_targets = jax.tree.map(np.asarray, train_targets)
        start_epoch = len(history)
        batches = None
        if stream is not None and start_epoch < train_cfg.num_epochs:
            order = stream.order(train_cfg.batch_size, seed, train_cfg.num_epochs)
            batches = stream.iterator(order, seed, data_state)

        epochs = console.progress(
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
            if stream is None:
                order = data_lib.batch_indices(n_train, train_cfg.batch_size, seed=seed, epoch=epoch)
                local = process_local(order)
            else:
                local = range(steps_per_epoch)
            steps = console.progress(
                local,
                desc=f"  epoch {epoch + 1}",
                total=len(local),
                leave=False,
                disable=not show_progress or len(local) < 20,
                unit="step",
            )
            for idx in steps:
                if stream is None:
                    batch = data_lib.gather_batch(dataset, host_targets, idx, batch_sharding)
                else:
                    batch = stream.global_batch(batches, batch_sharding)
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
            if stream is None:
                val_logits = predict_logits(
                    predict, variables_of(state), dataset.val_images, train_cfg.eval_batch_size, mesh
                )
                val_acc = float(np.mean(np.argmax(val_logits, -1) == dataset.val_labels))
            else:
                val_acc = stream.val_accuracy(predict, variables_of(state), mesh, train_cfg.eval_batch_size)
            # Only values that the config and seed decide: a resumed or repeated run writes the same records.
            record = {
                "epoch": epoch + 1,
                "step": int(jax.device_get(state.step)),
                "train_loss": float(acc["loss_sum"] / max(acc["count"], 1)),
                "train_accuracy": float(acc["correct"] / max(acc["count"], 1)),
                "val_accuracy": val_acc,
            }
            history.append(record)
            items = {
                # A host copy: orbax writes host arrays from process 0 alone, while replicated device
                # arrays would be split among the processes (each writing its part of the checkpoint).
                "state": ocp.args.StandardSave(host_copy(state)),
                "history": ocp.args.JsonSave({"epochs": history}),
            }
            if stream is not None:  # every process's grain iterator position, written by process 0
                items[_DATA_ITEM] = ocp.args.JsonSave(_gathered_iterator_states(batches.get_state()))
            _save_checkpoint(
                ckpt,
                epoch + 1,
                ocp.args.Composite(**items),
                {"epoch": epoch + 1, "val_accuracy": val_acc},
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
        _wait_for_checkpoint(ckpt, run_dir)
        best_epoch = ckpt.best_step()
        if best_epoch is None:  # no epoch trained
            best_epoch, best_variables = -1, host_copy(variables_of(state))
        else:
            best_state = ckpt.restore(
                best_epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(host_copy(state)))
            )["state"]
            best_variables = host_copy(variables_of(best_state))
    finally:
        # Also on an error or Ctrl-C: the last epoch's (asynchronous) checkpoint is committed before leaving.
        try:
            _wait_for_checkpoint(ckpt, run_dir)
        finally:
            if stream is not None and batches is not None and hasattr(batches, "close"):
                batches.close()  # grain's worker processes
            ckpt.close()
            if writer is not None:
                writer.close()
    return FitResult(best_variables=best_variables, history=history, best_epoch=best_epoch)


_DATA_ITEM = "data_iterator"


def _gathered_iterator_states(state: dict) -> dict:
    """{'process_<i>': process i's grain iterator state} on every process (JSON, gathered as bytes)."""
    import json

    if jax.process_count() == 1:
        return {"process_0": state}
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(state).encode().ljust(4096), np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(raw)).reshape(jax.process_count(), -1)
    return {f"process_{i}": json.loads(bytes(row).decode().strip()) for i, row in enumerate(everyone)}


def _save_checkpoint(ckpt: ocp.CheckpointManager, step: int, args, metrics: dict, run_dir: str) -> None:
    with workdir_lib.user_write_errors(os.path.join(run_dir, "checkpoints")):
        ckpt.save(step, args=args, metrics=metrics)


def _wait_for_checkpoint(ckpt: ocp.CheckpointManager, run_dir: str) -> None:
    with workdir_lib.user_write_errors(os.path.join(run_dir, "checkpoints")):
        ckpt.wait_until_finished()
