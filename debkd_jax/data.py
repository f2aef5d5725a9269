"""Datasets as in-memory uint8 arrays, the stratified 70/10/20 split, and jitted batch transforms.

`load_dataset(source, ...)` decodes a source once into (N, S, S, 3) uint8 images and (N,) int32
labels, caches them as one `.npz` in `cache_dir`, and splits them by seed. Sources:

    digits          scikit-learn's bundled 8x8 handwritten digits, upscaled (no download)
    folder:PATH     one sub-folder per class (cat/, dog/) or Kaggle's flat CLASS.N.jpg layout
    tfds:NAME       a TFDS dataset prepared as array_record, read through `tfds.data_source`

`normalize` and `augment` are jittable and run on device; `batch_indices` gives each epoch's
permutation from (seed, epoch) alone; `make_global_batch` turns this process's rows into a batch
sharded over a mesh. See docs/data.md.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image, ImageOps
from tqdm import tqdm

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)
SOURCE_FORMS = "'digits', 'folder:PATH' or 'tfds:NAME'"
DIGITS_CLASS_NAMES = {2: ("0-4", "5-9"), 10: tuple(str(d) for d in range(10))}

_FORMAT_VERSION = 1
_SUBSET_SEED = 0
_PAD = 4
_CHUNK = 256


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Decoded, split data. Images uint8 (N, S, S, 3), labels int32 (N,) in [0, num_classes)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass(frozen=True, eq=False)
class _Decoded:
    """A source's examples before the split: what the cache holds.

    `origin[i]` indexes `origins`, the source split example i came from (tfds; ('all',) otherwise).
    `skipped` paths are relative to the folder for folder sources.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    origin: np.ndarray
    origins: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()


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
    fractions = _check_split(split)
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if max_per_class is not None and max_per_class < 3:
        raise ValueError(
            f"max_per_class must be None or >= 3 (one example per split), got {max_per_class}"
        )
    kind, arg = _parse_source(source)
    if use_dataset_test_split and kind != "tfds":
        raise ValueError(
            "use_dataset_test_split=True needs a 'tfds:NAME' source with a 'test' split, "
            f"got {source!r}"
        )
    name, root, key, decode = _plan(
        kind, arg, image_size=image_size, max_per_class=max_per_class,
        digits_classes=digits_classes, tfds_data_dir=tfds_data_dir,
        use_dataset_test_split=use_dataset_test_split, progress=progress,
    )
    preprocessing = {"format": _FORMAT_VERSION, "image_size": image_size,
                     "max_per_class": max_per_class}
    decoded = _cached(cache_dir, _cache_key({**key, **preprocessing}), decode)
    skipped = tuple((os.path.join(root, p) if root else p, r) for p, r in decoded.skipped)
    if skipped:
        _warn_skipped(name, skipped, len(decoded.labels))
    test_mask = None
    if use_dataset_test_split:
        test_mask = decoded.origin == decoded.origins.index("test")
    _check_class_counts(decoded, name, len(skipped), test_mask)
    train, val, test = _split_indices(decoded.labels, fractions, seed, test_mask)
    return Dataset(
        train_images=decoded.images[train], train_labels=decoded.labels[train],
        val_images=decoded.images[val], val_labels=decoded.labels[val],
        test_images=decoded.images[test], test_labels=decoded.labels[test],
        class_names=decoded.class_names, source=name, skipped=skipped,
    )


def normalize(images, dtype=jnp.float32) -> jax.Array:
    """uint8 (..., H, W, 3) -> `(x / 255 - 0.5) / 0.5` in [-1, 1], float32 math, cast to `dtype`.

    Computed as `(x - 127.5) / 127.5`, which keeps 0 and 255 at exactly -1 and 1 under jit.
    """
    x = jnp.asarray(images).astype(jnp.float32)
    return ((x - 127.5) / 127.5).astype(dtype)


