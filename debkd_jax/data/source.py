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
import functools

import jax
import numpy as np

from debkd_jax import workdir_lib
from debkd_jax.data import stream
from debkd_jax.data import views as views_lib
from debkd_jax.data.batching import PAD
from debkd_jax.data.dataset import Dataset
from debkd_jax.data.transforms import EVAL_CROP

SPLITS = ("train", "val", "test")
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
    loader), drawn per view: image i trains on view `epoch mod views`, a pure function of (`view_seed`, i,
    view) (`data.views`), mixed with a partner's same view when `mixup` > 0."""

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
    views: int = 1
    mixup: float = 0.0
    view_seed: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

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


def memory_source(
    dataset: Dataset, *, augment: bool = False, views: int = 1, mixup: float = 0.0, view_seed: int = 0
) -> DataSource:
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
        views=views,
        mixup=mixup,
        view_seed=view_seed,
    )


def files_source(
    planned: stream.StreamSource,
    *,
    name: str,
    image_size: int,
    augment: bool,
    eval_crop: float,
    workers: int,
    views: int = 1,
    mixup: float = 0.0,
    view_seed: int = 0,
) -> DataSource:
    """A planned stream (`stream.plan_stream`) as the files kind; `name` as the user gave the source."""
    splits = {
        split: Split(
            np.asarray(records.ids).astype(str), np.asarray(records.labels, np.int32), records=records
        )
        for split, records in planned.splits.items()
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
        views=views,
        mixup=mixup,
        view_seed=view_seed,
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
    `order.local_rows(epoch, step)`; with augmentation also each view's crop (and mixup) parameters, which the
    step applies on the device (`views.apply_views`). State: the number of batches taken (`{"step": s}`)."""

    def __init__(self, source: DataSource, order: stream.TrainOrder, logits=None):
        self.source, self.order, self.logits, self.step = source, order, logits, 0
        self.split = source.splits["train"]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch, step = divmod(self.step, self.order.steps_per_epoch)
        if epoch >= self.order.num_epochs:
            raise StopIteration
        rows = self.order.local_rows(epoch, step)
        view = views_lib.epoch_views(epoch, self.source.views)
        views = np.full(len(rows), view, np.int32)
        if self.source.augments_on_device:
            batch = views_lib.view_batch(
                lambda r: self.split.images[r],
                rows,
                views,
                seed=self.source.view_seed,
                pad=PAD,
                mixup=self.source.mixup,
                num_rows=len(self.split),
            )
        else:
            batch = {"image": self.split.images[rows]}
        batch["label"] = self.split.labels[rows]
        if self.logits is not None:
            batch["teacher_logits"] = self.logits.view_rows(rows, views)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def train_batches(source: DataSource, order: stream.TrainOrder, *, logits=None, state=None):
    """The run's local training batches, `{'image' (b, S, S, 3) uint8, 'label' (b,)[, 'teacher_logits' (b,
    k)]}` (with the memory kind's view parameters, or more keys from files), at `state` (a checkpoint's
    `get_state()`) when given; `close()` where it exists ends grain's worker processes. `order` (seeded by the
    student's seed) decides the rows; the views are the data's (`DataSource.view_seed`)."""
    split = source.splits["train"]
    if source.kind == "memory":
        it = ArrayBatches(source, order, logits)
    else:
        read = stream.ReadExample(
            split.records,
            source.image_size,
            train=source.augment,
            seed=source.view_seed,
            eval_crop=source.eval_crop,
            logits=logits,
            views=source.views,
            mixup=source.mixup,
        )
        it = iter(stream.loader(order, read, order.local_batch, workers=source.workers))
    if state is not None:
        it.set_state(state)
    return it


STEP_KEYS = (
    "image",
    "label",
    "teacher_logits",
    "offsets",
    "flips",
    "partner_image",
    "partner_offsets",
    "partner_flips",
    "mix",
)
"""What of a local training batch goes to the train step (the rest is the reader's bookkeeping)."""


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
        images, labels = self.images_and_labels(np.maximum(rows, 0))
        images[~valid] = 0
        return {
            "image": images,
            "label": labels,
            "row": rows,
            "valid": valid,
            "reason": np.full(len(rows), ""),
        }

    def images_and_labels(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.split.images[rows], self.split.labels[rows]


def eval_batches(
    source: DataSource, split: Split, order: stream.EvalOrder, local_batch: int, *, workers: int
):
    """The local batches `{'image', 'label', 'row', 'valid', 'reason'}` of an evaluation pass over `split`'s
    rows in `order` (this process's, -1 padded), in the source's evaluation transform."""
    if source.kind == "memory":
        return ArrayEvalBatches(split, order, local_batch)
    read = stream.ReadExample(split.records, source.image_size, train=False, eval_crop=source.eval_crop)
    return iter(stream.loader(order, read, local_batch, workers=workers))


class ArrayViewBatches(ArrayEvalBatches):
    """Memory kind: the local batches of a pass over every view (`order`'s rows r: view r // N of image
    r mod N; -1 pads), each view made exactly as the train step makes it (`views.apply_views`, jitted)."""

    def __init__(self, source: DataSource, order: stream.EvalOrder, local_batch: int):
        super().__init__(source.splits["train"], order, local_batch)
        self.source = source

    def images_and_labels(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.split)
        batch = views_lib.view_batch(
            lambda r: self.split.images[r],
            rows % n,
            rows // n,
            seed=self.source.view_seed,
            pad=PAD,
            mixup=self.source.mixup,
            num_rows=n,
        )
        return np.array(_apply_views(batch)), self.split.labels[rows % n]


_apply_views = jax.jit(functools.partial(views_lib.apply_views, pad=PAD))


def view_batches(source: DataSource, order: stream.EvalOrder, local_batch: int, *, workers: int):
    """The local batches of a pass over every training view (`order` over the V x N view rows, view-major),
    each view's pixels exactly those the student trains on."""
    if source.kind == "memory":
        return ArrayViewBatches(source, order, local_batch)
    split = source.splits["train"]
    read = stream.ReadExample(
        split.records,
        source.image_size,
        train=True,
        seed=source.view_seed,
        eval_crop=source.eval_crop,
        views=source.views,
        mixup=source.mixup,
    )
    return iter(stream.loader(stream.ViewOrder(order.rows, len(split)), read, local_batch, workers=workers))
