"""The run's folder: a lock against a second run, atomic writes, checkpoints, and the teacher match check.

Everything written here is written atomically (a temporary file in the same folder, fsync, `os.replace`), so a
run killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from debkd_jax.errors import UserError


def expand(path: str) -> str:
    return os.path.abspath(os.path.expanduser(os.path.expandvars(str(path))))


def safe_name(name: str) -> str:
    """A method name as a folder name: 'DeBKD+BTKD' -> 'DeBKD+BTKD', 'a b/c' -> 'a_b_c'."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _disk_error(path: str, error: OSError) -> UserError:
    if error.errno == errno.ENOSPC:
        why = "the disk is full; free space or choose another --workdir"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "it is not writable; choose a writable --workdir"
    else:
        why = error.strerror or str(error)
    return UserError(f"cannot write {path}: {why}. Files already written there are untouched.")


def atomic_write_bytes(path: str, payload: bytes) -> None:
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise _disk_error(path, e) from e


def write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(obj):
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj)}")


def read_json(path: str) -> Any | None:
    """The parsed file, or None when it is missing or unreadable (a partial file is never left by us)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_npz(path: str, **arrays) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def read_npz(path: str) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError):
        return None


def checkpoint_manager(directory: str) -> ocp.CheckpointManager:
    """Keeps the newest complete checkpoint; orbax commits each by an atomic rename, so a killed save leaves
    only a temporary folder that is ignored (and cleaned) on the next start."""
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options)


def save_variables(path: str, variables) -> None:
    """Saves a variables pytree (params, batch_stats) with orbax, replacing an older save atomically."""
    path = expand(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, jax.device_get(variables), force=True)
        ckptr.wait_until_finished()


def restore_variables(path: str):
    path = expand(path)
    if not os.path.isdir(path):
        raise UserError(f"no saved model at {path}.")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path)


def check_teacher_matches(saved: dict, wanted: dict, where: str) -> None:
    """A reused teacher must have the configured architecture, the data's classes and image size."""
    for field, what in (
        ("model", "architecture"),
        ("num_classes", "number of classes"),
        ("class_names", "class names"),
        ("image_size", "image size"),
    ):
        if saved.get(field) != wanted.get(field):
            raise UserError(
                f"the teacher in {where} does not match this run: its {what} is {saved.get(field)!r}, this "
                f"run needs {wanted.get(field)!r}. Set teacher.model / data to match it, point "
                "teacher.checkpoint elsewhere, or use a new --workdir to train a new teacher."
            )


class Workdir:
    """Creates and locks the run folder. A second run on the same folder refuses instead of corrupting it."""

    def __init__(self, path: str, writer: bool = True):
        self.path = path
        self.writer = writer
        self._lock = None

    def __enter__(self) -> Workdir:
        try:
            os.makedirs(self.path, exist_ok=True)
            probe = os.path.join(self.path, ".write_probe")
            with open(probe, "w") as f:
                f.write("ok")
            os.unlink(probe)
        except OSError as e:
            raise _disk_error(self.path, e) from e
        lock_path = os.path.join(self.path, ".lock")
        self._lock = open(lock_path, "a+")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            self._lock = None
            raise UserError(
                f"workdir {self.path} is in use by a running job ({holder}); wait for it to finish or choose "
                "another --workdir."
            ) from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()}")
        self._lock.flush()
        return self

    def write_config(self, config) -> None:
        if self.writer:
            atomic_write_bytes(os.path.join(self.path, "config.json"), config.to_json_best_effort(indent=2).encode())

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