def augment(rng, images, *, pad: int = _PAD) -> jax.Array:
    """Per-image random crop after `pad` pixels of zero padding, then a random left-right flip.

    (B, H, W, C) -> (B, H, W, C), same dtype; flip probability 0.5. The padding is black for uint8
    input: apply before `normalize`.
    """
    offsets, flips = _augment_params(rng, images.shape[0], pad)
    return _crop_flip(images, offsets, flips, pad)


def batch_indices(
    num_examples: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> np.ndarray:
    """The epoch's batches of example indices, int32 (num_batches, batch_size).

    A function of (seed, epoch) alone (`np.random.default_rng([seed, epoch])`), so after a restart
    step s is `batch_indices(..., epoch=s // num_batches)[s % num_batches]`. With
    `drop_remainder=False` the last batch is padded with -1: mask with `idx >= 0`.
    """
    if num_examples < 0 or batch_size < 1:
        raise ValueError(
            f"need num_examples >= 0 and batch_size >= 1, got {num_examples}, {batch_size}"
        )
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    else:
        order = np.arange(num_examples)
    if drop_remainder:
        num_batches = num_examples // batch_size
        return order[: num_batches * batch_size].reshape(num_batches, batch_size).astype(np.int32)
    num_batches = -(-num_examples // batch_size)
    padded = np.full(num_batches * batch_size, -1, np.int32)
    padded[:num_examples] = order
    return padded.reshape(num_batches, batch_size)


def make_global_batch(
    arrays: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding
) -> dict[str, jax.Array]:
    """This process's rows (B_local, ...) -> global arrays (B_local * processes, ...) on `sharding`.

    With one process the local rows are the whole batch; B must divide over the batch mesh axis.
    """
    make = jax.make_array_from_process_local_data
    return {k: make(sharding, np.asarray(v)) for k, v in arrays.items()}


def write_skipped_report(dataset: Dataset, path) -> None:
    """Writes `dataset.skipped` as CSV with header `path,reason`, one unreadable file a row."""
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "reason"])
        writer.writerows(dataset.skipped)


def _parse_source(source: str) -> tuple[str, str]:
    kind, sep, arg = str(source).partition(":")
    if source == "digits":
        return "digits", ""
    if sep and kind in ("folder", "tfds") and arg:
        return kind, arg
    raise ValueError(f"unknown data source {source!r}; valid forms: {SOURCE_FORMS}")


def _plan(kind: str, arg: str, *, image_size, max_per_class, digits_classes, tfds_data_dir,
          use_dataset_test_split, progress) -> tuple[str, str | None, dict, Callable[[], _Decoded]]:
    """(source name, folder root or None, the content part of the cache key, the decoder)."""
    if kind == "digits":
        if digits_classes not in DIGITS_CLASS_NAMES:
            raise ValueError(f"digits_classes must be 2 or 10, got {digits_classes}")
        import sklearn

        key = {"source": "digits", "sklearn": sklearn.__version__, "classes": digits_classes}
        return "digits", None, key, functools.partial(
            _decode_digits, digits_classes, image_size, max_per_class
        )
    if kind == "folder":
        root = os.path.abspath(os.path.expanduser(arg))
        listing = _folder_listing(root)
        key = {"source": "folder", "files": listing.fingerprint}
        return f"folder:{root}", root, key, functools.partial(
            _decode_folder, root, listing, image_size, max_per_class, progress
        )
    builder, origins = _tfds_builder(arg, tfds_data_dir, use_dataset_test_split)
    key = {"source": "tfds", **_tfds_fingerprint(builder, arg, tfds_data_dir, origins)}
    return f"tfds:{arg}", None, key, functools.partial(
        _decode_tfds, builder, arg, tfds_data_dir, origins, image_size, max_per_class, progress
    )


def _check_split(split: Sequence[float]) -> tuple[float, float, float]:
    fractions = tuple(float(f) for f in split)
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split must be 3 fractions > 0 summing to 1 (train, val, test): {split}")
    return fractions


