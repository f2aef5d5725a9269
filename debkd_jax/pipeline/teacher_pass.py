"""The one teacher pass: a network's eval-mode logits on splits of a source, written once into the logits
store of the source's kind (`data.logits_store`) and reused while its key holds.

    memory   `<stem>.npz` beside the teacher, its splits as `ArrayLogits`
    files    `<stem>-<key>/<split>/`, chunk files written by every process in turn (`LogitsStore`); a killed
             pass resumes at its first missing chunk

`view_logits` is the same pass over every augmented view of the training images (`config.targets`).

The key is a hash of everything the logits depend on: the variables, the model, the compute dtype, the
source's rows and preprocessing, and the store's dtype.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from debkd_jax import models, training, workdir_lib
from debkd_jax.data import logits_store, stream
from debkd_jax.data import source as source_lib
from debkd_jax.errors import UserError


def logits_key(variables, model_name: str, source: source_lib.DataSource, splits: dict, config) -> str:
    """16 hex digits of what a network's logits on `splits` depend on (module docstring)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.tree.map(np.asarray, variables)):
        h.update(np.ascontiguousarray(leaf).tobytes())
    rows = {name: hashlib.sha256("\n".join(split.ids).encode()).hexdigest() for name, split in splits.items()}
    settings = {
        "model": model_name,
        "dtype": config.dtype,
        "source": source.fingerprint,
        "preprocessing": source.preprocessing,
        "rows": rows,
        "store_dtype": config.teacher.get("logits_dtype", "float32"),
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def network_logits(
    *,
    config,
    source: source_lib.DataSource,
    variables,
    model_name: str,
    splits: dict[str, source_lib.Split],
    stem: str,
    mesh: Mesh,
    label: str,
) -> tuple[dict, str]:
    """({name: the store of `model_name`'s logits on `splits[name]`}, their key), computed by the one
    evaluation pass or read back from `stem` (module docstring)."""
    key = logits_key(variables, model_name, source, splits, config)
    dtype = config.teacher.get("logits_dtype", "float32")
    model = models.get_model(model_name, source.num_classes, config.dtype)
    predict = training.make_predict_fn(model, jnp.dtype(config.dtype))
    progress = (lambda name: f"{label} ({name})") if config.progress else (lambda name: None)
    if source.kind == "memory":
        path = stem + ".npz"
        cached = workdir_lib.read_npz(path)
        if cached is not None and str(cached.get("key")) == key and all(n in cached for n in splits):
            return {n: logits_store.ArrayLogits(cached[n]) for n in splits}, key
        out = {}
        for name, split in splits.items():
            z, _ = training.split_logits(
                predict,
                variables,
                source,
                split,
                mesh=mesh,
                progress=progress(name),
                eval_batch_size=config.teacher.eval_batch_size,
            )
            # The store's dtype acts as on disk: the logits are rounded to it.
            out[name] = logits_store.decode_logits(logits_store.encode_logits(z, dtype), dtype)
        if jax.process_index() == 0:
            workdir_lib.write_npz(path, key=np.asarray(key), **out)
        return {n: logits_store.ArrayLogits(z) for n, z in out.items()}, key
    root = f"{stem}-{key}"
    return {
        name: chunk_pass(
            config, predict, variables, source, split, os.path.join(root, name), mesh, progress(name), key
        )
        for name, split in splits.items()
    }, key


def chunk_pass(
    config,
    predict,
    variables,
    source,
    split,
    path: str,
    mesh: Mesh,
    progress,
    key: str,
    *,
    views: bool = False,
    settings: dict | None = None,
    top_k: int = 0,
):
    """The files kind's pass over one split (with `views`: over every view of the training split) into the
    chunk store at `path`: every process writes its chunks, chunks already there are kept (a killed pass
    resumes); with `top_k` each row is stored as `logits_store.pack_topk` packs it."""
    local = training.local_eval_batch(config.teacher.eval_batch_size, mesh)
    want = config.data.logits_chunk_rows
    chunk_rows = max(local, want - want % local)
    writer = jax.process_index() == 0
    n = len(split) * (source.views if views else 1)
    width = 2 * top_k + 1 if top_k else source.num_classes
    dtype = "float32" if top_k else config.teacher.get("logits_dtype", "float32")  # packed rows hold indices
    try:
        store = logits_store.LogitsStore.create(path, n, width, dtype, chunk_rows, key, writer, settings)
    except ValueError as e:
        raise UserError(str(e)) from e
    training.sync_processes("logits store " + path)
    todo = store.missing_chunks()
    training.sync_processes("logits todo " + path)  # every process listed the chunks before any writes
    if todo:
        all_chunks = stream.chunks_of(n, chunk_rows)

        def write(i, chunk):
            skipped = [
                (str(split.ids[r % len(split)]), str(reason))
                for r, reason, ok in zip(chunk["row"], chunk["reason"], chunk["valid"], strict=True)
                if not ok and r >= 0
            ]
            z = logits_store.pack_topk(chunk["logits"], top_k) if top_k else chunk["logits"]
            store.write_chunk(todo[i], z, chunk["valid"], chunk["label"], skipped)

        training.predict_pass(
            predict,
            variables,
            source,
            split,
            mesh=mesh,
            chunks=[all_chunks[c] for c in todo],
            chunk_rows=chunk_rows,
            on_chunk=write,
            progress=progress,
            views=views,
        )
    training.sync_processes("logits done " + path)
    return logits_store.LogitsStore.open(path, n, width)


def stored_top_k(config, source: source_lib.DataSource) -> int:
    """The k of the stored view rows' top k: `config.targets_top_k` when the data has more classes, else 0
    (whole rows)."""
    return config.targets_top_k if source.num_classes > config.targets_top_k else 0


def view_logits(
    *, config, source: source_lib.DataSource, variables, model_name: str, stem: str, mesh: Mesh, label: str
):
    """(`ViewLogits` of the teacher's logits on every training view, their key): computed once, for every
    method and seed (`config.targets = "stored"`, and knowledge infusion's table for "online"). Full rows
    where the data has at most `config.targets_top_k` classes, else each row's top k (`TopKLogits`). Memory
    kind: `<stem>.npz`, recomputed when its key differs; files: the chunk store `<stem>/`, whose manifest
    names the settings it was computed for, so that a store of other data, another teacher, another V, another
    augmentation or another top-k is refused in one line, never reused."""
    train = source.splits["train"]
    top_k = stored_top_k(config, source)
    settings = {
        "data": source.fingerprint,
        "teacher": logits_key(variables, model_name, source, {"train": train}, config),
        "views": source.views,
        "augmentation": {
            "kind": source.kind,
            "mixup": source.mixup,
            "seed": source.view_seed,
            "preprocessing": source.preprocessing,
        },
        "top_k": top_k,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    model = models.get_model(model_name, source.num_classes, config.dtype)
    predict = training.make_predict_fn(model, jnp.dtype(config.dtype))
    progress = f"{label} ({source.views} views)" if config.progress else None
    if source.kind == "memory":
        cached = workdir_lib.read_npz(stem + ".npz")
        if cached is not None and str(cached.get("key")) == key:
            z = cached["views"]
        else:
            z, _ = training.split_logits(
                predict,
                variables,
                source,
                train,
                mesh=mesh,
                progress=progress,
                eval_batch_size=config.teacher.eval_batch_size,
                views=True,
            )
            z = logits_store.pack_topk(z, top_k) if top_k else z
            if jax.process_index() == 0:
                workdir_lib.write_npz(stem + ".npz", key=np.asarray(key), views=z)
        store = logits_store.ArrayLogits(z)
    else:
        if config.overwrite and os.path.isdir(stem) and jax.process_index() == 0:
            manifest = workdir_lib.read_json(os.path.join(stem, "manifest.json"))
            if manifest is not None and manifest.get("key") != key:
                workdir_lib.keep_aside(stem)
        training.sync_processes("views " + stem)
        store = chunk_pass(
            config,
            predict,
            variables,
            source,
            train,
            stem,
            mesh,
            progress,
            key,
            views=True,
            settings=settings,
            top_k=top_k,
        )
    if top_k:
        store = logits_store.TopKLogits(store, source.num_classes, top_k)
    return logits_store.ViewLogits(store, len(train)), key


def array_logits(config, source: source_lib.DataSource, logits: dict, stem: str, key: str) -> dict:
    """Logits given as arrays (a logits file, `{split: (N, k) or None}`) as stores of the source's kind: as
    they are in memory, or written once into chunk stores (so that grain's workers read rows, not the
    array)."""
    if source.kind == "memory":
        return {s: None if z is None else logits_store.ArrayLogits(z) for s, z in logits.items()}
    out, writer = {}, jax.process_index() == 0
    dtype = config.teacher.get("logits_dtype", "float32")
    for name, z in logits.items():
        if z is None:
            out[name] = None
            continue
        path = os.path.join(f"{stem}-{key}", name)
        chunk_rows = config.data.logits_chunk_rows
        store = logits_store.LogitsStore.create(path, len(z), z.shape[1], dtype, chunk_rows, key, writer)
        if writer:
            labels = source.splits[name].labels
            for c in store.missing_chunks():
                rows = np.arange(c * chunk_rows, min((c + 1) * chunk_rows, len(z)))
                store.write_chunk(c, z[rows], np.ones(len(rows), bool), labels[rows], [])
        training.sync_processes("logits file " + path)
        out[name] = logits_store.LogitsStore.open(path, len(z), z.shape[1])
    return out
