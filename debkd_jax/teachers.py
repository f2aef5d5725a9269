"""A teacher given as a file of logits: read it, check it, and align it to a data source by image id.

The file (docs/teachers.md) is an `.npz` holding `ids` (N,) str and `logits` (N, k) float -- one row per
image, keyed by the image's stable id (`Dataset.train_ids` etc.: the path relative to the data folder, the
TFDS '<split>/<index>', or 'digits/<index>'). The rows may instead come in pairs per split,
`train_ids`/`train_logits`, `val_ids`/`val_logits`, `test_ids`/`test_logits`; all pairs present are joined.
Rows for images the dataset does not have are ignored, so one file can serve several subsets of the data.

Every check raises `UserError` with one line naming the problem, the count and a few example ids.

`read_variables` reads a teacher network's variables (`teacher.variables`): orbax folder or Flax msgpack.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from typing import NamedTuple

import numpy as np

from debkd_jax import workdir_lib
from debkd_jax.errors import UserError

SPLITS = ("train", "val", "test")
EXAMPLES = 3
"""How many example ids an error message names."""


class LogitsFile(NamedTuple):
    """A checked logits file: `ids` (N,) str, unique; `logits` (N, k) float32, finite; sha256 of the file."""

    path: str
    ids: np.ndarray
    logits: np.ndarray
    sha256: str

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])


def examples(ids) -> str:
    """'a', 'b', 'c', ... : the first `EXAMPLES` ids, quoted."""
    ids = [str(i) for i in ids]
    shown = ", ".join(repr(i) for i in ids[:EXAMPLES])
    return shown + (", ..." if len(ids) > EXAMPLES else "")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_logits_file(path: str) -> LogitsFile:
    """Reads and checks `path` (format above); `UserError` for a missing or unreadable file, missing or
    mis-shaped arrays, non-numeric logits, fewer than 2 classes, duplicate ids, or NaN/Inf."""
    fix = "write it with third_party/write_logits.py or np.savez(PATH, ids=..., logits=...), docs/teachers.md"
    if not os.path.isfile(path):
        raise UserError(f"teacher.logits={path!r}: no such file; {fix}.")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(
            f"teacher.logits={path!r} is not a readable .npz file ({type(e).__name__}: {e}); {fix}."
        ) from e
    pairs = [("ids", "logits")] + [(f"{s}_ids", f"{s}_logits") for s in SPLITS]
    present = [(i, lg) for i, lg in pairs if i in arrays or lg in arrays]
    if not present:
        raise UserError(
            f"teacher.logits={path!r} holds {sorted(arrays)}, not 'ids' and 'logits' (or 'train_ids' and "
            f"'train_logits', ...); {fix}."
        )
    ids, logits = [], []
    for id_key, logit_key in present:
        if id_key not in arrays or logit_key not in arrays:
            missing = id_key if id_key not in arrays else logit_key
            raise UserError(f"teacher.logits={path!r} has no {missing!r} to go with its other array; {fix}.")
        i, lg = arrays[id_key], arrays[logit_key]
        if i.ndim != 1 or i.dtype.kind not in "US":
            raise UserError(
                f"teacher.logits={path!r}: {id_key!r} must be a 1-d array of strings, got dtype {i.dtype} "
                f"shape {i.shape}; {fix}."
            )
        if lg.ndim != 2 or len(lg) != len(i) or lg.dtype.kind not in "fiu":
            raise UserError(
                f"teacher.logits={path!r}: {logit_key!r} must be a ({len(i)}, k) float array, one row per "
                "id, "
                f"got dtype {lg.dtype} shape {lg.shape}; {fix}."
            )
        ids.append(i.astype(str))
        logits.append(lg.astype(np.float32))
    widths = sorted({lg.shape[1] for lg in logits})
    if len(widths) > 1:
        raise UserError(f"teacher.logits={path!r}: its arrays have different class counts {widths}; {fix}.")
    ids_all, logits_all = np.concatenate(ids), np.concatenate(logits)
    if widths[0] < 2:
        raise UserError(f"teacher.logits={path!r}: logits have {widths[0]} column(s), need one per class.")
    unique, counts = np.unique(ids_all, return_counts=True)
    duplicated = unique[counts > 1]
    if len(duplicated):
        raise UserError(
            f"teacher.logits={path!r}: {len(duplicated)} id(s) appear more than once, e.g. "
            f"{examples(duplicated)}; keep one row per image."
        )
    bad = ~np.all(np.isfinite(logits_all), axis=1)
    if bad.any():
        raise UserError(
            f"teacher.logits={path!r}: {int(bad.sum())} row(s) hold NaN or Inf, e.g. "
            f"{examples(ids_all[bad])}; "
            "re-export the teacher's logits."
        )
    return LogitsFile(path, ids_all, logits_all, file_sha256(path))


def rows_for(file: LogitsFile, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits (M, k) of the `wanted` ids in their order, NaN rows for missing ids; bool mask of found)."""
    order = np.argsort(file.ids)
    sorted_ids = file.ids[order]
    pos = np.searchsorted(sorted_ids, wanted)
    pos = np.minimum(pos, max(len(sorted_ids) - 1, 0))
    found = sorted_ids[pos] == wanted if len(sorted_ids) else np.zeros(len(wanted), bool)
    rows = np.full((len(wanted), file.num_classes), np.nan, np.float32)
    rows[found] = file.logits[order[pos[found]]]
    return rows, found


