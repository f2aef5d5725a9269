"""The field's ImageNet image transforms on Pillow images (torchvision's): the training random-resized crop
and flip, the evaluation resize and center crop. (S, S, 3) uint8 out. `read_image_file` makes a model's input
from an image file as its run did (`model.json`'s preprocessing): what `predict` calls."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from debkd_jax.data import sources

EVAL_CROP = 224 / 256
"""The share of the resized image's shorter side that evaluation keeps (the field's 224 of 256)."""

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    return img if img.size == size else img.resize(size, Image.Resampling.BILINEAR)


def eval_transform(img: Image.Image, image_size: int, crop: float = EVAL_CROP) -> np.ndarray:
    """Shorter side resized to round(S / crop), then the central S x S: (S, S, 3) uint8."""
    w, h = img.size
    short = max(image_size, round(image_size / crop))
    scale = short / min(w, h)
    nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    img = _resize(img, (nw, nh))
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    return np.asarray(img.crop((left, top, left + image_size, top + image_size)), np.uint8)


def eval_draft(image_size: int, crop: float) -> int:
    """The smallest side a JPEG may be decoded at (Pillow's draft mode) for `eval_transform`."""
    return max(image_size, round(image_size / crop))


def read_image_file(path: str, preprocessing: dict) -> np.ndarray:
    """An image file as a model's uint8 input (S, S, 3), exactly as its run evaluated images
    (`DataSource.preprocessing`): "squash" decodes as the memory kind does (`sources.decode_file`),
    "resize_crop" as the files kind does (a draft decode, then `eval_transform`). ValueError (with the reason)
    for a file that cannot be read."""
    size = int(preprocessing["image_size"])
    if preprocessing["resize"] == "squash":
        image, reason = sources.decode_file(path, size)
        if image is None:
            raise ValueError(reason)
        return image
    crop = float(preprocessing["crop"])
    try:
        img = sources.open_rgb(path, eval_draft(size, crop))
    except Exception as e:  # noqa: BLE001 - any decoder failure, with its reason
        raise ValueError(f"{type(e).__name__}: {e}") from e
    return eval_transform(img, size, crop)


def rrc_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params`: (left, top, w, h) covering a uniform share of the area
    in `RRC_SCALE` with a log-uniform aspect ratio in `RRC_RATIO` (10 tries, then the central crop)."""
    area = width * height
    log_ratio = np.log(RRC_RATIO)
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < RRC_RATIO[0]:
        w, h = width, round(width / RRC_RATIO[0])
    elif in_ratio > RRC_RATIO[1]:
        w, h = round(height * RRC_RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_transform(img: Image.Image, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Random-resized crop to S x S (bilinear) and a left-right flip with probability 1/2: (S, S, 3) uint8."""
    left, top, w, h = rrc_box(rng, *img.size)
    out = img.resize((image_size, image_size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    x = np.asarray(out, np.uint8)
    return x[:, ::-1] if rng.random() < 0.5 else x
