"""The one definition of "the same run": what decides a teacher's and a student's result. A run folder
claimed with another identity is refused (`workdir_lib.claim_run_dir`); `main` and sweeps both use these."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from debkd_jax import workdir_lib


def fingerprint(*arrays) -> str:
    """A short sha256 of arrays' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def training_fields(train_cfg) -> dict:
    """The fields of a teacher/student config that decide its training (not eval_batch_size, checkpoint)."""
    skip = ("eval_batch_size", "checkpoint", "logits", "variables", "folds")
    return {k: v for k, v in train_cfg.to_dict().items() if k not in skip}


def teacher_identity(config, meta: dict) -> dict:
    """What decides a teacher trained here: its training config, seed, dtype, augmentation and data."""
    identity = {
        "teacher": training_fields(config.teacher),
        "seed": config.seed,
        "dtype": config.dtype,
        "augment": config.data.augment,
        "data": meta["data"],
        "class_names": meta["class_names"],
        "image_size": meta["image_size"],
    }
    if "fold" in meta:
        identity["fold"] = meta["fold"]
    return identity


def student_identity(
    *, config, method_cfg, seed: int, dataset, t_logits: dict, teacher_meta: dict | None = None
) -> dict:
    """What decides a student. The teacher enters through its logits (the splits it has) and, for a logits
    file, the file's sha256."""
    identity = {
        "method": method_cfg.to_dict(),
        "student": training_fields(config.student),
        "seed": seed,
        "dtype": config.dtype,
        "augment": config.data.augment,
        "data": fingerprint(dataset.train_images, dataset.train_labels),
        "teacher_logits": fingerprint(
            *(t_logits[s] for s in ("train", "val", "test") if t_logits[s] is not None)
        ),
    }
    if teacher_meta and teacher_meta.get("logits_sha256"):
        identity["teacher_logits_file"] = teacher_meta["logits_sha256"]
    return identity


def identity_key(identity: dict) -> str:
    """8 hex digits of an identity, for a folder name."""
    blob = json.dumps(workdir_lib.jsonable(identity), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def run_folder(parent: str, stem: str, identity: dict) -> str:
    """The folder of the run `identity` among several runs named `<stem>-<key>` in `parent` (a sweep's points):
    a folder there that was claimed with this identity (whatever its key: folders named by an older key are
    reused), else `<stem>-<identity_key(identity)>`."""
    wanted = workdir_lib.jsonable(identity)
    prefix = f"{stem}-"
    names = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
    # A folder with a result first: an older key may have left two folders of the same run.
    names.sort(key=lambda n: not os.path.exists(os.path.join(parent, n, "result.json")))
    for name in names:
        key = name[len(prefix) :]
        if name.startswith(prefix) and "-" not in key and "." not in key:
            if workdir_lib.read_json(os.path.join(parent, name, "run.json")) == wanted:
                return os.path.join(parent, name)
    return os.path.join(parent, f"{prefix}{identity_key(identity)}")
