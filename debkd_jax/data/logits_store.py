"""A split's teacher logits, one row per example, behind one interface of three kinds:

    ArrayLogits     in memory: (N, k) float32 (the memory kind's teacher pass, a logits file)
    LogitsStore     on disk: chunk files written by the teacher pass chunk by chunk (any process any chunk),
                    read by memory map, never whole; float16/bfloat16 storage halves it (docs/scale.md)
    ComposedLogits  rows taken from several stores (out-of-fold logits: each row from its fold's pass)
    ViewLogits      the logits of every augmented view of every image (`config.targets = "stored"`)
    TopKLogits      a view's top-k logits and what rebuilds the rest (many classes; docs/method.md)

Each has `num_rows`, `num_classes`, `row(r)` (k,), `rows(idx)` (n, k), `chunks()` -> (rows, logits) pieces
that together are every row once, `all()` (N, k) for a small split, `valid` (N,) bool (False: an image the
teacher pass could not read), and `view_rows(rows, views)`, the rows a batch of views trains on. Every value
comes back as float32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence

import ml_dtypes
import numpy as np

from debkd_jax import workdir_lib

STORE_DTYPES = ("float32", "float16", "bfloat16")


class ImageRows:
    """The teacher's logits of an image serve every view of it (`config.targets = "fixed"`)."""

    def view_rows(self, rows, views) -> np.ndarray:
        return self.rows(rows)


