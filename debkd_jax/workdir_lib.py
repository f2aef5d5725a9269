"""The run's folder: a lock against a second run, atomic writes, checkpoints, and the teacher match check.

Everything written here is written atomically (a temporary file in the same folder, fsync, `os.replace`), so a
run killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from debkd_jax.errors import UserError


def fingerprint(*arrays) -> str:
    """A short sha256 of arrays' shapes, dtypes and bytes (what identifies data and logits in run records)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def expand(path: str) -> str:
    return os.path.abspath(os.path.expanduser(os.path.expandvars(str(path))))


def safe_name(name: str) -> str:
    """A method name as a folder name: 'DeBKD+BTKD' -> 'DeBKD+BTKD', 'a b/c' -> 'a_b_c'."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def disk_error(path: str, error: OSError) -> UserError:
    if error.errno == errno.ENOSPC:
        why = "the disk is full; free space or choose another --workdir"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "it is not writable; choose a writable --workdir"
    else:
        why = error.strerror or str(error)
    return UserError(f"cannot write {path}: {why}. Files already written there are untouched.")


TMP_SUFFIX = ".tmp"


def timestamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def keep_aside(path: str) -> str | None:
    """Renames an existing file or folder to `<stem>.<timestamp><ext>` so a new one can take its place;
    returns the new name (None if `path` did not exist). Never deletes anything."""
    if not os.path.lexists(path):
        return None
    stem, ext = os.path.splitext(path) if os.path.isfile(path) else (path, "")
    stamp = timestamp()
    target, n = f"{stem}.{stamp}{ext}", 1
    while os.path.lexists(target):
        n += 1
        target = f"{stem}.{stamp}-{n}{ext}"
    try:
        os.replace(path, target)
    except OSError as e:
        raise disk_error(target, e) from e
    return target


def atomic_write_bytes(path: str, payload: bytes) -> None:
    """Writes `payload` to a hidden temporary file beside `path` (`.<name>.XXXX.tmp`), fsyncs it and renames
    it over `path`. On any error the temporary file is removed and `path` is untouched; a kill leaves at worst
    the temporary file, which `Workdir` removes on the next start."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX)
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
        raise disk_error(path, e) from e


def write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode()
    )


def _json_default(obj):
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj)}")


def jsonable(obj: Any) -> Any:
    """`obj` as `write_json` stores it and `read_json` returns it (tuples as lists, NumPy as Python)."""
    return json.loads(json.dumps(obj, default=_json_default))


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
    """The arrays of an .npz file, or None when it is missing, truncated or otherwise unreadable."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


def checkpoint_rank(metrics: dict) -> tuple[float, int]:
    """Orders checkpoints by `metrics = {"epoch", "val_accuracy"}`: the higher validation accuracy is better,
    and of equal ones the earlier epoch."""
    return metrics["val_accuracy"], -metrics["epoch"]


def checkpoint_manager(directory: str) -> ocp.CheckpointManager:
    """Keeps two checkpoints: the newest (to resume from) and the best by `checkpoint_rank` of the `metrics`
    saved with it (`best_step()`); they are one when the newest is the best. Orbax commits each by an atomic
    rename and deletes the others only after that, so a killed save leaves only a temporary folder that is
    ignored (and cleaned) on the next start."""
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        best_fn=checkpoint_rank,
        best_mode="max",
        preservation_policy=policies.AnyPreservationPolicy(
            [policies.LatestN(n=1), policies.BestN(get_metric_fn=checkpoint_rank, n=1)]
        ),
        create=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(directory, options=options)


_IO_FAILURES = {
    errno.ENOSPC: ("No space left on device", "RESOURCE_EXHAUSTED"),
    errno.EACCES: ("Permission denied",),
    errno.EROFS: ("Read-only file system",),
    errno.EDQUOT: ("Disk quota exceeded",),
}


def write_error(error: Exception, where: str) -> Exception:
    """Orbax reports a failed write as OSError or, from tensorstore, as ValueError('RESOURCE_EXHAUSTED: ... No
    space left on device'): those become a `UserError` naming `where`; anything else is returned as is."""
    if isinstance(error, OSError) and error.errno is not None:
        return disk_error(where, error)
    text = str(error)
    for code, needles in _IO_FAILURES.items():
        if any(n in text for n in needles):
            return disk_error(where, OSError(code, os.strerror(code)))
    return error


@contextlib.contextmanager
def user_write_errors(where: str):
    """Inside the block, a failed write that `write_error` recognises is raised as its `UserError`."""
    try:
        yield
    except (OSError, ValueError, RuntimeError) as e:
        error = write_error(e, where)
        if error is e:
            raise
        raise error from e


def save_variables(path: str, variables) -> None:
    """Saves a variables pytree (params, batch_stats) with orbax, replacing an older save atomically. A full
    or unwritable disk is a `UserError` (`write_error`)."""
    path = expand(path)
    with user_write_errors(path), ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, jax.device_get(variables), force=True)
        ckptr.wait_until_finished()


