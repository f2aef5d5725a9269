"""One interface over the two kinds of data a job reads (docs/data.md, docs/scale.md).

    DataSource     a source's classes and its train/val/test `Split`s, of one kind:
                     "memory"  decoded uint8 arrays (`load_dataset`: decoded once, cached), or
                     "files"   image folders and TFDS array_record, read one example at a time by grain
    Split          one split: `ids` (N,) str, `labels` (N,) int32, and `images` (memory) or `records` (files)
    memory_source  a `Dataset` as a DataSource;  `files_source` a listed stream (`stream.plan_stream`)
    train_batches  a run's local training batches, one iterator interface (`get_state`/`set_state`) for
                   both: memory gathers each batch with one numpy fancy index, files reads it with grain
    eval_batches   the local batches of a lockstep evaluation pass over a split, for both

Either kind splits its rows the same way (`split.split_indices`, same seed), so a folder gives the same ids
per split in memory and as files wherever no image is unreadable; `splits_rows` lists them for `splits.csv`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from debkd_jax import workdir_lib
from debkd_jax.data import stream
from debkd_jax.data.dataset import Dataset
from debkd_jax.data.transforms import EVAL_CROP

SPLITS = ("train", "val", "test")
KINDS = ("memory", "files")
NORMALIZATION = {"offset": 127.5, "scale": 127.5}
"""Every model's input: `(x - offset) / scale` of the uint8 pixels, i.e. `(x / 255 - 0.5) / 0.5`."""


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split's rows: `ids` (N,) str, `labels` (N,) int32, and `images` (N, S, S, 3) uint8 (memory) or
    `records` (files: `stream.SplitRecords`, read one example at a time)."""

    ids: np.ndarray
    labels: np.ndarray
    images: np.ndarray | None = None
    records: stream.SplitRecords | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, rows: np.ndarray) -> Split:
        """The same split restricted to `rows`, in that order."""
        rows = np.asarray(rows, np.int64)
        return Split(
            ids=self.ids[rows],
            labels=self.labels[rows],
            images=None if self.images is None else self.images[rows],
            records=None if self.records is None else self.records.select(rows),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class DataSource:
    """What a job reads (module docstring). `fingerprint` decides a run's identity; `preprocessing` says how a
    model's input is made from an image (`model.json`, `export`, `predict`); `augment` is the training
    augmentation (memory: pad-4 crop and flip on device; files: random-resized crop and flip in the
    loader)."""

    kind: str
    name: str
    class_names: tuple[str, ...]
    splits: dict[str, Split]
    image_size: int
    fingerprint: str | dict
    skipped: tuple[tuple[str, str], ...] = ()
    augment: bool = False
    eval_crop: float = EVAL_CROP
    workers: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> Split:
        return self.splits[name]

    @property
    def augments_on_device(self) -> bool:
        """Whether the train step augments (memory kind); the files kind augments in its loader."""
        return self.augment and self.kind == "memory"

    @property
    def preprocessing(self) -> dict:
        """How an image file becomes a model's input: decoded, then "squash" (the whole image resized to S x
        S, as the memory kind decodes) or "resize_crop" (the shorter side to S / crop, the central S x S, as
        the files kind evaluates); then `NORMALIZATION`, inside the model's function."""
        if self.kind == "memory":
            resize = {"resize": "squash"}
        else:
            resize = {"resize": "resize_crop", "crop": float(self.eval_crop)}
        return {**resize, "image_size": int(self.image_size), "normalize": dict(NORMALIZATION)}

    def with_train(self, rows: np.ndarray) -> DataSource:
        """The same source with its training split restricted to `rows` (a fold teacher's data)."""
        return dataclasses.replace(self, splits={**self.splits, "train": self.splits["train"].select(rows)})


def memory_source(dataset: Dataset, *, augment: bool = False) -> DataSource:
    """A decoded `Dataset` as the memory kind; its fingerprint is that of its training images and labels."""
    splits = {}
    for name in SPLITS:
        ids = getattr(dataset, f"{name}_ids")
        labels = getattr(dataset, f"{name}_labels")
        if ids is None:
            ids = np.asarray([f"{name}/{i}" for i in range(len(labels))])
        splits[name] = Split(
            np.asarray(ids).astype(str),
            np.asarray(labels, np.int32),
            images=getattr(dataset, f"{name}_images"),
        )
    return DataSource(
        kind="memory",
        name=dataset.source,
        class_names=tuple(dataset.class_names),
        splits=splits,
        image_size=int(dataset.train_images.shape[1]),
        fingerprint=workdir_lib.fingerprint(dataset.train_images, dataset.train_labels),
        skipped=tuple(dataset.skipped),
        augment=augment,
    )


