"""The decode cache: a source's `Decoded` arrays kept as `cache_dir/debkd-data-KEY.npz`.

KEY = sha256 of the JSON of the source's content (files with size and mtime, TFDS version, sklearn version)
and the preprocessing (`FORMAT_VERSION`, image size, per-class subset). A file that cannot be read, or whose
key or shapes disagree, is decoded again and rewritten; the write is atomic (`workdir_lib.write_npz`).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable

import numpy as np
from absl import logging

from debkd_jax import workdir_lib
from debkd_jax.data.sources import Decoded
from debkd_jax.errors import UserError

FORMAT_VERSION = 2
"""Part of every cache key: raise it when the decoded arrays change for the same source (2: image ids)."""


def cache_key(parts: dict) -> str:
    """sha256 hex digest of `parts` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cached(cache_dir: str | None, key: str, decode: Callable[[], Decoded]) -> Decoded:
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
    except (OSError, UserError) as e:
        logging.warning("Could not write the data cache %s (%s); continuing without it.", path, e)
    return decoded


def _cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"debkd-data-{key}.npz")


def _read_cache(path: str, key: str) -> Decoded:
    with np.load(path, allow_pickle=False) as z:
        if str(z["key"]) != key:
            raise ValueError("cache key mismatch")
        decoded = Decoded(
            images=z["images"],
            labels=z["labels"],
            class_names=tuple(str(c) for c in z["class_names"]),
            origin=z["origin"],
            origins=tuple(str(o) for o in z["origins"]),
            ids=z["ids"],
            skipped=tuple(zip((str(p) for p in z["skipped_paths"]),
                              (str(r) for r in z["skipped_reasons"]), strict=True)),
        )
    n = len(decoded.labels)
    if (decoded.images.dtype != np.uint8 or decoded.images.ndim != 4 or len(decoded.images) != n
            or decoded.origin.shape != (n,) or decoded.ids.shape != (n,)):
        raise ValueError("cache arrays have inconsistent shapes")
    return decoded


def _write_cache(path: str, key: str, decoded: Decoded) -> None:
    workdir_lib.write_npz(
        path,
        key=np.array(key),
        images=decoded.images,
        labels=decoded.labels,
        class_names=np.array(decoded.class_names, dtype=str),
        origin=decoded.origin,
        origins=np.array(decoded.origins, dtype=str),
        ids=np.asarray(decoded.ids, dtype=str),
        skipped_paths=np.array([p for p, _ in decoded.skipped], dtype=str),
        skipped_reasons=np.array([r for _, r in decoded.skipped], dtype=str),
    )
