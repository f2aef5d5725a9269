"""Batches: each epoch's index permutation, global sharded batches, and the jitted on-device transforms.

`batch_indices` is a function of (seed, epoch) alone, so a restart resumes the same order;
`make_global_batch` turns this process's rows into a batch sharded over a mesh; `augment` (random crop
after zero padding, random flip) and `normalize` ((x / 255 - 0.5) / 0.5) run inside the jitted step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PAD = 4
"""The memory kind's augmentation: random crops of the image zero-padded by this many pixels."""


def normalize(images, dtype=jnp.float32) -> jax.Array:
    """uint8 (..., H, W, 3) -> `(x / 255 - 0.5) / 0.5` in [-1, 1], float32 math, cast to `dtype`.

    Computed as `(x - 127.5) / 127.5`, which keeps 0 and 255 at exactly -1 and 1 under jit.
    """
    x = jnp.asarray(images).astype(jnp.float32)
    return ((x - 127.5) / 127.5).astype(dtype)


def augment(rng, images, *, pad: int = PAD) -> jax.Array:
    """Per-image random crop after `pad` pixels of zero padding, then a random left-right flip.

    (B, H, W, C) -> (B, H, W, C), same dtype; flip probability 0.5. The padding is black for uint8
    input: apply before `normalize`.
    """
    offsets, flips = augment_params(rng, images.shape[0], pad)
    return crop_flip(images, offsets, flips, pad)


def augment_params(rng, n: int, pad: int) -> tuple[jax.Array, jax.Array]:
    """(offsets int32 (n, 2) in [0, 2 * pad], flips bool (n,)) for `crop_flip`."""
    k_crop, k_flip = jax.random.split(rng)
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (n,))
    return offsets, flips


def crop_flip(images, offsets, flips, pad: int) -> jax.Array:
    """Zero-pad by `pad`, crop H x W at `offsets[i] = (dy, dx)`, mirror where `flips[i]`."""
    images = jnp.asarray(images)
    _, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(image, offset, flip):
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)


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
        raise ValueError(f"need num_examples >= 0 and batch_size >= 1, got {num_examples}, {batch_size}")
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


def make_global_batch(arrays, sharding: jax.sharding.NamedSharding):
    """This process's rows (B_local, ...) -> global arrays (B_local * processes, ...) on `sharding`, for every
    leaf of the pytree `arrays`.

    With one process the local rows are the whole batch; B must divide over the batch mesh axis.
    """
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), arrays)


def gather_batch(dataset, targets, idx: np.ndarray, sharding: jax.sharding.NamedSharding) -> dict:
    """The train step's batch for rows `idx` of this process: {'image', 'label', 'rows'} as global arrays on
    `sharding` (`rows`: the same rows of the `targets` pytree, e.g. a `targets.Targets` of host arrays)."""
    rows = jax.tree.map(lambda a: a[idx], targets)
    local = {"image": dataset.train_images[idx], "label": dataset.train_labels[idx], "rows": rows}
    return make_global_batch(local, sharding)
