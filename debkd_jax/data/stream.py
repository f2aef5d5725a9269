"""Streamed input: image folders and TFDS array_record read by grain, never held whole (docs/scale.md).

    plan_stream      a source listed (folder) or opened (TFDS) but not decoded: train/val/test `SplitRecords`
    SplitRecords     random access to one split's examples: read + decode one image (in grain's workers)
    train_transform  (transforms.py) random-resized crop to S (scale 0.08-1, ratio 3/4-4/3) + flip
    eval_transform   (transforms.py) shorter side to S / eval_crop (S * 256 / 224 by default), center crop
    TrainOrder       element i of the whole run -> (row, epoch, global position): the in-memory path's order
    EvalOrder        this process's rows of a split, in whole chunks, padded with -1 for a lockstep pass
    loader           grain: order -> read/decode/augment (worker processes) -> local batches -> prefetch
    LogitsStore      (logits_store.py) teacher logits on disk, one row per example, in chunk files
    choose_pipeline  data.pipeline = "memory" | "stream" | "auto", and why

The order of the training examples is `batching.batch_indices(n, B, seed, epoch)`, as in memory, and process p
of P takes columns [p B/P, (p+1) B/P) of every global batch: each host reads only the images it trains on, the
processes' parts of an epoch are disjoint and together the whole epoch, and the global batch does not
depend on
the number of processes. The augmentation of an example is seeded by (seed, epoch, global position) alone,
so it
does not depend on the number of processes or workers either, and a restart at a step repeats it exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image

from debkd_jax.data import sources
from debkd_jax.data import split as split_lib
from debkd_jax.data.batching import batch_indices
from debkd_jax.data.logits_store import STORE_DTYPES, LogitsStore, decode_logits, encode_logits  # noqa: F401
from debkd_jax.data.transforms import EVAL_CROP, eval_transform, rrc_box, train_transform  # noqa: F401

PIPELINES = ("memory", "stream", "auto")
AUTO_MEMORY_SHARE = 0.25
"""`data.pipeline="auto"` streams when the decoded images would take more than this share of the memory."""

_TFDS_VAL_SPLITS = ("validation", "test")


# ----------------------------------------------------------------------------- sources


# grain reads an example per thread. CPython 3.11 can fail ("AST constructor recursion depth mismatch") when
# threads import modules at the same time: Pillow's format plugins are loaded here, once, at import (so in
# every grain worker before its threads start), and TFDS is opened under a lock.
Image.init()
_OPEN_LOCK = threading.Lock()


def _read_tfds(name: str, split: str, data_dir: str | None):
    """The `tfds.data_source` of one split, opened once per process (grain workers included)."""
    with _OPEN_LOCK:
        return _open_tfds(name, split, data_dir)


@functools.lru_cache(maxsize=8)
def _open_tfds(name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


@dataclasses.dataclass(frozen=True, eq=False)
class SplitRecords:
    """One split's examples, random access, picklable (grain sends it to its worker processes).

    Folder sources: `paths` (absolute) and `labels` of the split's rows. TFDS: `tfds_split` names the split of
    `tfds_name` and `indices` its records. `ids[i]` is row i's stable id (`sources.folder_id`/`tfds_id`).
    """

    ids: np.ndarray
    paths: np.ndarray | None = None
    labels: np.ndarray | None = None
    tfds_name: str = ""
    tfds_split: str = ""
    tfds_data_dir: str | None = None
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, row: int, draft_size: int | None = None) -> tuple[Image.Image | None, int, str | None]:
        """(RGB image, label, None), or (None, label or -1, reason) for an image that cannot be read."""
        try:
            if self.paths is not None:
                return sources.open_rgb(str(self.paths[row]), draft_size), int(self.labels[row]), None
            example = _read_tfds(self.tfds_name, self.tfds_split, self.tfds_data_dir)[int(self.indices[row])]
            return sources.array_to_rgb(example["image"]), int(example["label"]), None
        except Image.DecompressionBombError as e:
            return None, self._label(row), f"decompression bomb refused: {e}"
        except Exception as e:  # noqa: BLE001 - any decoder failure skips the example, reason kept.
            return None, self._label(row), f"{type(e).__name__}: {e}"

    def _label(self, row: int) -> int:
        return int(self.labels[row]) if self.labels is not None else -1

    def select(self, rows: np.ndarray) -> SplitRecords:
        """The same split restricted to `rows` (in that order)."""
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return dataclasses.replace(
            self,
            ids=self.ids[rows],
            paths=pick(self.paths),
            labels=pick(self.labels),
            indices=pick(self.indices),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class StreamSource:
    """A source ready to stream: its name, classes, and the train/val/test `SplitRecords`."""

    name: str
    class_names: tuple[str, ...]
    splits: dict[str, SplitRecords]
    fingerprint: dict

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def plan_stream(
    source: str,
    *,
    seed: int,
    split=(0.7, 0.1, 0.2),
    max_per_class: int | None = None,
    tfds_data_dir: str | None = None,
) -> StreamSource:
    """`folder:PATH`: listed (no image decoded) and split train/val/test as `load_dataset` splits it (same
    seed, same stratified split, same rows when no image is unreadable). `tfds:NAME`: its own 'train' split,
    and 'validation' (or 'test') as both val and test. ValueError for a missing/empty folder, a source the
    stream cannot read, or a TFDS dataset without those splits."""
    kind, arg = sources.parse_source(source)
    if kind == "folder":
        root = os.path.abspath(os.path.expanduser(arg))
        listing = sources.folder_listing(root)
        bad = {p for p, _ in listing.unstattable}
        keep = [
            i
            for i in split_lib.subset_per_class(listing.labels, max_per_class)
            if listing.paths[i] not in bad
        ]
        labels = listing.labels[keep]
        split_lib.check_class_counts(labels, listing.class_names, f"folder:{root}", len(bad), None)
        parts = split_lib.split_indices(labels, split_lib.check_split(split), seed)
        paths = np.asarray([os.path.join(root, listing.paths[i]) for i in keep])
        ids = np.asarray([sources.folder_id(listing.paths[i]) for i in keep])
        splits = {
            name: SplitRecords(ids=ids[rows], paths=paths[rows], labels=labels[rows])
            for name, rows in zip(("train", "val", "test"), parts, strict=True)
        }
        return StreamSource(
            f"folder:{root}",
            listing.class_names,
            splits,
            {
                "source": "folder",
                "files": len(listing.paths),
                "files_sha": _sha(listing.fingerprint),
                "seed": seed,
                "split": list(split),
                "max_per_class": max_per_class,
            },
        )
    if kind != "tfds":
        raise ValueError(
            f"data.pipeline='stream' reads 'folder:PATH' or 'tfds:NAME', not {source!r}; "
            "use data.pipeline='memory' for it"
        )
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(arg, data_dir=tfds_data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"TFDS dataset {arg!r} not found ({e}); prepare it with `tfds build {arg} "
            "--file_format=array_record --data_dir=DIR` and pass data.tfds_data_dir=DIR"
        ) from e
    recorded = tuple(builder.info.splits)
    val = next((s for s in _TFDS_VAL_SPLITS if s in recorded), None)
    if "train" not in recorded or val is None:
        raise ValueError(
            f"TFDS dataset {arg!r} has splits {list(recorded)}; streaming needs 'train' and "
            "'validation' (or 'test'); prepare those splits"
        )
    splits = {}
    for name, tfds_split in (("train", "train"), ("val", val), ("test", val)):
        n = builder.info.splits[tfds_split].num_examples
        if max_per_class:  # a fixed prefix: labels are unknown before reading
            n = min(n, max_per_class * builder.info.features["label"].num_classes)
        splits[name] = SplitRecords(
            ids=np.asarray([sources.tfds_id(tfds_split, i) for i in range(n)]),
            tfds_name=arg,
            tfds_split=tfds_split,
            tfds_data_dir=tfds_data_dir,
            indices=np.arange(n),
        )
    return StreamSource(
        f"tfds:{arg}",
        tuple(builder.info.features["label"].names),
        splits,
        {
            "source": "tfds",
            "name": arg,
            "version": str(builder.info.version),
            "rows": {k: len(v) for k, v in splits.items()},
        },
    )


def _sha(rows) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def num_examples(source: str, tfds_data_dir: str | None = None) -> int:
    """Examples in a source without decoding any: the folder's image files or TFDS's recorded counts."""
    kind, arg = sources.parse_source(source)
    if kind == "digits":
        return 1797
    if kind == "folder":
        return len(sources.folder_listing(os.path.abspath(os.path.expanduser(arg))).paths)
    import tensorflow_datasets as tfds

    try:
        info = tfds.builder(arg, data_dir=tfds_data_dir).info
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"TFDS dataset {arg!r} not found ({e})") from e
    return int(sum(s.num_examples for s in info.splits.values()))


def choose_pipeline(
    setting: str,
    source: str,
    image_size: int,
    tfds_data_dir: str | None = None,
    memory_bytes: int | None = None,
) -> tuple[str, str]:
    """("memory" | "stream", why). "auto" streams when N * S * S * 3 bytes of decoded images exceed
    `AUTO_MEMORY_SHARE` of this host's memory (`memory_bytes`, default: physical memory)."""
    if setting not in PIPELINES:
        raise ValueError(f"data.pipeline must be one of {PIPELINES}, got {setting!r}")
    if setting != "auto":
        return setting, f"data.pipeline={setting!r}"
    if sources.parse_source(source)[0] == "digits":
        return "memory", "data.pipeline='auto': the digits are small"
    n = num_examples(source, tfds_data_dir)
    need = n * image_size * image_size * 3
    memory = memory_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    choice = "stream" if need > AUTO_MEMORY_SHARE * memory else "memory"
    verb = "more" if choice == "stream" else "no more"
    return choice, (
        f"data.pipeline='auto': {n} images decoded at {image_size}x{image_size} take "
        f"{need / 2**30:.2f} GiB, {verb} than {AUTO_MEMORY_SHARE:.0%} of the "
        f"{memory / 2**30:.1f} GiB of memory"
    )


