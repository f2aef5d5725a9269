"""The files kind's listing: image folders and TFDS array_record datasets listed (no image decoded) and split
train/val/test exactly as `load_dataset` splits them; one split's records read one example at a time; and
which kind `data.pipeline` picks (docs/scale.md).

    plan_stream      a source listed and split: train/val/test `SplitRecords` in a `StreamSource`
    SplitRecords     random access to one split's examples: read + decode one image (in grain's workers)
    choose_pipeline  data.pipeline = "memory" | "stream" | "auto", and why
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import threading

import numpy as np
from PIL import Image

from debkd_jax import workdir_lib
from debkd_jax.data import sources
from debkd_jax.data import split as split_lib

PIPELINES = ("memory", "stream", "auto")
AUTO_MEMORY_SHARE = 0.25
"""`data.pipeline="auto"` streams when the decoded images would take more than this share of the memory."""


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

    Folder sources: `paths` (absolute) of the split's rows. TFDS: the dataset
    `tfds_name`: row i is record `indices[i]` of split `tfds_splits[tfds_origin[i]]`. `labels` (N,) int32
    either way. `ids[i]` is row i's stable id (`sources.folder_id`/`tfds_id`).
    """

    ids: np.ndarray
    paths: np.ndarray | None = None
    labels: np.ndarray | None = None
    tfds_name: str = ""
    tfds_splits: tuple[str, ...] = ()
    tfds_origin: np.ndarray | None = None
    tfds_data_dir: str | None = None
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, row: int, draft_size: int | None = None) -> tuple[Image.Image | None, int, str | None]:
        """(RGB image, label, None), or (None, label or -1, reason) for an image that cannot be read."""
        try:
            if self.paths is not None:
                return sources.open_rgb(str(self.paths[row]), draft_size), int(self.labels[row]), None
            split = self.tfds_splits[int(self.tfds_origin[row])]
            example = _read_tfds(self.tfds_name, split, self.tfds_data_dir)[int(self.indices[row])]
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
            tfds_origin=pick(self.tfds_origin),
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
    use_dataset_test_split: bool = False,
    cache_dir: str | None = None,
) -> StreamSource:
    """A source listed (no image decoded) and split train/val/test exactly as `load_dataset` splits it: the
    same per-class subset, the same stratified, seeded split, hence the same ids per split wherever no image
    is unreadable (`load_dataset` drops unreadable images before splitting; here they are found when read).

    `folder:PATH`: its image files. `tfds:NAME`: every split it records, pooled, their labels read without
    decoding an image (cached in `cache_dir`); with `use_dataset_test_split` the dataset's 'test' split is the
    test set and the rest splits train/val. ValueError for a missing/empty folder, `digits` (no files), or a
    TFDS dataset that is unknown or not prepared."""
    kind, arg = sources.parse_source(source)
    fractions = split_lib.check_split(split)
    if use_dataset_test_split and kind != "tfds":
        raise ValueError(
            f"use_dataset_test_split=True needs a 'tfds:NAME' source with a 'test' split, got {source!r}"
        )
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
        paths = np.asarray([os.path.join(root, listing.paths[i]) for i in keep])
        ids = np.asarray([sources.folder_id(listing.paths[i]) for i in keep])
        records = SplitRecords(ids=ids, paths=paths, labels=labels)
        class_names, name, test_mask = listing.class_names, f"folder:{root}", None
        fingerprint = {
            "source": "folder",
            "files": len(listing.paths),
            "files_sha": _sha(listing.fingerprint),
        }
        skipped = len(bad)
    elif kind == "tfds":
        records, class_names, test_mask, fingerprint = _tfds_records(
            arg, tfds_data_dir, max_per_class, use_dataset_test_split, cache_dir
        )
        name, labels, skipped = f"tfds:{arg}", records.labels, 0
    else:
        raise ValueError(
            f"data.pipeline='stream' reads 'folder:PATH' or 'tfds:NAME', not {source!r}; "
            "use data.pipeline='memory' for it"
        )
    split_lib.check_class_counts(labels, class_names, name, skipped, test_mask)
    parts = split_lib.split_indices(labels, fractions, seed, test_mask)
    splits = {part: records.select(rows) for part, rows in zip(("train", "val", "test"), parts, strict=True)}
    fingerprint = {
        **fingerprint,
        "seed": seed,
        "split": list(split),
        "max_per_class": max_per_class,
        "use_dataset_test_split": bool(use_dataset_test_split),
    }
    return StreamSource(name, tuple(class_names), splits, fingerprint)


def _tfds_records(
    name: str, data_dir: str | None, max_per_class: int | None, use_test_split: bool, cache_dir: str | None
):
    """(records of every recorded split, pooled; class names; the mask of the 'test' split's records (with
    `use_test_split`); the fingerprint). The per-class subset is `load_dataset`'s: each split in a fixed
    seeded order until every class is full."""
    builder, origins = sources.tfds_builder(name, data_dir, use_test_split)
    class_names = tuple(builder.info.features["label"].names)
    key = {"source": "tfds", **sources.tfds_fingerprint(builder, name, data_dir, origins)}
    parts = []
    for split_id, split in enumerate(origins):
        labels = _tfds_labels(name, split, data_dir, cache_dir, key)
        n = len(labels)
        if max_per_class is None:
            rows = np.arange(n)
        else:
            order = np.random.default_rng([split_lib.SUBSET_SEED, split_id]).permutation(n)
            counts = np.zeros(len(class_names), np.int64)
            keep = []
            for i in order:
                if counts[labels[i]] < max_per_class:
                    counts[labels[i]] += 1
                    keep.append(i)
                    if counts.min() >= max_per_class:
                        break
            rows = np.asarray(keep, np.int64)
        parts.append((split, split_id, rows, labels[rows]))
    records = SplitRecords(
        ids=np.asarray([sources.tfds_id(split, int(i)) for split, _, rows, _ in parts for i in rows]),
        labels=np.concatenate([y for *_, y in parts]).astype(np.int32),
        tfds_name=name,
        tfds_splits=tuple(origins),
        tfds_origin=np.concatenate([np.full(len(rows), k, np.int32) for _, k, rows, _ in parts]),
        tfds_data_dir=data_dir,
        indices=np.concatenate([rows for _, _, rows, _ in parts]).astype(np.int64),
    )
    test_mask = None
    if use_test_split:
        test_mask = records.tfds_origin == origins.index("test")
    return records, class_names, test_mask, key


def _tfds_labels(name: str, split: str, data_dir: str | None, cache_dir: str | None, key: dict) -> np.ndarray:
    """Every record's label of one TFDS split, read without decoding its image; cached as an .npy."""
    path = None
    if cache_dir:
        digest = hashlib.sha256(json.dumps({**key, "labels_of": split}, sort_keys=True).encode()).hexdigest()
        path = os.path.join(os.path.expanduser(cache_dir), f"debkd-tfds-labels-{digest[:20]}.npy")
        if os.path.exists(path):
            try:
                return np.load(path)
            except (OSError, ValueError):
                pass
    import tensorflow_datasets as tfds

    with _OPEN_LOCK:
        records = tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
    labels = np.fromiter((int(records[i]["label"]) for i in range(len(records))), np.int32, len(records))
    if path:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            buffer = io.BytesIO()
            np.save(buffer, labels)
            workdir_lib.atomic_write_bytes(path, buffer.getvalue())
        except Exception:  # noqa: BLE001 - an unwritable cache only means reading the labels again
            pass
    return labels


def _sha(rows) -> str:
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
