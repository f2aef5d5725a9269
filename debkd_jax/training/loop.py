"""`fit`: trains one model for its epochs with the train step on either kind of data, checkpoints every
epoch (orbax) and resumes.

The checkpoint manager keeps the newest checkpoint and the best one on validation accuracy
(`workdir_lib.checkpoint_manager`); each holds the train state, the history up to its epoch and every
process's position in the data (the batch iterator's `get_state()`).
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
from debkd_jax.data.batching import make_global_batch
from debkd_jax.data.source import STEP_KEYS, DataSource, train_batches
from debkd_jax.data.stream import TrainOrder
from debkd_jax.errors import UserError
from debkd_jax.training.evaluate import split_accuracy
from debkd_jax.training.metric_writer import MetricWriter
from debkd_jax.training.state import host_copy, init_state, make_optimizer, variables_of, zero_metrics
from debkd_jax.training.step import StepSpec, make_predict_fn, make_train_step

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
    source: DataSource,
    run_dir: str,
    mesh: Mesh,
    seed: int,
    logits=None,
    teacher_vars=None,
    infusion=None,
    on_epoch: Callable[[dict], None] | None = None,
    show_progress: bool = True,
) -> FitResult:
    """Trains `spec.model` for `train_cfg.num_epochs` on `source`'s training split (either kind),
    checkpointing every epoch (orbax) and resuming from the last complete checkpoint in `run_dir`. Returns the
    variables of the best epoch on validation accuracy (of equal ones the earliest), restored from its
    checkpoint.

    `logits`: the training split's teacher logits (a store: `data.logits_store`), whose batch rows go to the
    step as 'teacher_logits'; None for a step that needs none (CE). The batch iterator's position
    (`get_state()`) is saved with every checkpoint and restored with it."""
    if spec.augment != source.augments_on_device:
        raise ValueError(
            f"{name}: the step augments={spec.augment} but the {source.kind} source's batches "
            f"{'carry' if source.augments_on_device else 'carry no'} view parameters; build both from one "
            "`augment` (memory kind: `data.memory_source(..., augment=True)`)."
        )
    train = source.splits["train"]
    n_train = len(train)
    steps_per_epoch = n_train // train_cfg.batch_size
    if steps_per_epoch < 1:
        raise UserError(
            f"{name}: batch_size={train_cfg.batch_size} is larger than the {n_train} training images; "
            "lower the batch size."
        )
    tx = make_optimizer(train_cfg, steps_per_epoch)
    state = init_state(jax.random.key(seed), spec.model, tx, (source.image_size, source.image_size, 3))
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
            has_data_item = os.path.isdir(os.path.join(run_dir, "checkpoints", str(latest), _DATA_ITEM))
            if has_data_item:
                items[_DATA_ITEM] = ocp.args.JsonRestore()
            restored = ckpt.restore(latest, args=ocp.args.Composite(**items))
            state = jax.device_put(restored["state"], replicated)
            history = list(restored["history"]["epochs"])
            if has_data_item:
                data_state = restored[_DATA_ITEM][f"process_{jax.process_index()}"]
            elif source.kind == "memory":  # written before iterator states were saved: at an epoch's end
                data_state = {"step": len(history) * steps_per_epoch}
            else:
                raise UserError(
                    f"{name}: the checkpoint of epoch {len(history)} in {run_dir}/checkpoints holds no "
                    "position "
                    "of the data stream; re-run with --config.overwrite=True (the old run is set aside) or a "
                    "new --workdir."
                )
            log.info("%s: resumed from the checkpoint of epoch %d", name, len(history))

        step_fn = make_train_step(spec, mesh)
        predict = make_predict_fn(spec.model, spec.dtype)
        batch_sharding = NamedSharding(mesh, P("data"))
        writer = MetricWriter(run_dir) if jax.process_index() == 0 else None
        if teacher_vars is not None:
            teacher_vars = jax.device_put(teacher_vars, replicated)
        if infusion is not None:
            infusion = jax.device_put(jnp.asarray(infusion), replicated)
        start_epoch = len(history)
        if start_epoch < train_cfg.num_epochs:
            order = TrainOrder(
                n_train,
                train_cfg.batch_size,
                seed,
                train_cfg.num_epochs,
                jax.process_index(),
                jax.process_count(),
            )
            batches = train_batches(source, order, logits=logits, state=data_state)

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
            steps = console.progress(
                range(steps_per_epoch),
                desc=f"  epoch {epoch + 1}",
                total=steps_per_epoch,
                leave=False,
                disable=not show_progress or steps_per_epoch < 20,
                unit="step",
            )
            for _ in steps:
                local = next(batches)
                batch = make_global_batch({k: v for k, v in local.items() if k in STEP_KEYS}, batch_sharding)
                state, acc = step_fn(state, acc, batch, teacher_vars, infusion)
            acc = jax.device_get(acc)
            if acc["first_nonfinite_step"] != np.iinfo(np.int32).max:
                raise non_finite_loss(name, acc, epoch, history, train_cfg, steps_per_epoch, run_dir)
            val_acc = split_accuracy(
                predict,
                variables_of(state),
                source,
                source.splits["val"],
                eval_batch_size=train_cfg.eval_batch_size,
                mesh=mesh,
            )
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
                # every process's position in the data, written by process 0
                _DATA_ITEM: ocp.args.JsonSave(_gathered_iterator_states(batches.get_state())),
            }
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
            if batches is not None and hasattr(batches, "close"):
                batches.close()  # grain's worker processes
            ckpt.close()
            if writer is not None:
                writer.close()
    return FitResult(best_variables=best_variables, history=history, best_epoch=best_epoch)


def non_finite_loss(name, acc, epoch, history, train_cfg, steps_per_epoch, run_dir) -> NonFiniteLoss:
    """The error of a run whose loss or gradient became NaN/Inf, saying what was kept and what to do."""
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
    return NonFiniteLoss(
        f"{name}: the loss or its gradient became NaN/Inf at step {bad} of {total} (epoch "
        f"{epoch + 1}); training stopped and {kept}."
    )


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