# ----------------------------------------------------------------------------- orders


@dataclasses.dataclass(frozen=True)
class TrainOrder:
    """Element i of a run's training stream -> (row, epoch, global position), for this process.

    i runs over epochs x steps x local batch; position = step * B + process_index * B_local + j, and row is
    `batch_indices(n, B, seed, epoch)` at that position: the in-memory path's order and process split.
    """

    num_rows: int
    batch_size: int
    seed: int
    num_epochs: int
    process_index: int = 0
    process_count: int = 1
    shuffle: bool = True

    def __post_init__(self):
        if self.batch_size % self.process_count:
            raise ValueError(f"batch_size={self.batch_size} must divide over {self.process_count} processes")
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the {self.num_rows} training examples"
            )

    @property
    def local_batch(self) -> int:
        return self.batch_size // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.batch_size

    def __len__(self) -> int:
        return self.num_epochs * self.steps_per_epoch * self.local_batch

    def __getitem__(self, i: int) -> tuple[int, int, int]:
        epoch, r = divmod(int(i), self.steps_per_epoch * self.local_batch)
        step, j = divmod(r, self.local_batch)
        position = step * self.batch_size + self.process_index * self.local_batch + j
        return int(self._order(epoch)[position]), epoch, position

    @functools.lru_cache(maxsize=2)  # noqa: B019 - a few small instances per run
    def _order(self, epoch: int) -> np.ndarray:
        return batch_indices(
            self.num_rows, self.batch_size, seed=self.seed, epoch=epoch, shuffle=self.shuffle
        ).reshape(-1)


