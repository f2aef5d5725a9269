"""The files kind read by grain: the run's order over the rows, one example read and transformed, the loader
(docs/scale.md). The listing and split of folders and TFDS datasets are `listing.py`'s (re-exported here).

    TrainOrder       element i of the whole run -> (row, epoch, global position): the memory kind's order too
    EvalOrder        this process's rows of a split, in whole chunks, padded with -1 for a lockstep pass
    ReadExample      (row, epoch, position) -> one example, decoded and transformed (in grain's workers)
    train_transform  (transforms.py) random-resized crop to S (scale 0.08-1, ratio 3/4-4/3) + flip
    eval_transform   (transforms.py) shorter side to S / eval_crop (S * 256 / 224 by default), center crop
    loader           grain: order -> read/decode/augment (worker processes) -> local batches -> prefetch

The order of the training examples is `batching.batch_indices(n, B, seed, epoch)`, and process p of P takes
columns [p B/P, (p+1) B/P) of every global batch: each host reads only the images it trains on, the processes'
parts of an epoch are disjoint and together the whole epoch, and the global batch does not depend on the
number of processes. The augmentation of an example is seeded by (seed, epoch, global position) alone, so it
does not depend on the number of processes or workers either, and a restart at a step repeats it exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from debkd_jax.data import views as view_lib
from debkd_jax.data.batching import batch_indices
from debkd_jax.data.listing import (  # noqa: F401 - the files kind's listing, part of this module's interface
    SplitRecords,
    StreamSource,
    choose_pipeline,
    plan_stream,
)
from debkd_jax.data.logits_store import STORE_DTYPES, LogitsStore, decode_logits, encode_logits  # noqa: F401
from debkd_jax.data.transforms import (  # noqa: F401
    EVAL_CROP,
    eval_draft,
    eval_transform,
    rrc_box,
    train_transform,
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

    def local_rows(self, epoch: int, step: int) -> np.ndarray:
        """This process's rows of global batch `step` of `epoch`: (B / P,) int32."""
        start = step * self.batch_size + self.process_index * self.local_batch
        return self._order(epoch)[start : start + self.local_batch]

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
class ViewOrder:
    """The rows of every view, view-major: element r -> (image r mod N, view r // N, r); -1 rows pad a
    lockstep pass (`EvalOrder` over these rows) as black, invalid examples."""

    rows: np.ndarray
    num_rows: int

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, int, int]:
        r = int(self.rows[int(i)])
        return (r % self.num_rows, r // self.num_rows, int(i)) if r >= 0 else (-1, 0, int(i))


@dataclasses.dataclass(frozen=True)
class ReadExample:
    """(row, epoch, position) -> {'image' (S, S, 3) uint8, 'label', 'row', 'view', 'valid', 'reason'[,
    'teacher_logits' (k,)]}. Runs in grain's worker processes.

    `train=True`: view v = epoch mod `views` of image `row` (`data.views`): its random-resized crop and flip
    drawn from `views.view_keys(seed, row, v)` (`seed` is the data's, not a student's), with `mixup` > 0 mixed
    with its partner's same view; an unreadable image is replaced by another row drawn from that key (the
    batch stays whole; the teacher pass lists the unreadable files). `train=False`: `eval_transform`. Row -1
    (padding) and an unreadable image in evaluation give a black image with valid=False, the reason in
    `reason`. `logits`: the teacher's logits of the image, or of this view of it (`logits_store.ViewLogits`).
    """

    records: SplitRecords
    image_size: int
    train: bool
    seed: int = 0
    eval_crop: float = EVAL_CROP
    logits: object = None
    views: int = 1
    mixup: float = 0.0

    def __call__(self, item) -> dict:
        row, epoch, _ = item
        view = view_lib.epoch_views(max(epoch, 0), self.views) if self.train else 0
        image, label, reason = None, -1, ""
        if row >= 0:
            key = view_lib.view_keys(self.seed, [row], [view])[0]
            draft = None if self.train else eval_draft(self.image_size, self.eval_crop)
            img, label, reason = self.records.read(row, draft)
            if self.train and img is None:
                row, img, label = self._substitute(row, key, reason)
            if img is not None and self.train:
                image = train_transform(img, self.image_size, view_lib.view_generator(key))
                if self.mixup:
                    partners, lam = view_lib.mixup_params(np.asarray([key]), len(self.records), self.mixup)
                    image = self._mixed(image, int(partners[0]), view, float(lam[0]))
            elif img is not None:
                image = eval_transform(img, self.image_size, self.eval_crop)
        out = {
            "image": image
            if image is not None
            else np.zeros((self.image_size, self.image_size, 3), np.uint8),
            "label": np.int32(max(label, 0)),
            "row": np.int64(row),
            "view": np.int32(view),
            "valid": np.bool_(image is not None),
            "reason": np.asarray(reason or ""),
        }
        if self.logits is not None:
            out["teacher_logits"] = self.logits.view_rows(np.asarray([max(row, 0)]), np.asarray([view]))[0]
        return out

    def _mixed(self, image: np.ndarray, partner: int, view: int, lam: float) -> np.ndarray:
        key = view_lib.view_keys(self.seed, [partner], [view])[0]
        img, _, reason = self.records.read(partner)
        if img is None:
            partner, img, _ = self._substitute(partner, key, reason)
        other = train_transform(img, self.image_size, view_lib.view_generator(key))
        return view_lib.mix(image[None], other[None], np.asarray([lam], np.float32), xp=np)[0]

    def _substitute(self, row: int, key, reason: str):
        rng = np.random.default_rng([int(key), 1])
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
