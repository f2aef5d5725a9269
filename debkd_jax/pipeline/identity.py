"""The one definition of "the same run": what decides a teacher's and a student's result. A run folder
claimed with another identity is refused (`workdir_lib.claim_run_dir`); `main` and sweeps both use these."""

from __future__ import annotations

import hashlib
import json
import os

from debkd_jax import config_lib, workdir_lib
from debkd_jax.workdir_lib import fingerprint  # noqa: F401 - the pipeline's name for it


def training_fields(train_cfg) -> dict:
    """The fields of a teacher/student config that decide its training (not eval_batch_size, checkpoint, the
    teacher's origin); a field added later only where it differs from its default
    (`config_lib.LATER_TRAINING_DEFAULTS`), so that runs recorded before it existed are still reused."""
    skip = ("eval_batch_size", "checkpoint", "logits", "variables", "folds")
    later = config_lib.LATER_TRAINING_DEFAULTS
    return {
        k: v
        for k, v in train_cfg.to_dict().items()
        if k not in skip and not (k in later and _same(v, later[k]))
    }


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return tuple(a) == tuple(b)
    return a == b


def teacher_identity(config, meta: dict, source=None) -> dict:
    """What decides a teacher trained here: its training config, seed, dtype, augmentation and data (and, for
    image files, how their images are made into inputs)."""
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
    identity.update(view_fields(config))
    if source is not None and source.kind != "memory":
        identity["preprocessing"] = source.preprocessing
    return identity


def student_identity(*, config, method_cfg, seed: int, source, teacher, targets=None) -> dict:
    """What decides a student: its method, training config, seed, dtype, augmentation (and its views) and
    data, where its targets come from (`config.targets`), and the teacher through the key of the logits its
    targets are built from (`Teacher.key`, or `targets.key` of the views) and, for a logits file, the file's
    sha256."""
    identity = {
        "method": method_cfg.to_dict(),
        "student": training_fields(config.student),
        "seed": seed,
        "dtype": config.dtype,
        "augment": config.data.augment,
        "data": source.fingerprint,
        "teacher_logits": targets.key if targets is not None else teacher.key,
    }
    identity.update(view_fields(config))
    mode = config.get("targets", "fixed")
    if mode != "fixed":
        identity["targets"] = mode
    if teacher.meta.get("logits_sha256"):
        identity["teacher_logits_file"] = teacher.meta["logits_sha256"]
    if source.kind != "memory":
        identity["preprocessing"] = source.preprocessing
    return identity


def recorded_student(saved: dict) -> dict:
    """A student identity recorded before `config.targets`, in today's terms: the method field
    `online_targets` (False: the precomputed rows, today's "fixed"; True: "online") becomes `targets`."""
    method = saved.get("method")
    if not isinstance(method, dict) or "online_targets" not in method:
        return saved
    upgraded = {**saved, "method": {k: v for k, v in method.items() if k != "online_targets"}}
    if method["online_targets"]:
        upgraded["targets"] = "online"
    return upgraded


def view_fields(config) -> dict:
    """With augmentation, the views every model trains on (`data.views`, `data.mixup`): what decides them
    beyond the data and the seed. Nothing without augmentation, so that runs recorded before views are still
    reused."""
    d = config.data
    if not d.augment:
        return {}
    return {"views": d.get("views", 16), "mixup": d.get("mixup", 0.0)}


def identity_key(identity: dict) -> str:
    """8 hex digits of an identity, for a folder name."""
    blob = json.dumps(workdir_lib.jsonable(identity), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def run_folder(parent: str, stem: str, identity: dict) -> str:
    """The folder of the run `identity` among several runs named `<stem>-<key>` in `parent` (a sweep's
    points): a folder there that was claimed with this identity (whatever its key: folders named by an older
    key are reused), else `<stem>-<identity_key(identity)>`."""
    wanted = workdir_lib.jsonable(identity)
    prefix = f"{stem}-"
    names = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
    # A folder with a result first: an older key may have left two folders of the same run.
    names.sort(key=lambda n: not os.path.exists(os.path.join(parent, n, "result.json")))
    for name in names:
        key = name[len(prefix) :]
        if name.startswith(prefix) and "-" not in key and "." not in key:
            recorded = workdir_lib.read_json(os.path.join(parent, name, "run.json"))
            if recorded is not None and recorded_student(recorded) == wanted:
                return os.path.join(parent, name)
    return os.path.join(parent, f"{prefix}{identity_key(identity)}")