@dataclasses.dataclass(frozen=True)
class EvalOrder:
    """This process's rows of a lockstep pass over `chunks` (lists of rows): process p takes chunks p, p + P,
    ...; every process runs the same number of chunk slots, a slot without a chunk (or a chunk's tail) padded
    with row -1. Element i -> (row, -1, i)."""

    rows: np.ndarray

    @classmethod
    def build(
        cls, chunks: Sequence[np.ndarray], chunk_rows: int, process_index: int = 0, process_count: int = 1
    ) -> EvalOrder:
        slots = -(-len(chunks) // process_count)
        rows = np.full((slots, chunk_rows), -1, np.int64)
        for t in range(slots):
            c = t * process_count + process_index
            if c < len(chunks):
                rows[t, : len(chunks[c])] = chunks[c]
        return cls(rows.reshape(-1))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, int, int]:
        return int(self.rows[int(i)]), -1, int(i)


# ----------------------------------------------------------------------------- examples and loader


@dataclasses.dataclass(frozen=True)
class ReadExample:
    """(row, epoch, position) -> {'image' (S, S, 3) uint8, 'label', 'row', 'valid', ['teacher_logits' (k,)]}.

    Runs in grain's worker processes. `train=True`: `train_transform` seeded by (seed, epoch, position),
    and an
    unreadable image is replaced by another row drawn from the same seed (the batch stays whole and the order
    stays a function of the seed; the teacher pass counts and lists the unreadable files). Eval:
    `eval_transform`;
    row -1 (padding) and an unreadable image give a black image with valid=False, the reason in `reason`.
    """

    records: SplitRecords
    image_size: int
    train: bool
    seed: int = 0
    eval_crop: float = EVAL_CROP
    logits: LogitsStore | None = None

    def __call__(self, item) -> dict:
        row, epoch, position = item
        image, label, reason = None, -1, ""
        if row >= 0:
            draft = None if self.train else max(self.image_size, round(self.image_size / self.eval_crop))
            img, label, reason = self.records.read(row, draft)
            if self.train and img is None:
                row, img, label = self._substitute(row, epoch, position, reason)
            if img is not None:
                if self.train:
                    rng = np.random.default_rng([self.seed, epoch, position])
                    image = train_transform(img, self.image_size, rng)
                else:
                    image = eval_transform(img, self.image_size, self.eval_crop)
        out = {
            "image": image
            if image is not None
            else np.zeros((self.image_size, self.image_size, 3), np.uint8),
            "label": np.int32(max(label, 0)),
            "row": np.int64(row),
            "valid": np.bool_(image is not None),
            "reason": np.asarray(reason or ""),
        }
        if self.logits is not None:
            out["teacher_logits"] = self.logits.row(max(row, 0))
        return out

    def _substitute(self, row: int, epoch: int, position: int, reason: str):
        rng = np.random.default_rng([self.seed, epoch, position, 1])
        for _ in range(_SUBSTITUTE_TRIES):
            other = int(rng.integers(len(self.records)))
            img, label, _ = self.records.read(other)
            if img is not None:
                return other, img, label
        raise ValueError(
            f"{self.records.ids[row]} is unreadable ({reason}) and so were {_SUBSTITUTE_TRIES} "
            "others drawn in its place; check the data"
        )


_SUBSTITUTE_TRIES = 16


def _stack(examples: Sequence[dict]) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def loader(order, read: ReadExample, local_batch: int, *, workers: int, prefetch: int = 2):
    """A grain `IterDataset`: order -> `read` (in `workers` processes, one example at a time each; 0 reads in
    this process's threads) -> local batches of `local_batch` -> prefetched. Its iterators have
    `get_state`/`set_state`."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use their defaults
        flags.FLAGS.mark_as_parsed()
    ds = grain.MapDataset.source(order).map(read).batch(local_batch, drop_remainder=True, batch_fn=_stack)
    # Worker processes read one example at a time (one core each): with reader threads in them, CPython 3.11
    # failed now and then in the 20k/80k benchmark runs ("AST constructor recursion depth mismatch").
    threads = 1 if workers > 0 else max(1, min(8, local_batch))
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(1, prefetch * local_batch))
    )
    if workers > 0:
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch)
        )
    return it


def chunks_of(num_rows: int, chunk_rows: int) -> list[np.ndarray]:
    return [np.arange(s, min(s + chunk_rows, num_rows)) for s in range(0, num_rows, chunk_rows)]