def _decode_file(path: str, image_size: int) -> tuple[np.ndarray | None, str | None]:
    """An image file -> ((S, S, 3) uint8, None), or (None, reason) when it cannot be read."""
    try:
        with Image.open(path) as img:
            img.draft(None, (image_size, image_size))
            img.load()
            return _resize(_to_rgb(_exif_transposed(img)), image_size), None
    except Image.DecompressionBombError as e:
        return None, f"decompression bomb refused (raise PIL.Image.MAX_IMAGE_PIXELS to allow): {e}"
    except Exception as e:  # noqa: BLE001 - any decoder failure skips the file, reason kept.
        return None, f"{type(e).__name__}: {e}"


def _exif_transposed(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - broken EXIF: keep the pixels as stored.
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: 16-bit scaled by 1/257, transparency composited on white."""
    if img.mode.startswith("I"):
        x = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _resize(img: Image.Image, image_size: int) -> np.ndarray:
    """Bilinear resize of the whole image (aspect ratio not kept) -> (S, S, 3) uint8."""
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _array_to_image(x: np.ndarray) -> Image.Image:
    """A decoded (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array -> a Pillow image."""
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.dtype == np.uint16:
        return Image.fromarray(x)
    return Image.fromarray(x.astype(np.uint8))


@dataclasses.dataclass(frozen=True)
class _Listing:
    """A folder's image files: sorted relative paths, labels, and (path, size, mtime_ns) rows."""

    paths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    unstattable: tuple[tuple[str, str], ...]
    fingerprint: tuple[tuple[str, int, int], ...]


def _walk_images(root: str) -> list[str]:
    """Sorted relative paths of non-hidden image files; symlinks followed, each real folder once."""
    seen: set[str] = set()
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.normpath(os.path.join(rel_dir, f)))
    return sorted(found)


def _class_of(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """(kept paths, their class names).

    The class is the top folder when there are class folders (loose files beside them are ignored),
    else the file name before its first '.' (Kaggle's cat.0.jpg).
    """
    nested = [p for p in paths if os.sep in p]
    if nested:
        return nested, [p.split(os.sep, 1)[0] for p in nested]
    return list(paths), [p.split(".", 1)[0] for p in paths]


def _folder_listing(root: str) -> _Listing:
    if not os.path.exists(root):
        raise ValueError(f"data folder {root} does not exist; 'folder:PATH' needs a folder")
    if not os.path.isdir(root):
        raise ValueError(f"data path {root} is not a directory; pass the folder of class folders")
    paths, classes = _class_of(_walk_images(root))
    if not paths:
        raise ValueError(
            f"no images found in {root} (extensions {sorted(IMAGE_EXTENSIONS)}); put them in one "
            "sub-folder per class (cat/, dog/) or name them CLASS.N.jpg (cat.0.jpg, dog.0.jpg)"
        )
    class_names = tuple(sorted(set(classes)))
    if len(class_names) < 2:
        raise ValueError(
            f"only one class ({class_names[0]!r}) found in {root}; add a sub-folder (or a "
            "CLASS.N.jpg name prefix) per class, at least two classes"
        )
    index = {c: i for i, c in enumerate(class_names)}
    fingerprint, unstattable = [], []
    for p in paths:
        try:
            st = os.stat(os.path.join(root, p))
            fingerprint.append((p, st.st_size, st.st_mtime_ns))
        except OSError as e:
            fingerprint.append((p, -1, -1))
            unstattable.append((p, f"{type(e).__name__}: {e.strerror or e}"))
    return _Listing(
        paths=tuple(paths),
        labels=np.array([index[c] for c in classes], np.int32),
        class_names=class_names,
        unstattable=tuple(unstattable),
        fingerprint=tuple(fingerprint),
    )


def _decode_folder(
    root: str, listing: _Listing, image_size: int, max_per_class: int | None, progress: bool
) -> _Decoded:
    bad = dict(listing.unstattable)
    keep = _subset_per_class(listing.labels, max_per_class)
    keep = [i for i in keep if listing.paths[i] not in bad]
    paths = [os.path.join(root, listing.paths[i]) for i in keep]
    results = _parallel_map(
        functools.partial(_decode_file, image_size=image_size), paths, progress, f"decoding {root}"
    )
    images, labels, skipped = [], [], [(p, r) for p, r in listing.unstattable]
    for i, (image, reason) in zip(keep, results, strict=True):
        if image is None:
            skipped.append((listing.paths[i], reason))
        else:
            images.append(image)
            labels.append(listing.labels[i])
    return _decoded(images, labels, listing.class_names, image_size, skipped=sorted(skipped))


def _num_workers() -> int:
    return min(32, (os.cpu_count() or 1) + 4)


def _parallel_map(fn: Callable, items: Sequence, progress: bool, desc: str) -> list:
    """`[fn(x) for x in items]` on a thread pool (Pillow releases the GIL), with a progress bar."""
    with (
        concurrent.futures.ThreadPoolExecutor(_num_workers()) as pool,
        tqdm(total=len(items), desc=desc, unit="img", disable=not progress) as bar,
    ):
        results = []
        for result in pool.map(fn, items):
            results.append(result)
            bar.update(1)
    return results


def _subset_per_class(labels: np.ndarray, max_per_class: int | None) -> list[int]:
    """Sorted indices keeping at most `max_per_class` per class, a fixed seeded choice."""
    if max_per_class is None:
        return list(range(len(labels)))
    rng = np.random.default_rng(_SUBSET_SEED)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        keep.extend(members[np.sort(rng.permutation(len(members))[:max_per_class])].tolist())
    return sorted(keep)


def _decoded(images, labels, class_names, image_size, *, origin=None, origins=("all",), skipped=()):
    n = len(labels)
    return _Decoded(
        images=np.stack(images) if n else np.zeros((0, image_size, image_size, 3), np.uint8),
        labels=np.asarray(labels, np.int32).reshape(n),
        class_names=tuple(class_names),
        origin=np.zeros(n, np.int32) if origin is None else np.asarray(origin, np.int32),
        origins=tuple(origins),
        skipped=tuple((str(p), str(r)) for p, r in skipped),
    )


def _decode_digits(digits_classes: int, image_size: int, max_per_class: int | None) -> _Decoded:
    """sklearn's 1,797 8x8 digits (0..16) -> x 255/16, bilinear to S x S, grey copied to RGB."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target if digits_classes == 10 else (digits.target >= 5)
    labels = np.asarray(labels, np.int32)
    keep = _subset_per_class(labels, max_per_class)
    images = []
    for x in digits.images[keep]:
        grey = Image.fromarray((x * (255.0 / 16.0)).astype(np.float32))
        grey = np.asarray(grey.resize((image_size, image_size), Image.Resampling.BILINEAR))
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        images.append(np.repeat(grey[..., None], 3, axis=-1))
    return _decoded(images, labels[keep], DIGITS_CLASS_NAMES[digits_classes], image_size)


def _tfds_not_ready(name: str, data_dir: str | None, error: Exception) -> ValueError:
    where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    detail = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    return ValueError(
        f"TFDS dataset {name!r} is not available as array_record under {where} ({detail}). "
        f"Nothing is downloaded here: prepare it where there is internet with `tfds build {name} "
        "--file_format=array_record --data_dir=DIR` and copy DIR here, or pass tfds_data_dir=DIR"
    )


def _tfds_builder(name: str, data_dir: str | None, use_test_split: bool):
    """(builder, split names to read): all recorded splits, or train (+ test) if none are."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise _tfds_not_ready(name, data_dir, e) from e
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(
            f"TFDS dataset {name!r} needs 'image' and 'label' features, has {list(features)}"
        )
    origins = tuple(builder.info.splits) or (("train", "test") if use_test_split else ("train",))
    if use_test_split and "test" not in origins:
        raise ValueError(f"TFDS dataset {name!r} has no 'test' split (splits: {origins}); use "
                         "use_dataset_test_split=False for a 70/10/20 split of all of it")
    return builder, origins


def _tfds_fingerprint(builder, name: str, data_dir: str | None, origins: Sequence[str]) -> dict:
    splits = builder.info.splits
    return {
        "name": name,
        "data_dir": os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None,
        "splits": list(origins),
        "num_examples": [splits[s].num_examples if s in splits else None for s in origins],
        "dataset_version": str(builder.info.version),
    }


def _open_tfds_split(name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        len(source)
    except Exception as e:  # noqa: BLE001 - not prepared, or prepared as TFRecord.
        raise _tfds_not_ready(name, data_dir, e) from e
    return source


def _read_tfds_example(source, index: int, image_size: int):
    """(image (S, S, 3) uint8 | None, label | None, reason | None) for one record."""
    try:
        example = source[index]
        image = _resize(_to_rgb(_array_to_image(example["image"])), image_size)
        return image, int(example["label"]), None
    except Exception as e:  # noqa: BLE001 - a corrupt record skips that record, with the reason kept.
        return None, None, f"{type(e).__name__}: {e}"


def _decode_tfds(builder, name, data_dir, origins, image_size, max_per_class, progress) -> _Decoded:
    """Reads every split in `origins`; with `max_per_class`, in a fixed seeded order until full."""
    class_names = tuple(builder.info.features["label"].names)
    images, labels, origin, skipped = [], [], [], []
    for split_id, split in enumerate(origins):
        source = _open_tfds_split(name, split, data_dir)
        n = len(source)
        if max_per_class is None:
            order, total = np.arange(n), n
        else:
            order = np.random.default_rng([_SUBSET_SEED, split_id]).permutation(n)
            total = min(n, max_per_class * len(class_names))
        counts = np.zeros(len(class_names), np.int64)
        read = functools.partial(_read_tfds_example, source, image_size=image_size)
        desc = f"reading tfds:{name}/{split}"
        with (
            concurrent.futures.ThreadPoolExecutor(_num_workers()) as pool,
            tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar,
        ):
            for start in range(0, n, _CHUNK):
                chunk = order[start : start + _CHUNK].tolist()
                for i, (image, label, reason) in zip(chunk, pool.map(read, chunk), strict=True):
                    if image is None:
                        skipped.append((f"tfds:{name}/{split}[{i}]", reason))
                    elif max_per_class is None or counts[label] < max_per_class:
                        counts[label] += 1
                        images.append(image)
                        labels.append(label)
                        origin.append(split_id)
                        bar.update(1)
                if max_per_class is not None and counts.min() >= max_per_class:
                    break
    return _decoded(images, labels, class_names, image_size, origin=origin, origins=origins,
                    skipped=skipped)


def _cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"debkd-data-{key}.npz")


def _cached(cache_dir: str | None, key: str, decode: Callable[[], _Decoded]) -> _Decoded:
    """`decode()` once per key, then `cache_dir/debkd-data-KEY.npz`; a bad file is rebuilt."""
    if cache_dir is None:
        return decode()
    path = _cache_path(os.path.expanduser(cache_dir), key)
    if os.path.exists(path):
        try:
            return _read_cache(path, key)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            logging.warning("Ignoring unreadable data cache %s (%s: %s); decoding again.", path,
                            type(e).__name__, e)
    decoded = decode()
    try:
        _write_cache(path, key, decoded)
    except OSError as e:
        logging.warning("Could not write the data cache %s (%s); continuing without it.", path, e)
    return decoded


def _read_cache(path: str, key: str) -> _Decoded:
    with np.load(path, allow_pickle=False) as z:
        if str(z["key"]) != key:
            raise ValueError("cache key mismatch")
        decoded = _Decoded(
            images=z["images"],
            labels=z["labels"],
            class_names=tuple(str(c) for c in z["class_names"]),
            origin=z["origin"],
            origins=tuple(str(o) for o in z["origins"]),
            skipped=tuple(zip((str(p) for p in z["skipped_paths"]),
                              (str(r) for r in z["skipped_reasons"]), strict=True)),
        )
    n = len(decoded.labels)
    if (decoded.images.dtype != np.uint8 or decoded.images.ndim != 4 or len(decoded.images) != n
            or decoded.origin.shape != (n,)):
        raise ValueError("cache arrays have inconsistent shapes")
    return decoded


def _write_cache(path: str, key: str, decoded: _Decoded) -> None:
    """Atomic: a temp file in the same folder, fsync, then os.replace."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                key=np.array(key),
                images=decoded.images,
                labels=decoded.labels,
                class_names=np.array(decoded.class_names, dtype=str),
                origin=decoded.origin,
                origins=np.array(decoded.origins, dtype=str),
                skipped_paths=np.array([p for p, _ in decoded.skipped], dtype=str),
                skipped_reasons=np.array([r for _, r in decoded.skipped], dtype=str),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _warn_skipped(name: str, skipped: Sequence[tuple[str, str]], kept: int) -> None:
    path, reason = skipped[0]
    logging.warning(
        "Skipped %d unreadable file(s) in %s (%d kept); e.g. %s: %s. The list is in "
        "Dataset.skipped (write_skipped_report writes it as CSV).",
        len(skipped), name, kept, path, reason,
    )


def _check_class_counts(decoded: _Decoded, name: str, num_skipped: int, test_mask) -> None:
    """Every class needs one example per split: 3, or 2 outside the dataset's own test split."""
    labels = decoded.labels if test_mask is None else decoded.labels[~test_mask]
    need = 3 if test_mask is None else 2
    counts = np.bincount(labels, minlength=len(decoded.class_names))
    small = [(decoded.class_names[c], int(n)) for c, n in enumerate(counts) if n < need]
    if small:
        raise ValueError(
            f"{name}: class(es) {small} have fewer than {need} readable examples ({num_skipped} "
            "file(s) skipped as unreadable), too few for a stratified train/val/test split; add "
            "images to those classes or remove them"
        )


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) for a class of n examples.

    Rounded half up, at least 1 each (test 0 when its fraction is 0), the larger trimmed first to
    leave at least 1 for train.
    """
    min_test = 1 if test_fraction > 0 else 0
    n_val = max(1, math.floor(n * val_fraction + 0.5))
    n_test = max(min_test, math.floor(n * test_fraction + 0.5))
    while n_val + n_test > n - 1 and (n_val > 1 or n_test > min_test):
        if n_val > 1 and n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def _split_indices(labels: np.ndarray, fractions, seed: int, test_mask=None):
    """Stratified, seeded (train, val, test) index arrays, each shuffled by the same rng.

    With `test_mask`, the masked examples are the test set; the rest splits train:val by
    fractions[0]:fractions[1].
    """
    f_train, f_val, f_test = fractions
    rng = np.random.default_rng(seed)
    parts: tuple[list, list, list] = ([], [], [])
    pool = np.arange(len(labels)) if test_mask is None else np.flatnonzero(~test_mask)
    for c in np.unique(labels[pool]):
        members = rng.permutation(pool[labels[pool] == c])
        if test_mask is None:
            n_val, n_test = _split_counts(len(members), f_val, f_test)
        else:
            n_val, n_test = _split_counts(len(members), f_val / (f_train + f_val), 0.0)
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test : n_test + n_val])
        parts[0].append(members[n_test + n_val :])
    if test_mask is not None:
        parts[2].append(np.flatnonzero(test_mask))
    return tuple(rng.permutation(np.concatenate(p)).astype(np.int64) for p in parts)


def _augment_params(rng, n: int, pad: int) -> tuple[jax.Array, jax.Array]:
    """(offsets int32 (n, 2) in [0, 2 * pad], flips bool (n,)) for `_crop_flip`."""
    k_crop, k_flip = jax.random.split(rng)
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (n,))
    return offsets, flips


def _crop_flip(images, offsets, flips, pad: int) -> jax.Array:
    """Zero-pad by `pad`, crop H x W at `offsets[i] = (dy, dx)`, mirror where `flips[i]`."""
    images = jnp.asarray(images)
    _, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(image, offset, flip):
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)