def files_source(
    planned: stream.StreamSource, *, name: str, image_size: int, augment: bool, eval_crop: float, workers: int
) -> DataSource:
    """A planned stream (`stream.plan_stream`) as the files kind; `name` as the user gave the source."""
    splits = {
        name: Split(
            np.asarray(records.ids).astype(str), np.asarray(records.labels, np.int32), records=records
        )
        for name, records in planned.splits.items()
    }
    return DataSource(
        kind="files",
        name=name,
        class_names=tuple(planned.class_names),
        splits=splits,
        image_size=image_size,
        fingerprint=planned.fingerprint,
        augment=augment,
        eval_crop=eval_crop,
        workers=workers,
    )


def splits_rows(source: DataSource) -> list[tuple[str, str, int]]:
    """(id, split, label) of every row, train then val then test: what `splits.csv` records."""
    return [
        (str(i), name, int(y))
        for name in SPLITS
        for i, y in zip(source.splits[name].ids, source.splits[name].labels, strict=True)
    ]


# ----------------------------------------------------------------------------- batches


class ArrayBatches:
    """Memory kind: a run's local batches `{'image', 'label'[, 'teacher_logits']}`, each one numpy gather of
    `order.local_rows(epoch, step)`. State: the number of batches taken (`{"step": s}`)."""

    def __init__(self, split: Split, order: stream.TrainOrder, logits=None):
        self.split, self.order, self.logits, self.step = split, order, logits, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch, step = divmod(self.step, self.order.steps_per_epoch)
        if epoch >= self.order.num_epochs:
            raise StopIteration
        rows = self.order.local_rows(epoch, step)
        batch = {"image": self.split.images[rows], "label": self.split.labels[rows]}
        if self.logits is not None:
            batch["teacher_logits"] = self.logits.rows(rows)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def train_batches(source: DataSource, order: stream.TrainOrder, *, seed: int, logits=None, state=None):
    """The run's local training batches, `{'image' (b, S, S, 3) uint8, 'label' (b,)[, 'teacher_logits' (b,
    k)]}` (more keys from files), at `state` (a checkpoint's `get_state()`) when given; `close()` where it
    exists ends grain's worker processes."""
    split = source.splits["train"]
    if source.kind == "memory":
        it = ArrayBatches(split, order, logits)
    else:
        read = stream.ReadExample(
            split.records,
            source.image_size,
            train=source.augment,
            seed=seed,
            eval_crop=source.eval_crop,
            logits=logits,
        )
        it = iter(stream.loader(order, read, order.local_batch, workers=source.workers))
    if state is not None:
        it.set_state(state)
    return it


class ArrayEvalBatches:
    """Memory kind: the local batches of `order`'s rows (-1: padding, a black image with valid=False)."""

    def __init__(self, split: Split, order: stream.EvalOrder, local_batch: int):
        self.split, self.rows, self.local_batch, self.start = split, order.rows, local_batch, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.start >= len(self.rows):
            raise StopIteration
        rows = self.rows[self.start : self.start + self.local_batch]
        self.start += self.local_batch
        valid = rows >= 0
        images = self.split.images[np.maximum(rows, 0)]
        if not valid.all():
            images = np.where(valid[:, None, None, None], images, 0).astype(np.uint8)
        return {
            "image": images,
            "label": self.split.labels[np.maximum(rows, 0)],
            "row": rows,
            "valid": valid,
            "reason": np.full(len(rows), ""),
        }


def eval_batches(
    source: DataSource, split: Split, order: stream.EvalOrder, local_batch: int, *, workers: int
):
    """The local batches `{'image', 'label', 'row', 'valid', 'reason'}` of an evaluation pass over `split`'s
    rows in `order` (this process's, -1 padded), in the source's evaluation transform."""
    if source.kind == "memory":
        return ArrayEvalBatches(split, order, local_batch)
    read = stream.ReadExample(split.records, source.image_size, train=False, eval_crop=source.eval_crop)
    return iter(stream.loader(order, read, local_batch, workers=workers))