@dataclasses.dataclass(frozen=True, eq=False)
class LogitsStore(ImageRows):
    """A split's teacher logits in `path`: `manifest.json` (rows, classes, dtype, chunk_rows, key) and, per
    chunk c of `chunk_rows` rows, `chunk-c.npy` (rows, k) logits in `dtype` (bfloat16 stored as its uint16
    bits) and `chunk-c.npz` (valid, labels, the unreadable rows' ids and reasons). A chunk is whole files or
    nothing (one atomic write each, the .npy last), so a pass resumes at the first missing chunk; `row(r)`
    maps only chunk r // chunk_rows (np.load mmap), so no host loads the file whole."""

    path: str
    num_rows: int
    num_classes: int
    dtype: str
    chunk_rows: int
    key: str
    settings: dict | None = None

    @classmethod
    def create(
        cls,
        path: str,
        num_rows: int,
        num_classes: int,
        dtype: str,
        chunk_rows: int,
        key: str,
        writer: bool,
        settings: dict | None = None,
    ) -> LogitsStore:
        """The store at `path`, its manifest written (by `writer`) when new. ValueError (one line, naming each
        difference) when `path` holds a store of other data or settings: another key, row or class count, or
        another value of a `settings` field (what the logits were computed from)."""
        if dtype not in STORE_DTYPES:
            raise ValueError(f"teacher logits storage dtype must be one of {STORE_DTYPES}, got {dtype!r}")
        store = cls(path, num_rows, num_classes, dtype, chunk_rows, key, settings)
        manifest = workdir_lib.read_json(os.path.join(path, "manifest.json"))
        if manifest is None:
            if writer:
                os.makedirs(path, exist_ok=True)
                workdir_lib.write_json(os.path.join(path, "manifest.json"), store.manifest())
            return store
        wanted = json.loads(json.dumps(store.manifest(), default=str))
        if manifest != wanted:
            raise ValueError(
                f"the teacher logits in {path} were computed for other data or settings "
                f"({workdir_lib.describe_changes(manifest, wanted)[:500]}); "
                "set them aside with --config.overwrite=True or use a new workdir"
            )
        return store

    @classmethod
    def open(cls, path: str, num_rows: int, num_classes: int) -> LogitsStore:
        """A finished store, checked against the data: ValueError (one line) for a missing or incomplete store
        or one whose rows or classes do not match."""
        manifest = workdir_lib.read_json(os.path.join(path, "manifest.json"))
        if manifest is None:
            raise ValueError(f"no teacher logits store at {path} (manifest.json missing)")
        store = cls(
            path,
            **{k: manifest[k] for k in ("num_rows", "num_classes", "dtype", "chunk_rows", "key")},
            settings=manifest.get("settings"),
        )
        if (store.num_rows, store.num_classes) != (num_rows, num_classes):
            raise ValueError(
                f"the teacher logits in {path} have {store.num_rows} rows x {store.num_classes} "
                f"classes, the data {num_rows} x {num_classes}; they are of other data"
            )
        if missing := store.missing_chunks():
            raise ValueError(
                f"the teacher logits in {path} lack {len(missing)} chunk(s) (e.g. {missing[0]}); "
                "finish the teacher pass (re-run the same command)"
            )
        return store

    def manifest(self) -> dict:
        out = {
            "num_rows": self.num_rows,
            "num_classes": self.num_classes,
            "dtype": self.dtype,
            "chunk_rows": self.chunk_rows,
            "key": self.key,
        }
        if self.settings is not None:
            out["settings"] = self.settings
        return out

    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.chunk_rows)

    def _file(self, c: int, ext: str) -> str:
        return os.path.join(self.path, f"chunk-{c:06d}.{ext}")

    def missing_chunks(self) -> list[int]:
        return [c for c in range(self.num_chunks) if not os.path.exists(self._file(c, "npy"))]

    def write_chunk(
        self,
        c: int,
        logits: np.ndarray,
        valid: np.ndarray,
        labels: np.ndarray,
        skipped: Sequence[tuple[str, str]],
    ) -> None:
        import io

        rows = min(self.chunk_rows, self.num_rows - c * self.chunk_rows)
        if logits.shape != (rows, self.num_classes):
            raise ValueError(f"chunk {c}: logits {logits.shape}, expected {(rows, self.num_classes)}")
        meta = io.BytesIO()
        np.savez(
            meta, valid=valid, labels=labels, skipped=np.asarray(list(skipped), dtype=str).reshape(-1, 2)
        )
        workdir_lib.atomic_write_bytes(self._file(c, "npz"), meta.getvalue())
        data = io.BytesIO()
        np.save(data, encode_logits(logits, self.dtype))
        workdir_lib.atomic_write_bytes(self._file(c, "npy"), data.getvalue())

    def row(self, r: int) -> np.ndarray:
        """Row r as float32 (k,), read from its chunk's memory map."""
        c, i = divmod(int(r), self.chunk_rows)
        return decode_logits(np.asarray(self._chunk(c)[i]), self.dtype)

    def rows(self, idx) -> np.ndarray:
        """Rows `idx` as float32 (n, k), each chunk's rows read from its memory map at once."""
        idx = np.asarray(idx, np.int64)
        out = np.empty((len(idx), self.num_classes), np.float32)
        chunk, within = np.divmod(idx, self.chunk_rows)
        for c in np.unique(chunk):
            sel = chunk == c
            out[sel] = decode_logits(np.asarray(self._chunk(int(c))[within[sel]]), self.dtype)
        return out

    def chunks(self):
        """(rows, logits (n, k) float32) per chunk file, in order."""
        for c in range(self.num_chunks):
            start = c * self.chunk_rows
            z = decode_logits(np.load(self._file(c, "npy")), self.dtype)
            yield np.arange(start, start + len(z)), z

    def all(self) -> np.ndarray:
        return (
            np.concatenate([z for _, z in self.chunks()])
            if self.num_rows
            else np.zeros((0, self.num_classes), np.float32)
        )

    @property
    def valid(self) -> np.ndarray:
        return self.meta()[0]

    @functools.lru_cache(maxsize=16)  # noqa: B019 - per process; maps, not data
    def _chunk(self, c: int) -> np.ndarray:
        return np.load(self._file(c, "npy"), mmap_mode="r")

    def __getstate__(self):
        return dataclasses.asdict(self)

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def meta(self) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
        """(valid (N,) bool, labels (N,) int32, [(id, reason) of the unreadable rows]), each a fresh copy of
        what one read of the chunks' metadata gave (a finished store's chunks do not change)."""
        valid, labels, skipped = self._meta()
        return valid.copy(), labels.copy(), list(skipped)

    @functools.lru_cache(maxsize=16)  # noqa: B019 - per process; one read of every chunk's .npz per store
    def _meta(self) -> tuple[np.ndarray, np.ndarray, tuple[tuple[str, str], ...]]:
        valid, labels, skipped = [], [], []
        for c in range(self.num_chunks):
            with np.load(self._file(c, "npz")) as z:
                valid.append(z["valid"])
                labels.append(z["labels"])
                skipped.extend((str(a), str(b)) for a, b in z["skipped"])
        return np.concatenate(valid), np.concatenate(labels).astype(np.int32), tuple(skipped)


