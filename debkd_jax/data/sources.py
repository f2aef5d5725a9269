"""Sources decoded into uint8 arrays: scikit-learn's digits, image folders, and TFDS array_record datasets.

    digits          scikit-learn's bundled 8x8 handwritten digits, upscaled (no download)
    folder:PATH     one sub-folder per class (cat/, dog/) or Kaggle's flat CLASS.N.jpg layout
    tfds:NAME       a TFDS dataset prepared as array_record, read through `tfds.data_source`

`plan_source` gives a source's name, its cache-key content and its decoder; the decoder returns a `Decoded`:
images (N, S, S, 3) uint8, labels (N,) int32, before the split.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib.metadata
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from debkd_jax import console
from debkd_jax.data.split import SUBSET_SEED, subset_per_class

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)
SOURCE_FORMS = "'digits', 'folder:PATH' or 'tfds:NAME'"
DIGITS_CLASS_NAMES = {2: ("0-4", "5-9"), 10: tuple(str(d) for d in range(10))}

_CHUNK = 256


@dataclasses.dataclass(frozen=True, eq=False)
class Decoded:
    """A source's examples before the split: what the cache holds.

    `origin[i]` indexes `origins`, the source split example i came from (tfds; ('all',) otherwise).
    `ids[i]` is example i's stable id (`image_ids`). `skipped` paths are relative to the folder for folder
    sources.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    origin: np.ndarray
    origins: tuple[str, ...]
    ids: np.ndarray
    skipped: tuple[tuple[str, str], ...] = ()


class SourcePlan(NamedTuple):
    """How to read a source: its name, its folder (folder sources), the content part of its cache key, and
    the decoder, called only on a cache miss."""

    name: str
    root: str | None
    key: dict
    decode: Callable[[], Decoded]


def parse_source(source: str) -> tuple[str, str]:
    """'digits' | 'folder:PATH' | 'tfds:NAME' -> (kind, argument); ValueError for any other form."""
    kind, sep, arg = str(source).partition(":")
    if source == "digits":
        return "digits", ""
    if sep and kind in ("folder", "tfds") and arg:
        return kind, arg
    raise ValueError(f"unknown data source {source!r}; valid forms: {SOURCE_FORMS}")


def plan_source(kind: str, arg: str, *, image_size, max_per_class, digits_classes, tfds_data_dir,
                use_dataset_test_split, progress) -> SourcePlan:
    """Checks the source (folder listed, TFDS builder found) without decoding it."""
    if kind == "digits":
        if digits_classes not in DIGITS_CLASS_NAMES:
            raise ValueError(f"digits_classes must be 2 or 10, got {digits_classes}")
        # The installed version from its metadata: importing scikit-learn takes most of a second.
        sklearn_version = importlib.metadata.version("scikit-learn")
        key = {"source": "digits", "sklearn": sklearn_version, "classes": digits_classes}
        return SourcePlan("digits", None, key, functools.partial(
            decode_digits, digits_classes, image_size, max_per_class
        ))
    if kind == "folder":
        root = os.path.abspath(os.path.expanduser(arg))
        listing = folder_listing(root)
        key = {"source": "folder", "files": listing.fingerprint}
        return SourcePlan(f"folder:{root}", root, key, functools.partial(
            _decode_folder, root, listing, image_size, max_per_class, progress
        ))
    builder, origins = tfds_builder(arg, tfds_data_dir, use_dataset_test_split)
    key = {"source": "tfds", **tfds_fingerprint(builder, arg, tfds_data_dir, origins)}
    return SourcePlan(f"tfds:{arg}", None, key, functools.partial(
        _decode_tfds, builder, arg, tfds_data_dir, origins, image_size, max_per_class, progress
    ))


# ----------------------------------------------------------------------------- one image


def decode_file(path: str, image_size: int) -> tuple[np.ndarray | None, str | None]:
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


def open_rgb(path: str, draft_size: int | None = None) -> Image.Image:
    """An image file as an RGB Pillow image (EXIF orientation applied, `_to_rgb`); JPEGs decoded at the
    smallest scale whose sides stay >= `draft_size` when given. Raises what Pillow raises for a bad file."""
    with Image.open(path) as img:
        if draft_size:
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        return _to_rgb(_exif_transposed(img))


def array_to_rgb(x: np.ndarray) -> Image.Image:
    """A decoded TFDS image array (H, W[, 1|3|4]), uint8 or uint16, as an RGB Pillow image."""
    return _to_rgb(_array_to_image(x))


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


def _decoded(images, labels, class_names, image_size, ids, *, origin=None, origins=("all",), skipped=()
             ) -> Decoded:
    n = len(labels)
    return Decoded(
        ids=np.asarray(list(ids), dtype=str).reshape(n),
        images=np.stack(images) if n else np.zeros((0, image_size, image_size, 3), np.uint8),
        labels=np.asarray(labels, np.int32).reshape(n),
        class_names=tuple(class_names),
        origin=np.zeros(n, np.int32) if origin is None else np.asarray(origin, np.int32),
        origins=tuple(origins),
        skipped=tuple((str(p), str(r)) for p, r in skipped),
    )


# ----------------------------------------------------------------------------- image ids


def digits_id(index: int) -> str:
    """'digits/<index>': the image's index in scikit-learn's `load_digits()` (0..1796)."""
    return f"digits/{index}"


def folder_id(relative_path: str) -> str:
    """The image's path relative to the data folder, '/'-separated: 'cat/0001.jpg'."""
    return relative_path.replace(os.sep, "/")