def restore_variables(path: str):
    path = expand(path)
    if not os.path.isdir(path):
        raise UserError(f"no saved model at {path}.")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"cannot read the saved model at {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it is damaged or not a model saved by debkd_jax."
        ) from e


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
    if "data" in saved and "data" in wanted and saved["data"] != wanted["data"]:
        raise UserError(
            f"the teacher in {where} was trained on another training set than this run's (data fingerprint "
            f"{saved['data']} vs {wanted['data']}: a different data source, max_per_class or split seed), so "
            "some of this run's validation or test images may be among its training images. Use the data "
            "config it was trained with, point teacher.checkpoint elsewhere, or use a new --workdir."
        )


def claim_run_dir(
    run_dir: str,
    identity: dict,
    what: str,
    writer: bool = True,
    replace: bool = False,
    upgrade: Callable[[dict], dict] | None = None,
) -> None:
    """Records what decides a run's result in `run_dir/run.json` and refuses to resume or reuse a run folder
    whose checkpoints or results come from different settings. With `replace`, such a folder is set aside
    (renamed `<run_dir>.<time>`, never deleted) and the run starts afresh. A folder with nothing saved yet
    (say a run that diverged in its first epoch) simply takes the new settings. `upgrade` reads an identity
    recorded by an older version in today's terms (the file itself is left as it is)."""
    path = os.path.join(run_dir, "run.json")
    identity = json.loads(json.dumps(identity, default=_json_default))
    saved = read_json(path)
    if saved is not None and upgrade is not None:
        saved = upgrade(saved)
    if saved is not None and saved != identity and _holds_work(run_dir):
        if not replace:
            changes = describe_changes(saved, identity)[:600]
            raise UserError(
                f"{run_dir} holds {what} started with other settings ({changes}). Its "
                "checkpoints and results are kept: use a new --workdir for the new settings, or pass "
                "--config.overwrite=True to set the old folder aside (renamed with a timestamp) and start "
                "again."
            )
        if writer:
            keep_aside(run_dir)
    if saved != identity and writer:
        write_json(path, identity)


def _holds_work(run_dir: str) -> bool:
    """Whether a run folder holds a committed checkpoint, a final model or a result."""
    if any(os.path.exists(os.path.join(run_dir, f)) for f in ("result.json", "teacher.json", "final")):
        return True
    ckpts = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(ckpts) and any(name.isdigit() for name in os.listdir(ckpts))


def describe_changes(old: dict, new: dict) -> str:
    """'a.b: 1 -> 2; c: (none) -> 3' over the leaves of two nested dicts that differ."""
    old, new = _flatten(old), _flatten(new)
    return "; ".join(
        f"{k}: {old.get(k, '(none)')!r} -> {new.get(k, '(none)')!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k, "(none)") != new.get(k, "(none)")
    )


def _flatten(tree, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def remove_stale_temporaries(root: str) -> list[str]:
    """Deletes the `.NAME.XXXX.tmp` files that `atomic_write_bytes` leaves when a run is killed mid-write.
    Only call it while holding the workdir lock."""
    removed = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("checkpoints", "final", "tensorboard")]
        for name in files:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                path = os.path.join(directory, name)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed.append(path)
    return removed


class Workdir:
    """Creates and locks the run folder. A second run on the same folder refuses instead of corrupting it.

    Only the writer (process 0 of a multi-process job) takes the lock: the other processes of the same job
    read the same folder (a filesystem shared by all hosts) and must not be refused by their own job's lock.
    The lock is an `fcntl.flock` on `.lock`: the kernel releases it when its process dies, even by SIGKILL, so
    a killed run never leaves a stale lock. Once locked, temporary files left by a killed run are removed.
    """

    def __init__(self, path: str, writer: bool = True):
        self.path = path
        self.writer = writer
        self._lock = None

    def __enter__(self) -> Workdir:
        try:
            if self.writer:  # the other processes of a job only read the folder that process 0 creates
                os.makedirs(self.path, exist_ok=True)
                probe = os.path.join(self.path, f".write_probe.{os.getpid()}")
                with open(probe, "w") as f:
                    f.write("ok")
                os.unlink(probe)
                self._lock = open(os.path.join(self.path, ".lock"), "a+")
        except OSError as e:
            raise disk_error(self.path, e) from e
        if not self.writer:
            return self
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
        self._lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self._lock.flush()
        remove_stale_temporaries(self.path)
        return self

    def write_config(self, config) -> None:
        """config.json: the latest run's config; an older, different one is kept as config.<time>.json."""
        if not self.writer:
            return
        path = os.path.join(self.path, "config.json")
        payload = config.to_json_best_effort(indent=2).encode()
        old = read_json(path)
        if old is not None and old != json.loads(payload):
            keep_aside(path)
        atomic_write_bytes(path, payload)

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