def encode_logits(logits: np.ndarray, dtype: str) -> np.ndarray:
    """float32 logits in the store's dtype: float16/float32 as such, bfloat16 as the uint16 of its bits."""
    if dtype == "bfloat16":
        return np.asarray(logits, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    return np.asarray(logits, np.float32).astype(dtype)


def decode_logits(stored: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return np.asarray(stored).view(ml_dtypes.bfloat16).astype(np.float32)
    return np.asarray(stored, np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayLogits(ImageRows):
    """A split's logits in memory (module docstring): `logits` (N, k) float32, all rows valid unless `valid`
    says otherwise."""

    logits: np.ndarray
    valid_rows: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])

    def row(self, r: int) -> np.ndarray:
        return np.asarray(self.logits[int(r)], np.float32)

    def rows(self, idx) -> np.ndarray:
        return np.asarray(self.logits[np.asarray(idx, np.int64)], np.float32)

    def chunks(self):
        yield np.arange(self.num_rows), np.asarray(self.logits, np.float32)

    def all(self) -> np.ndarray:
        return np.asarray(self.logits, np.float32)

    @property
    def valid(self) -> np.ndarray:
        return np.ones(self.num_rows, bool) if self.valid_rows is None else np.asarray(self.valid_rows, bool)


@dataclasses.dataclass(frozen=True, eq=False)
class ComposedLogits(ImageRows):
    """Rows from several stores (module docstring): row r is row `position[r]` of `parts[part_of[r]]`."""

    parts: tuple
    part_of: np.ndarray
    position: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.part_of)

    @property
    def num_classes(self) -> int:
        return self.parts[0].num_classes

    def row(self, r: int) -> np.ndarray:
        return self.parts[int(self.part_of[r])].row(int(self.position[r]))

    def rows(self, idx) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        out = np.empty((len(idx), self.num_classes), np.float32)
        for k in np.unique(self.part_of[idx]):
            sel = self.part_of[idx] == k
            out[sel] = self.parts[int(k)].rows(self.position[idx[sel]])
        return out

    def _rows_of(self, k: int) -> np.ndarray:
        """The rows part k holds, by their position in it."""
        rows = np.flatnonzero(self.part_of == k)
        return rows[np.argsort(self.position[rows])]

    def chunks(self):
        for k, part in enumerate(self.parts):
            rows_of = self._rows_of(k)
            for rows, z in part.chunks():
                yield rows_of[rows], z

    def all(self) -> np.ndarray:
        out = np.empty((self.num_rows, self.num_classes), np.float32)
        for rows, z in self.chunks():
            out[rows] = z
        return out

    @property
    def valid(self) -> np.ndarray:
        out = np.ones(self.num_rows, bool)
        for k, part in enumerate(self.parts):
            out[self._rows_of(k)] = part.valid
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class ViewLogits:
    """The teacher's logits on every view (`config.targets = "stored"`): row `v * num_images + i` of `store`
    holds view v of image i (the view-major order of `stream.ViewOrder`). `view_rows(rows, views)` reads a
    batch's views; `row`, `rows`, `chunks`, `all` and `valid` run over all V x N rows."""

    store: object
    num_images: int

    @property
    def num_views(self) -> int:
        return self.store.num_rows // self.num_images

    @property
    def num_rows(self) -> int:
        return self.store.num_rows

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    def view_rows(self, rows, views) -> np.ndarray:
        return self.store.rows(np.asarray(views, np.int64) * self.num_images + np.asarray(rows, np.int64))

    def row(self, r: int) -> np.ndarray:
        return self.store.row(r)

    def rows(self, idx) -> np.ndarray:
        return self.store.rows(idx)

    def chunks(self):
        return self.store.chunks()

    def all(self) -> np.ndarray:
        return self.store.all()

    @property
    def valid(self) -> np.ndarray:
        return self.store.valid