def align_logits(file: LogitsFile, source) -> dict[str, np.ndarray | None]:
    """The file's logits for each split of `source` (a `data.source.DataSource`), in its order: {'train':
    (N, k), 'val': (M, k) or None, 'test': ...}. Every training image must have a row; a val/test split the
    file does not fully cover is None (the teacher's row then says so). `UserError` for another class count or
    missing training images."""
    k = source.num_classes
    if file.num_classes != k:
        raise UserError(
            f"teacher.logits={file.path!r} has {file.num_classes} logits per image but the data has {k} "
            "classes "
            f"{list(source.class_names)}; export the teacher for the same classes, in this order."
        )
    out: dict[str, np.ndarray | None] = {}
    for split in SPLITS:
        ids = np.asarray(source.splits[split].ids).astype(str)
        rows, found = rows_for(file, ids)
        if split == "train" and not found.all():
            missing = ids[~found]
            raise UserError(
                f"teacher.logits={file.path!r} misses {len(missing)} of the {len(ids)} training images, e.g. "
                f"{examples(missing)} (ids are paths relative to the data folder, '<split>/<index>' for "
                "TFDS, "
                f"'digits/<index>' for digits; the file has e.g. {examples(file.ids)}); add their rows."
            )
        out[split] = rows if found.all() else None
    return out


def read_variables(path: str) -> dict:
    """A Flax variables dict ({'params': ..., 'batch_stats': ...}) from an orbax checkpoint folder (as
    `workdir_lib.save_variables` writes, e.g. a run's teacher/final) or a Flax msgpack file
    (`flax.serialization.to_bytes(variables)`); `UserError` for a missing or unreadable one."""
    fix = "give an orbax checkpoint folder or a file of flax.serialization.to_bytes(variables)"
    if os.path.isdir(path):
        variables = workdir_lib.restore_variables(path)
    elif os.path.isfile(path):
        from flax import serialization

        try:
            with open(path, "rb") as f:
                variables = serialization.msgpack_restore(f.read())
        except Exception as e:  # noqa: BLE001 - msgpack raises several types for a file of another format
            raise UserError(
                f"teacher.variables={path!r} is not a Flax msgpack file ({type(e).__name__}); {fix}."
            ) from e
    else:
        raise UserError(f"teacher.variables={path!r}: no such file or folder; {fix}.")
    if not isinstance(variables, dict) or "params" not in variables:
        keys = sorted(variables) if isinstance(variables, dict) else type(variables).__name__
        raise UserError(
            f"teacher.variables={path!r} holds {keys}, not a variables dict with 'params' (and 'batch_stats' "
            f"for BatchNorm); {fix}."
        )
    return dict(variables)


def write_logits_file(path: str, source, t_logits: dict) -> None:
    """Writes the `read_logits_file` format: `ids` and `logits` of every split `t_logits` has (not None),
    in the order of the data source's splits; atomic (`workdir_lib.write_npz`)."""
    splits = [s for s in SPLITS if t_logits.get(s) is not None]
    ids = np.concatenate([np.asarray(source.splits[s].ids).astype(str) for s in splits])
    logits = np.concatenate([np.asarray(t_logits[s], np.float32) for s in splits])
    workdir_lib.write_npz(path, ids=ids, logits=logits)
