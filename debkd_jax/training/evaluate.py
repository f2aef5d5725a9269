"""The one evaluation pass, for either kind of data: eval-mode logits of a split's rows, every process in
lockstep (teacher logits, validation accuracy, test logits).

Every process feeds its local rows of each global batch (`make_global_batch`) and reads back only its own rows
of the result (`local_rows`); `split_logits` then gathers a (val/test-sized) split's logits on every process,
while the teacher pass hands each chunk to `on_chunk` and never holds a split whole.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from debkd_jax import console
from debkd_jax.data import source as source_lib
from debkd_jax.data import stream
from debkd_jax.data.batching import make_global_batch

MIN_ROWS_FOR_WORKERS = 4096
"""A pass over fewer rows reads files in threads instead of starting grain's worker processes."""


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


def eval_chunk_rows(eval_batch_size: int, num_rows: int, mesh: Mesh) -> int:
    """Rows of one global eval batch: `eval_batch_size` rounded down to a multiple of the devices, and no more
    than the split's rows rounded up to one (a small split is not padded to a whole batch)."""
    ndev = mesh.devices.size
    batch = max(ndev, eval_batch_size - eval_batch_size % ndev)
    return min(batch, max(ndev, -(-num_rows // ndev) * ndev))


def predict_pass(
    predict: Callable,
    variables,
    source: source_lib.DataSource,
    split: source_lib.Split,
    *,
    mesh: Mesh,
    chunks: list[np.ndarray],
    chunk_rows: int,
    on_chunk: Callable[[int, dict], None],
    progress: str | None = None,
    views: bool = False,
) -> None:
    """Eval-mode logits of `split`'s rows in `chunks` (with `views`: of the training views' rows, view-major,
    `data.source.view_batches`): process p handles chunks p, p + P, ... (all processes in lockstep);
    `on_chunk(chunk index, {'logits' (n, k), 'valid', 'label', 'row', 'reason'})` gets each of this process's
    chunks whole. `chunk_rows`: the rows of every chunk but the last; a process reads its chunks whole,
    `local_eval_batch(chunk_rows)` rows a step, and every step's global batch holds those of all processes."""
    p, n_proc = jax.process_index(), jax.process_count()
    order = stream.EvalOrder.build(chunks, chunk_rows, p, n_proc)
    local = local_eval_batch(chunk_rows, mesh)
    while chunk_rows % local:
        local -= 1
    sharding = NamedSharding(mesh, P("data"))
    slots = len(order) // chunk_rows
    # Starting worker processes costs seconds: a short pass reads in this process's threads.
    workers = source.workers if len(order) >= MIN_ROWS_FOR_WORKERS else 0
    if views:
        it = source_lib.view_batches(source, order, local, workers=workers)
    else:
        it = source_lib.eval_batches(source, split, order, local, workers=workers)
    bar = console.progress(range(slots), desc=progress, total=slots, disable=progress is None, unit="chunk")
    try:
        for t in bar:
            parts = []
            for _ in range(chunk_rows // local):
                batch = next(it)
                images = make_global_batch(batch["image"], sharding)
                parts.append(
                    {
                        **{k: np.asarray(batch[k]) for k in ("valid", "label", "row", "reason")},
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


def split_logits(
    predict: Callable,
    variables,
    source: source_lib.DataSource,
    split: source_lib.Split,
    *,
    eval_batch_size: int,
    mesh: Mesh,
    progress: str | None = None,
    views: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, k) float32, valid (N,) bool) of every row of `split` (with `views`: of every training view,
    V x N rows, view-major), on every process (for data that fits in memory; a pass over data of any size
    writes chunks instead: `predict_pass`)."""
    n = len(split) * (source.views if views else 1)
    chunk_rows = eval_chunk_rows(eval_batch_size, n, mesh)
    got: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def keep(_, chunk):
        got.append((chunk["row"], chunk["logits"], chunk["valid"]))

    predict_pass(
        predict,
        variables,
        source,
        split,
        mesh=mesh,
        chunks=stream.chunks_of(n, chunk_rows),
        chunk_rows=chunk_rows,
        on_chunk=keep,
        progress=progress,
        views=views,
    )
    k = got[0][1].shape[1] if got else 0
    rows = np.concatenate([r for r, _, _ in got]) if got else np.zeros(0, np.int64)
    logits = np.concatenate([z for _, z, _ in got]) if got else np.zeros((0, k), np.float32)
    valid = np.concatenate([v for _, _, v in got]) if got else np.zeros(0, bool)
    if jax.process_count() > 1:
        k = int(np.max(multihost_utils.process_allgather(np.int64(k))))  # a process may have had no chunk
        logits = logits.reshape(len(rows), k)
        pad = -(-n // jax.process_count()) + chunk_rows
        rows_p = np.full(pad, -1, np.int64)
        rows_p[: len(rows)] = rows
        logits_p = np.zeros((pad, k), np.float32)
        logits_p[: len(rows)] = logits
        valid_p = np.zeros(pad, bool)
        valid_p[: len(rows)] = valid
        rows = np.asarray(multihost_utils.process_allgather(rows_p)).reshape(-1)
        logits = np.asarray(multihost_utils.process_allgather(logits_p)).reshape(-1, k)
        valid = np.asarray(multihost_utils.process_allgather(valid_p)).reshape(-1)
        keep_rows = rows >= 0
        rows, logits, valid = rows[keep_rows], logits[keep_rows], valid[keep_rows]
    out = np.zeros((n, k), np.float32)
    ok = np.zeros(n, bool)
    out[rows] = logits
    ok[rows] = valid
    return out, ok


def split_accuracy(
    predict: Callable,
    variables,
    source: source_lib.DataSource,
    split: source_lib.Split,
    *,
    eval_batch_size: int,
    mesh: Mesh,
) -> float:
    """Top-1 accuracy over the readable rows of `split` (all processes together): each process counts its
    chunks' right and readable rows, and only the two counts are gathered."""
    chunk_rows = eval_chunk_rows(eval_batch_size, len(split), mesh)
    counts = np.zeros(2, np.int64)  # right, readable

    def count(_, chunk):
        right = (np.argmax(chunk["logits"], -1) == split.labels[chunk["row"]]) & chunk["valid"]
        counts[:] += (int(np.sum(right)), int(np.sum(chunk["valid"])))

    predict_pass(
        predict,
        variables,
        source,
        split,
        mesh=mesh,
        chunks=stream.chunks_of(len(split), chunk_rows),
        chunk_rows=chunk_rows,
        on_chunk=count,
    )
    if jax.process_count() > 1:
        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 2).sum(0)
    return float(counts[0] / max(int(counts[1]), 1))
