"""`load_dataset`: a source decoded once (or read from the cache), split train/val/test into a `Dataset`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from absl import logging

from debkd_jax.data import cache, sources
from debkd_jax.data import split as split_lib


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Decoded, split data. Images uint8 (N, S, S, 3), labels int32 (N,) in [0, num_classes).

    `<split>_ids` (N,) str: each image's stable id -- its path relative to the data folder (`folder:`),
    '<tfds split>/<index>' (`tfds:`), 'digits/<index>' (digits); None for a Dataset built by hand.
    `source`: as the user gave it (a relative folder stays relative: reports name no machine's paths).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str
    skipped: tuple[tuple[str, str], ...] = ()
    train_ids: np.ndarray | None = None
    val_ids: np.ndarray | None = None
    test_ids: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_dataset(
    source: str,
    *,
    cache_dir: str | None,
    seed: int = 0,
    split: Sequence[float] = (0.7, 0.1, 0.2),
    image_size: int = 32,
    max_per_class: int | None = None,
    digits_classes: int = 2,
    tfds_data_dir: str | None = None,
    use_dataset_test_split: bool = False,
    progress: bool = True,
) -> Dataset:
    """Decodes (or loads from cache) `source`; splits it train/val/test, stratified and seeded.

    Args:
      source: 'digits', 'folder:PATH' or 'tfds:NAME'.
      cache_dir: folder for the decoded-array cache; None decodes every time.
      seed: the split's seed; the same seed gives the same split.
      split: (train, val, test) fractions, each > 0, summing to 1.
      image_size: S, the side of the square RGB images.
      max_per_class: keep at most this many examples per class, a fixed deterministic subset
        (independent of `seed`); for tests and quick runs.
      digits_classes: 2 (digit < 5 vs digit >= 5) or 10, for 'digits'.
      tfds_data_dir: TFDS data_dir for 'tfds:' sources (None: TFDS's default).
      use_dataset_test_split: 'tfds:' only: the dataset's own 'test' split is the test set; the
        other splits are split train/val in the ratio split[0]:split[1].
      progress: show a tqdm bar while decoding.

    Raises:
      ValueError: an unknown source form, a bad argument, a missing/empty folder, a single class,
        a class too small to split, or a TFDS dataset that is unknown or not prepared.
    """
    fractions = split_lib.check_split(split)
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if max_per_class is not None and max_per_class < 3:
        raise ValueError(
            f"max_per_class must be None or >= 3 (one example per split), got {max_per_class}"
        )
    kind, arg = sources.parse_source(source)
    if use_dataset_test_split and kind != "tfds":
        raise ValueError(
            "use_dataset_test_split=True needs a 'tfds:NAME' source with a 'test' split, "
            f"got {source!r}"
        )
    plan = sources.plan_source(
        kind, arg, image_size=image_size, max_per_class=max_per_class,
        digits_classes=digits_classes, tfds_data_dir=tfds_data_dir,
        use_dataset_test_split=use_dataset_test_split, progress=progress,
    )
    preprocessing = {"format": cache.FORMAT_VERSION, "image_size": image_size,
                     "max_per_class": max_per_class}
    decoded = cache.cached(cache_dir, cache.cache_key({**plan.key, **preprocessing}), plan.decode)
    skipped = tuple((os.path.join(plan.root, p) if plan.root else p, r) for p, r in decoded.skipped)
    if skipped:
        _warn_skipped(plan.name, skipped, len(decoded.labels))
    test_mask = None
    if use_dataset_test_split:
        test_mask = decoded.origin == decoded.origins.index("test")
    split_lib.check_class_counts(decoded.labels, decoded.class_names, plan.name, len(skipped), test_mask)
    train, val, test = split_lib.split_indices(decoded.labels, fractions, seed, test_mask)
    return Dataset(
        train_images=decoded.images[train], train_labels=decoded.labels[train],
        val_images=decoded.images[val], val_labels=decoded.labels[val],
        test_images=decoded.images[test], test_labels=decoded.labels[test],
        class_names=decoded.class_names, source=source, skipped=skipped,
        train_ids=decoded.ids[train], val_ids=decoded.ids[val], test_ids=decoded.ids[test],
    )


def _warn_skipped(name: str, skipped: Sequence[tuple[str, str]], kept: int) -> None:
    path, reason = skipped[0]
    logging.warning(
        "Skipped %d unreadable file(s) in %s (%d kept); e.g. %s: %s. The list is in Dataset.skipped.",
        len(skipped), name, kept, path, reason,
    )
