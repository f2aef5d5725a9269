"""Augmented views keyed by image and view index (docs/method.md, "Views and targets").

View v of training image i is a pure function of (data seed, i, v): its crop and flip and, with mixup, its
partner image and mixing ratio. Epoch e trains image i on view `e mod V`. A view does not depend on the batch,
the step, the student's seed, the number of processes or workers, so the teacher can compute its logits on
every view once (`config.targets = "stored"`) and every method and seed trains on exactly those pixels.

    view_keys(seed, rows, views)       (n,) uint64: a counter-based hash of (seed, row, view), vectorized
    crop_params(keys, pad)             the memory kind's pad-`pad` crop offsets and flips, from the keys
    mixup_params(keys, n, alpha)       partner rows and ratios lam in [0.5, 1] (Beta(alpha, alpha), folded)
    view_generator(key)                a numpy Generator for the files kind's random-resized crop of one view
    epoch_views(epoch, n, num_views)   the view each image trains on in an epoch

All of it is host-side numpy, vectorized over a batch; the memory kind applies the crops and mixes on the
device (`apply_views`, jittable), the files kind in its reader.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from debkd_jax.data.batching import crop_flip

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective mix of uint64s (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def view_keys(seed: int, rows, views) -> np.ndarray:
    """(n,) uint64 keys of views (row, view) under `seed`: equal inputs give equal keys, anywhere."""
    rows = np.asarray(rows, np.int64).astype(np.uint64)
    views = np.broadcast_to(np.asarray(views, np.int64), rows.shape).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = _splitmix(np.uint64(seed) * _GOLDEN + np.uint64(1))
        x = _splitmix(x ^ (rows * _GOLDEN + np.uint64(2)))
        return _splitmix(x ^ (views * _GOLDEN + np.uint64(3)))


def _uniform(keys: np.ndarray, salt: int) -> np.ndarray:
    """A float64 in [0, 1) per key, independent for each salt."""
    with np.errstate(over="ignore"):
        bits = _splitmix(keys ^ (np.uint64(salt) * _GOLDEN))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def crop_params(keys: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int32 (n, 2) in [0, 2 * pad], flips bool (n,)): the memory kind's crop of the image
    zero-padded by `pad` and its left-right flip (probability 1/2)."""
    span = 2 * pad + 1
    dy = np.floor(_uniform(keys, 1) * span).astype(np.int32)
    dx = np.floor(_uniform(keys, 2) * span).astype(np.int32)
    return np.stack([dy, dx], axis=-1), _uniform(keys, 3) < 0.5


def mixup_params(keys: np.ndarray, num_rows: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(partner rows int64 (n,), lam float32 (n,) in [0.5, 1]): each view mixes its own image (weight lam)
    with a uniformly drawn partner's same-numbered view; lam is Beta(alpha, alpha) folded onto [0.5, 1], so
    the own image, whose label the view keeps, always weighs most."""
    from scipy.special import betaincinv  # SciPy loads on first use

    partners = np.floor(_uniform(keys, 4) * num_rows).astype(np.int64)
    lam = betaincinv(alpha, alpha, _uniform(keys, 5))
    return partners, np.maximum(lam, 1.0 - lam).astype(np.float32)


def view_generator(key) -> np.random.Generator:
    """The numpy Generator of one view (the files kind's random-resized crop and flip)."""
    return np.random.default_rng(int(key))


def epoch_views(epoch: int, num_views: int) -> int:
    """The view every image trains on in `epoch`: `epoch mod V`."""
    return epoch % num_views


def mix(images, partner_images, lam, xp=jnp):
    """`round(lam * x + (1 - lam) * partner)` per image in float32, uint8 in and out: on the device (`xp=jnp`,
    jittable) or in a reader process (`xp=np`), the same operations in the same order."""
    lam = xp.asarray(lam, xp.float32)[:, None, None, None]
    mixed = lam * xp.asarray(images, xp.float32) + (xp.float32(1.0) - lam) * xp.asarray(
        partner_images, xp.float32
    )
    return xp.clip(xp.round(mixed), 0, 255).astype(xp.uint8)


def apply_views(batch: dict, pad: int) -> jax.Array:
    """The memory kind's view images of a batch (jittable): `crop_flip` of 'image' at 'offsets'/'flips', mixed
    with the partners' crops ('partner_image', 'partner_offsets', 'partner_flips', 'mix') where the batch has
    them."""
    images = crop_flip(batch["image"], batch["offsets"], batch["flips"], pad)
    if "partner_image" in batch:
        partners = crop_flip(batch["partner_image"], batch["partner_offsets"], batch["partner_flips"], pad)
        images = mix(images, partners, batch["mix"])
    return images


def view_batch(
    images_of, rows: np.ndarray, views: np.ndarray, *, seed: int, pad: int, mixup: float, num_rows: int
) -> dict:
    """The host part of a memory-kind batch of views: `images_of(rows)` gathered once for the images (and once
    for the partners with mixup), with each view's crop and mix parameters; `apply_views` finishes it on
    device."""
    keys = view_keys(seed, rows, views)
    offsets, flips = crop_params(keys, pad)
    out = {"image": images_of(rows), "offsets": offsets, "flips": flips}
    if mixup:
        partners, lam = mixup_params(keys, num_rows, mixup)
        p_offsets, p_flips = crop_params(view_keys(seed, partners, views), pad)
        out.update(
            partner_image=images_of(partners), partner_offsets=p_offsets, partner_flips=p_flips, mix=lam
        )
    return out