def pack_topk(logits: np.ndarray, k: int) -> np.ndarray:
    """(n, K) logits, k < K -> (n, 2k + 1) float32 rows: the k largest logits rounded to float16, their class
    indices, and the log-sum-exp of the other K - k logits, `log sum_{c not in top} e^{z_c}` (docs/method.md,
    "Top-k rows": what `unpack_topk` rebuilds from)."""
    z = np.asarray(logits, np.float64)
    order = np.argsort(-z, axis=-1, kind="stable")
    idx, rest = order[:, :k], np.take_along_axis(z, order[:, k:], axis=-1)
    values = np.take_along_axis(z, idx, axis=-1).astype(np.float16).astype(np.float32)
    m = rest.max(axis=-1, keepdims=True)
    rest_lse = (m + np.log(np.sum(np.exp(rest - m), axis=-1, keepdims=True))).astype(np.float32)
    return np.concatenate([values, idx.astype(np.float32), rest_lse], axis=-1)


def unpack_topk(packed: np.ndarray, num_classes: int, k: int) -> np.ndarray:
    """(n, 2k + 1) -> (n, K) float32 logits: the stored k logits in their classes, and every other class an
    equal share of the others' mass, `rest_lse - log(K - k)`. So softmax(logits) keeps the top-k
    probabilities (to float16 rounding) and the others' total, spread evenly."""
    packed = np.asarray(packed, np.float32)
    values, idx, rest_lse = packed[:, :k], packed[:, k : 2 * k].astype(np.int64), packed[:, 2 * k :]
    others = rest_lse - np.float32(np.log(num_classes - k))
    out = np.broadcast_to(others, (len(packed), num_classes)).copy()
    np.put_along_axis(out, idx, values, axis=-1)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class TopKLogits(ImageRows):
    """Logits kept as their top k (`pack_topk` rows in `store`), made whole on each read (`unpack_topk`)."""

    store: object
    num_classes: int
    k: int

    @property
    def num_rows(self) -> int:
        return self.store.num_rows

    def row(self, r: int) -> np.ndarray:
        return self.rows([r])[0]

    def rows(self, idx) -> np.ndarray:
        return unpack_topk(self.store.rows(idx), self.num_classes, self.k)

    def chunks(self):
        for rows, packed in self.store.chunks():
            yield rows, unpack_topk(packed, self.num_classes, self.k)

    def all(self) -> np.ndarray:
        return unpack_topk(self.store.all(), self.num_classes, self.k)

    @property
    def valid(self) -> np.ndarray:
        return self.store.valid


def row_labels(store, labels: np.ndarray) -> np.ndarray:
    """The label of each row of `store`: the images' labels, repeated for every view of a `ViewLogits`."""
    if isinstance(store, ViewLogits):
        return np.tile(labels, store.num_views)
    return labels


def accuracy(store, labels: np.ndarray) -> float:
    """The share of the readable rows of `store` whose largest logit is their image's label (`labels`, one per
    image), read chunk by chunk."""
    labels = row_labels(store, labels)
    correct = total = 0
    valid = store.valid
    for rows, z in store.chunks():
        ok = valid[rows]
        correct += int(np.sum((np.argmax(z, -1) == labels[rows]) & ok))
        total += int(np.sum(ok))
    return float(correct / max(total, 1))
