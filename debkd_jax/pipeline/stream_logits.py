"""The streamed job's teacher logits (docs/scale.md): the teacher pass that writes every split's logits to a
`LogitsStore`, knowledge infusion's table read from it chunk by chunk, and a small split's logits gathered."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from debkd_jax import models, training
from debkd_jax import targets as targets_lib
from debkd_jax.data import stream
from debkd_jax.errors import UserError

SPLITS = ("train", "val", "test")


def stream_settings(config) -> dict:
    d = config.data
    return {"image_size": d.image_size, "eval_crop": d.eval_crop, "augment": d.augment}


def streamed_infusion_table(store: stream.LogitsStore, mode: str) -> np.ndarray:
    """`targets.infusion_table` of the whole training split, read chunk by chunk: each chunk's table weighted
    by its teacher-correct rows (per row c by its correct rows of label c), which is the whole split's table
    since each entry is a mean over the correct rows."""
    valid, labels, _ = store.meta()
    k = store.num_classes
    total = np.zeros((k, k))
    weight = np.zeros((k, 1))
    for c, rows in enumerate(stream.chunks_of(store.num_rows, store.chunk_rows)):
        z = stream.decode_logits(np.load(os.path.join(store.path, f"chunk-{c:06d}.npy")), store.dtype)
        ok = valid[rows]
        z, y = z[ok], labels[rows][ok]
        correct = np.argmax(z, -1) == y
        if not correct.any():
            continue
        table = np.asarray(targets_lib.infusion_table(z, y, mode), np.float64)
        w = (
            np.full((k, 1), correct.sum(), np.float64)
            if mode == "pooled"
            else np.bincount(y[correct], minlength=k)[:, None].astype(np.float64)
        )
        total += w * table
        weight += w
    if not weight.any():
        raise UserError(
            "knowledge infusion needs at least one training image the teacher classifies correctly, "
            "found none; train the teacher longer or drop 'knowledge_infusion'"
        )
    return np.where(weight > 0, total / np.maximum(weight, 1e-12), _pooled_fallback(total, weight, k)).astype(
        np.float32
    )


def _pooled_fallback(total: np.ndarray, weight: np.ndarray, k: int) -> np.ndarray:
    """For `per_class` rows of labels without a correct row: the pooled table (zF everywhere, zC at c), from
    the per-class rows that exist, weighted by their counts."""
    have = weight[:, 0] > 0
    rows = total[have] / weight[have]
    w = weight[have, 0]
    idx = np.flatnonzero(have)
    z_c = np.sum(w * rows[np.arange(len(idx)), idx]) / w.sum()
    z_f = np.sum(w * (rows.sum(1) - rows[np.arange(len(idx)), idx]) / (k - 1)) / w.sum()
    return z_f + (z_c - z_f) * np.eye(k)


def teacher_pass(config, variables, source, root: str, mesh) -> dict[str, stream.LogitsStore]:
    """Every split's teacher logits in `root/<split>` (`stream.LogitsStore`), written chunk by chunk by the
    processes in turn; chunks already there are kept (a killed pass resumes)."""
    d = config.data
    model = models.get_model(config.teacher.model, source.num_classes, config.dtype)
    predict = training.make_predict_fn(model, jnp.dtype(config.dtype))
    local = training.local_eval_batch(config.teacher.eval_batch_size, mesh)
    chunk_rows = max(local, d.logits_chunk_rows - d.logits_chunk_rows % local)
    writer = jax.process_index() == 0
    key = logits_key(variables, source, config)
    stores = {}
    for split in SPLITS:
        records = source.splits[split]
        path = os.path.join(root, split)
        try:
            store = stream.LogitsStore.create(
                path, len(records), source.num_classes, config.teacher.logits_dtype, chunk_rows, key, writer
            )
        except ValueError as e:
            raise UserError(str(e)) from e
        training.sync_processes("logits store " + path)
        todo = store.missing_chunks()
        training.sync_processes("logits todo " + path)  # every process listed the chunks before any writes
        if todo:
            all_chunks = stream.chunks_of(len(records), chunk_rows)

            def write(i, chunk, store=store, todo=todo, records=records):
                skipped = [
                    (str(records.ids[r]), str(reason))
                    for r, reason, ok in zip(chunk["row"], chunk["reason"], chunk["valid"], strict=True)
                    if not ok
                ]
                store.write_chunk(todo[i], chunk["logits"], chunk["valid"], chunk["label"], skipped)

            training.predict_pass(
                predict,
                variables,
                records,
                image_size=d.image_size,
                eval_crop=d.eval_crop,
                mesh=mesh,
                chunks=[all_chunks[c] for c in todo],
                chunk_rows=chunk_rows,
                workers=d.workers,
                on_chunk=write,
                progress=f"teacher pass ({split})" if config.progress else None,
            )
        training.sync_processes("logits done " + path)
        stores[split] = stream.LogitsStore.open(path, len(records), source.num_classes)
    return stores


def logits_key(variables, source, config) -> str:
    import hashlib

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.tree.map(np.asarray, variables)):
        h.update(np.ascontiguousarray(leaf).tobytes())
    h.update(repr((source.fingerprint, stream_settings(config), config.teacher.model, config.dtype)).encode())
    return h.hexdigest()[:16]


def all_rows(store: stream.LogitsStore) -> np.ndarray:
    """A (small) split's logits whole: (N, k) float32."""
    return np.concatenate(
        [
            stream.decode_logits(np.load(os.path.join(store.path, f"chunk-{c:06d}.npy")), store.dtype)
            for c in range(store.num_chunks)
        ]
    )


def gathered_logits(config, variables, model_name: str, records, num_classes: int, mesh) -> np.ndarray:
    """Eval-mode logits of every row of `records` on every process: (N, k) float32 (for val/test-sized
    splits)."""
    d = config.data
    model = models.get_model(model_name, num_classes, config.dtype)
    predict = training.make_predict_fn(model, jnp.dtype(config.dtype))
    local = training.local_eval_batch(config.student.eval_batch_size, mesh)
    out = np.zeros((len(records), num_classes), np.float32)
    got = []

    def keep(_, chunk):
        got.append((chunk["row"], chunk["logits"]))

    training.predict_pass(
        predict,
        variables,
        records,
        image_size=d.image_size,
        eval_crop=d.eval_crop,
        mesh=mesh,
        chunks=stream.chunks_of(len(records), local),
        chunk_rows=local,
        workers=d.workers,
        on_chunk=keep,
    )
    rows = np.concatenate([r for r, _ in got]) if got else np.zeros(0, np.int64)
    logits = np.concatenate([z for _, z in got]) if got else np.zeros((0, num_classes), np.float32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        pad = -(-len(records) // jax.process_count()) + local
        rows_p = np.full(pad, -1, np.int64)
        rows_p[: len(rows)] = rows
        logits_p = np.zeros((pad, num_classes), np.float32)
        logits_p[: len(rows)] = logits
        rows = np.asarray(multihost_utils.process_allgather(rows_p)).reshape(-1)
        logits = np.asarray(multihost_utils.process_allgather(logits_p)).reshape(-1, num_classes)
        logits, rows = logits[rows >= 0], rows[rows >= 0]
    out[rows] = logits
    return out
