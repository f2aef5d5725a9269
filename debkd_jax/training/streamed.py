"""Training and eval-mode passes on streamed data (`data.stream`): what `fit` needs from a stream, and the
lockstep pass every process runs over a split (teacher logits to disk, validation and test accuracy).

Every process feeds its local rows of each global batch (`make_global_batch`) and reads back only its own
rows of the result (`local_rows`), so no host ever holds a split's images or logits whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from debkd_jax import console
from debkd_jax.data import stream
from debkd_jax.data.batching import make_global_batch

MIN_ROWS_FOR_WORKERS = 4096
"""An eval-mode pass over fewer rows reads in threads instead of starting grain's worker processes."""


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of an array sharded on its first axis, in order (its addressable shards)."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, parts = set(), []
    for s in shards:  # replicated shards of the same rows appear once
        if (start := s.index[0].start or 0) not in seen:
            seen.add(start)
            parts.append(np.asarray(s.data))
    return np.concatenate(parts)


def local_eval_batch(eval_batch_size: int, mesh: Mesh) -> int:
    """Rows per process per eval step: eval_batch_size over the processes, a multiple of the local devices."""
    local_devices = mesh.devices.size // jax.process_count()
    per = max(1, eval_batch_size // jax.process_count())
    return max(local_devices, per - per % local_devices)


def predict_pass(
    predict: Callable,
    variables,
    records: stream.SplitRecords,
    *,
    image_size: int,
    eval_crop: float,
    mesh: Mesh,
    chunks: list[np.ndarray],
    chunk_rows: int,
    workers: int,
    on_chunk: Callable[[int, dict], None],
    progress: str | None = None,
) -> None:
    """Eval-mode logits of `records`' rows in `chunks`: process p handles chunks p, p + P, ... (all
    processes in
    lockstep); `on_chunk(chunk index, {'logits' (n, k), 'valid', 'label', 'row', 'reason'})` gets each of this
    process's chunks whole. `chunk_rows` must be a multiple of `local_eval_batch`."""
    p, n_proc = jax.process_index(), jax.process_count()
    order = stream.EvalOrder.build(chunks, chunk_rows, p, n_proc)
    read = stream.ReadExample(records, image_size, train=False, eval_crop=eval_crop)
    local = local_eval_batch(chunk_rows, mesh)
    while chunk_rows % local:
        local -= 1
    sharding = NamedSharding(mesh, P("data"))
    slots = len(order) // chunk_rows
    # Starting worker processes costs seconds: a short pass reads in this process's threads.
    workers = workers if len(order) >= MIN_ROWS_FOR_WORKERS else 0
    it = iter(stream.loader(order, read, local, workers=workers))
    bar = console.progress(range(slots), desc=progress, total=slots, disable=progress is None, unit="chunk")
    try:
        for t in bar:
            parts = []
            for _ in range(chunk_rows // local):
                batch = next(it)
                images = make_global_batch(batch["image"], sharding)
                parts.append(
                    {
                        **{k: batch[k] for k in ("valid", "label", "row", "reason")},
                        "logits": local_rows(predict(variables, images)[0]),
                    }
                )
            c = t * n_proc + p
            if c < len(chunks):
                whole = {k: np.concatenate([part[k] for part in parts])[: len(chunks[c])] for k in parts[0]}
                on_chunk(c, whole)
    finally:
        if hasattr(it, "close"):
            it.close()  # grain's worker processes end with the pass, not when the iterator is collected


def pass_accuracy(
    predict: Callable,
    variables,
    records: stream.SplitRecords,
    *,
    image_size: int,
    eval_crop: float,
    mesh: Mesh,
    batch_size: int,
    workers: int,
) -> float:
    """Top-1 accuracy over every row of `records` (all processes together)."""
    local = local_eval_batch(batch_size, mesh)
    counts = np.zeros(2, np.int64)

    def count(_, chunk):
        counts[0] += int(np.sum((np.argmax(chunk["logits"], -1) == chunk["label"]) & chunk["valid"]))
        counts[1] += int(np.sum(chunk["valid"]))

    predict_pass(
        predict,
        variables,
        records,
        image_size=image_size,
        eval_crop=eval_crop,
        mesh=mesh,
        chunks=stream.chunks_of(len(records), local),
        chunk_rows=local,
        workers=workers,
        on_chunk=count,
    )
    if jax.process_count() > 1:
        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 2).sum(0)
    return float(counts[0] / max(counts[1], 1))


@dataclasses.dataclass
class StreamTrainData:
    """What `fit` reads instead of an in-memory `Dataset`: the training rows and their teacher-logits store
    (None for CE), the validation rows, the image size, augmentation and grain's worker processes."""

    train: stream.SplitRecords
    val: stream.SplitRecords
    image_size: int
    augment: bool
    eval_crop: float
    workers: int
    logits: stream.LogitsStore | None = None

    def order(self, batch_size: int, seed: int, num_epochs: int) -> stream.TrainOrder:
        return stream.TrainOrder(
            len(self.train), batch_size, seed, num_epochs, jax.process_index(), jax.process_count()
        )

    def iterator(self, order: stream.TrainOrder, seed: int, state: dict | None):
        """The run's batch iterator (grain), at `state` (a checkpoint's `get_state()`) when given."""
        read = stream.ReadExample(
            self.train,
            self.image_size,
            train=self.augment,
            seed=seed,
            eval_crop=self.eval_crop,
            logits=self.logits,
        )
        it = iter(stream.loader(order, read, order.local_batch, workers=self.workers))
        if state is not None:
            it.set_state(state)
        return it

    def global_batch(self, it, sharding) -> dict:
        """The next local batch as global arrays {'image', 'label'[, 'teacher_logits']}."""
        batch = next(it)
        keys = ("image", "label", "teacher_logits") if self.logits is not None else ("image", "label")
        return make_global_batch({k: batch[k] for k in keys}, sharding)

    def val_accuracy(self, predict: Callable, variables, mesh: Mesh, batch_size: int) -> float:
        return pass_accuracy(
            predict,
            variables,
            self.val,
            image_size=self.image_size,
            eval_crop=self.eval_crop,
            mesh=mesh,
            batch_size=batch_size,
            workers=self.workers,
        )