def tfds_id(split: str, index: int) -> str:
    """'<split>/<index>': the record's index in `tfds.data_source(name, split=split)`: 'train/17'."""
    return f"{split}/{index}"


# ----------------------------------------------------------------------------- digits


def decode_digits(digits_classes: int, image_size: int, max_per_class: int | None) -> Decoded:
    """sklearn's 1,797 8x8 digits (0..16) -> x 255/16, bilinear to S x S, grey copied to RGB."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target if digits_classes == 10 else (digits.target >= 5)
    labels = np.asarray(labels, np.int32)
    keep = subset_per_class(labels, max_per_class)
    images = []
    for x in digits.images[keep]:
        grey = Image.fromarray((x * (255.0 / 16.0)).astype(np.float32))
        grey = np.asarray(grey.resize((image_size, image_size), Image.Resampling.BILINEAR))
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        images.append(np.repeat(grey[..., None], 3, axis=-1))
    ids = [digits_id(int(i)) for i in keep]
    return _decoded(images, labels[keep], DIGITS_CLASS_NAMES[digits_classes], image_size, ids)


# ----------------------------------------------------------------------------- image folders


@dataclasses.dataclass(frozen=True)
class FolderListing:
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


def folder_listing(root: str) -> FolderListing:
    """The image files under `root` and their classes; ValueError for a missing, empty or one-class folder."""
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
    return FolderListing(
        paths=tuple(paths),
        labels=np.array([index[c] for c in classes], np.int32),
        class_names=class_names,
        unstattable=tuple(unstattable),
        fingerprint=tuple(fingerprint),
    )


def _decode_folder(
    root: str, listing: FolderListing, image_size: int, max_per_class: int | None, progress: bool
) -> Decoded:
    bad = dict(listing.unstattable)
    keep = subset_per_class(listing.labels, max_per_class)
    keep = [i for i in keep if listing.paths[i] not in bad]
    paths = [os.path.join(root, listing.paths[i]) for i in keep]
    results = _parallel_map(
        functools.partial(decode_file, image_size=image_size), paths, progress, f"decoding {root}"
    )
    images, labels, ids, skipped = [], [], [], [(p, r) for p, r in listing.unstattable]
    for i, (image, reason) in zip(keep, results, strict=True):
        if image is None:
            skipped.append((listing.paths[i], reason))
        else:
            images.append(image)
            labels.append(listing.labels[i])
            ids.append(folder_id(listing.paths[i]))
    return _decoded(images, labels, listing.class_names, image_size, ids, skipped=sorted(skipped))


def _num_workers() -> int:
    return min(32, (os.cpu_count() or 1) + 4)


def _parallel_map(fn: Callable, items: Sequence, progress: bool, desc: str) -> list:
    """`[fn(x) for x in items]` on a thread pool (Pillow releases the GIL), with a progress bar."""
    with (
        concurrent.futures.ThreadPoolExecutor(_num_workers()) as pool,
        console.progress(total=len(items), desc=desc, unit="img", disable=not progress) as bar,
    ):
        results = []
        for result in pool.map(fn, items):
            results.append(result)
            bar.update(1)
    return results


# ----------------------------------------------------------------------------- TFDS


def _tfds_not_ready(name: str, data_dir: str | None, error: Exception) -> ValueError:
    where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    detail = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    return ValueError(
        f"TFDS dataset {name!r} is not available as array_record under {where} ({detail}). "
        f"Nothing is downloaded here: prepare it where there is internet with `tfds build {name} "
        "--file_format=array_record --data_dir=DIR` and copy DIR here, or pass tfds_data_dir=DIR"
    )


def tfds_builder(name: str, data_dir: str | None, use_test_split: bool):
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


def tfds_fingerprint(builder, name: str, data_dir: str | None, origins: Sequence[str]) -> dict:
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


def read_tfds_example(source, index: int, image_size: int):
    """(image (S, S, 3) uint8 | None, label | None, reason | None) for one record."""
    try:
        example = source[index]
        image = _resize(_to_rgb(_array_to_image(example["image"])), image_size)
        return image, int(example["label"]), None
    except Exception as e:  # noqa: BLE001 - a corrupt record skips that record, with the reason kept.
        return None, None, f"{type(e).__name__}: {e}"


def _decode_tfds(builder, name, data_dir, origins, image_size, max_per_class, progress) -> Decoded:
    """Reads every split in `origins`; with `max_per_class`, in a fixed seeded order until full."""
    class_names = tuple(builder.info.features["label"].names)
    images, labels, origin, ids, skipped = [], [], [], [], []
    for split_id, split in enumerate(origins):
        source = _open_tfds_split(name, split, data_dir)
        n = len(source)
        if max_per_class is None:
            order, total = np.arange(n), n
        else:
            order = np.random.default_rng([SUBSET_SEED, split_id]).permutation(n)
            total = min(n, max_per_class * len(class_names))
        counts = np.zeros(len(class_names), np.int64)
        read = functools.partial(read_tfds_example, source, image_size=image_size)
        desc = f"reading tfds:{name}/{split}"
        with (
            concurrent.futures.ThreadPoolExecutor(_num_workers()) as pool,
            console.progress(total=total, desc=desc, unit="img", disable=not progress) as bar,
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
                        ids.append(tfds_id(split, i))
                        bar.update(1)
                if max_per_class is not None and counts.min() >= max_per_class:
                    break
    return _decoded(images, labels, class_names, image_size, ids, origin=origin, origins=origins,
                    skipped=skipped)
