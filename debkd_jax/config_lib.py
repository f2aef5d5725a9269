"""Configs: the run config every `configs/*.py` starts from, the `smoke` shrink used by tests and quick
checks,
the one loader of config files, and the validation of a whole config.

Optimizer defaults (the paper gives none): SGD with Nesterov momentum 0.9, weight decay 5e-4 on conv and dense
kernels, one warm-up epoch then cosine decay to 0, peak learning rate 0.05 at batch 64 -- the usual CIFAR
ResNet recipe (mdistiller, torchdistill) scaled linearly to the batch size.
"""

from __future__ import annotations

import importlib.util
import os
import re

import ml_collections

from debkd_jax import config_checks, method_configs
from debkd_jax.errors import UserError

# Training fields added after runs were first recorded: a run's identity holds them only where they differ
# from these defaults (`pipeline.identity.training_fields`), so the runs recorded before are still reused.
LATER_TRAINING_DEFAULTS = dict(nesterov=True, lr_schedule="cosine", lr_decay_epochs=(), lr_decay_rate=0.1)
LR_SCHEDULES = ("cosine", "step")


def train_config(model: str, num_epochs: int, batch_size: int = 64, learning_rate: float = 0.05):
    """How one network (the teacher or the students) trains: SGD with momentum (Nesterov unless `nesterov` is
    False), weight decay on kernels, and `lr_schedule` "cosine" (`warmup_epochs` of linear warm-up, then
    cosine decay to 0) or "step" (`learning_rate` times `lr_decay_rate` at each epoch of
    `lr_decay_epochs`)."""
    return ml_collections.ConfigDict(
        dict(
            model=model,
            num_epochs=num_epochs,
            batch_size=batch_size,
            eval_batch_size=256,
            learning_rate=learning_rate,
            momentum=0.9,
            weight_decay=5e-4,
            warmup_epochs=1.0,
            **LATER_TRAINING_DEFAULTS,
        )
    )


def cluster_config() -> ml_collections.ConfigDict:
    """How the processes of a `distributed=True` job find each other (README, "Multi-device and multi-host").

    JAX detects Cloud TPU, SLURM, Open MPI and Kubernetes jobs: leave the first three fields unset there. Set
    all three where it does not (two processes on one machine, say). Not part of a run's settings.
    """
    return ml_collections.ConfigDict(
        dict(
            coordinator_address="",  # "host:port" where process 0 serves the job's coordination; "" = detect
            num_processes=0,  # 0 = detect
            process_id=-1,  # this process, 0 .. num_processes - 1; -1 = detect
            initialization_timeout=300,  # seconds to wait for the coordinator and every process to join
            # A process silent this long (killed, its host down) is declared dead and the others stop with
            # an error; also the longest wait at exit for the other processes to finish.
            heartbeat_timeout=30,
        )
    )


def base_config(method_names=("KD", "DeBKD")) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.seeds = 1  # students are trained for seeds seed, seed+1, ...; results give mean and std
    config.dtype = "float32"  # compute dtype: "bfloat16" on TPU/GPU
    # How the convs' gradients are computed, same values: "materialized" (conv VJP through a fusion barrier,
    # faster on XLA:CPU), "xla" (plain; right for GPU/TPU), "auto" (materialized when training on CPU). Not
    # part of a run's settings (run.json): changing it resumes and reuses runs as they are.
    config.conv_backward = "auto"
    config.progress = True
    # True: retrain students already in the workdir and replace a teacher trained with other settings; the old
    # folders are renamed <folder>.<time>, never deleted. False: reuse finished work, resume interrupted work,
    # refuse a folder whose settings differ (docs/reliability.md).
    config.overwrite = False
    config.distributed = False  # call jax.distributed.initialize(): several processes (hosts) form one job
    config.cluster = cluster_config()

    config.data = ml_collections.ConfigDict()
    config.data.source = "digits"  # "digits" | "folder:PATH" | "tfds:NAME"
    config.data.cache_dir = "~/.cache/debkd_jax"  # decoded images are cached here; "" disables
    config.data.image_size = 32
    config.data.max_per_class = 0  # 0 = all images; >0 a seeded subset per class
    config.data.digits_classes = 2  # digits: 2 = "0-4" vs "5-9", 10 = ten digits
    config.data.tfds_data_dir = ""
    config.data.use_dataset_test_split = False
    config.data.augment = False  # random crop (pad 4) + flip on device; streamed: random-resized crop + flip
    # With augment: image i trains on view (epoch mod views), a pure function of (seed, i, view), so that the
    # teacher's logits on every view can be stored once for every method and seed (config.targets).
    config.data.views = 16
    # > 0: each view mixed with a partner's, lam ~ Beta(mixup, mixup) folded onto [0.5, 1].
    config.data.mixup = 0.0
    # "memory": decode the source once into memory (the default, for data that fits); "stream": read it
    # with grain,
    # a batch at a time, per host (docs/scale.md); "auto": stream when the decoded images would not fit
    # comfortably.
    config.data.pipeline = "memory"
    config.data.eval_crop = 224 / 256  # streamed eval: shorter side to image_size / eval_crop, center crop
    config.data.workers = 2  # streamed: grain worker processes decoding and augmenting (0: threads here)
    config.data.logits_chunk_rows = 1024  # streamed: rows per teacher-logits chunk file

    # Where the students' targets come from (docs/method.md, "Views and targets"): "fixed", the teacher on the
    # un-augmented image (the papers' setup: without augmentation all three are the same); "online", the
    # teacher run in every step on the view the student sees; "stored", the teacher's logits on every view
    # computed once and stored (full rows up to targets_top_k classes, else the top k), for every method and
    # seed.
    config.targets = "fixed"
    config.targets_top_k = 100
    config.teacher = train_config("resnet8x4", num_epochs=6)
    config.teacher.checkpoint = ""  # a finished run's teacher/ folder to reuse instead of training
    # An .npz of the teacher's logits per image id, instead of a teacher network (docs/teachers.md).
    config.teacher.logits = ""
    # The variables (orbax folder or Flax msgpack) of a teacher network teacher.model that is not trained
    # here: a built-in model or any 'package.module:factory' (docs/teachers.md).
    config.teacher.variables = ""
    # K > 1: each training image's teacher logits come from the one of K teachers, each trained on the other
    # K - 1 folds, that did not see it (out-of-fold); val/test logits from the teacher trained on all of them.
    # K + 1 teacher trainings in all (docs/teachers.md).
    config.teacher.folds = 1
    # Streamed: the teacher-logits store's dtype ("float16" and "bfloat16" halve it).
    config.teacher.logits_dtype = "float32"
    config.student = train_config("resnet8", num_epochs=15)

    config.methods = ml_collections.ConfigDict({name: method_configs.preset(name) for name in method_names})
    return config


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a config to seconds: tiny models, 2 epochs, a small data slice."""
    config.teacher.model = "resnet_tiny"
    config.student.model = "resnet_tiny"
    for part in (config.teacher, config.student):
        part.num_epochs = 2
        part.batch_size = 32
        part.eval_batch_size = 128
        part.learning_rate = 0.05
    config.data.max_per_class = config.data.max_per_class or 60
    config.progress = False
    return config


def load_config_file(path: str):
    """A config file (`configs/*.py`) as a module, importable from any working folder; `UserError` when it
    cannot be read."""
    if not os.path.isfile(path):
        raise UserError(f"no config file {os.path.abspath(path)}; see configs/ for the configs.")
    name = "debkd_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot load the config file {path}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config named by `path[:arg]`, as `--config=path[:arg]` names it."""
    path, _, arg = spec.partition(":")
    module = load_config_file(path)
    return module.get_config(arg) if arg else module.get_config()


def validate_config(config) -> None:
    """Checks the whole config up front, with messages naming the field and the valid values.

    Raises `UserError` (the CLI prints it and exits with status 2). With `config.distributed`, call
    `training.initialize_distributed` first: the batch-size check needs the global device count.
    """
    # Here, not at the top: config files import this module, and a distributed job's launching process loads
    # them without JAX (debkd_jax.supervisor).
    import jax

    from debkd_jax import methods, models

    config_checks.validate_cluster(config)
    config_checks.validate_data_fields(config)
    if not config.methods:
        raise UserError("config.methods is empty: name at least one method, e.g. 'DeBKD'.")
    for name, mcfg in config.methods.items():
        try:
            methods.validate(name, mcfg)
        except (ValueError, TypeError) as e:
            raise UserError(str(e)) from e
    for part in ("teacher", "student"):
        c = config[part]
        if models.is_factory_spec(c.model):
            try:
                models.load_factory(c.model)
            except UserError as e:
                raise UserError(f"{part}.{e}") from e
        elif c.model not in models.MODELS:
            raise UserError(
                f"{part}.model={c.model!r} is not one of {sorted(models.MODELS)}, nor a Flax module factory "
                "'package.module:factory' (docs/teachers.md)."
            )
        for field in ("num_epochs", "batch_size", "eval_batch_size"):
            if not (config_checks.is_int(c[field]) and c[field] >= 1):
                raise UserError(f"{part}.{field}={c[field]!r} must be an integer >= 1.")
        validate_schedule(part, c)
        for field, ok, want in (
            ("learning_rate", lambda v: v > 0, "> 0"),
            ("weight_decay", lambda v: v >= 0, ">= 0"),
            ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("warmup_epochs", lambda v: v >= 0, ">= 0"),
        ):
            if not (config_checks.is_number(c[field]) and ok(c[field])):
                raise UserError(f"{part}.{field}={c[field]!r} must be a finite number {want}.")
        ndev = jax.device_count()
        if c.batch_size % ndev:
            raise UserError(
                f"{part}.batch_size={c.batch_size} is not divisible by the {ndev} devices; "
                f"use a multiple of {ndev}."
            )
    if not isinstance(config.teacher.get("checkpoint", ""), str):
        raise UserError(f"teacher.checkpoint={config.teacher.checkpoint!r} must be a path (a string).")
    config_checks.validate_teacher_logits(config)
    config_checks.validate_targets(config)
    if not (config_checks.is_int(config.seeds) and config.seeds >= 1):
        raise UserError(f"seeds={config.seeds!r} must be an integer >= 1.")
    if not (config_checks.is_int(config.seed) and config.seed >= 0):
        raise UserError(f"seed={config.seed!r} must be an integer >= 0.")
    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype={config.dtype!r} is not one of ('float32', 'bfloat16', 'float16').")
    conv_backward = config.get("conv_backward", "auto")
    if conv_backward not in models.CONV_BACKWARD_SETTINGS:
        raise UserError(f"conv_backward={conv_backward!r} is not one of {models.CONV_BACKWARD_SETTINGS}.")
    d = config.data
    if not (isinstance(d.source, str) and d.source):
        raise UserError(f"data.source={d.source!r} must be 'digits', 'folder:PATH' or 'tfds:NAME'.")
    if not (config_checks.is_int(d.image_size) and d.image_size >= 1):
        raise UserError(f"data.image_size={d.image_size!r} must be an integer >= 1.")
    if not (config_checks.is_int(d.max_per_class) and (d.max_per_class == 0 or d.max_per_class >= 3)):
        raise UserError(
            f"data.max_per_class={d.max_per_class!r} must be 0 (all images) or an integer >= 3 (one image "
            "per class for each of train, val and test)."
        )


def validate_schedule(part: str, c) -> None:
    """`lr_schedule` and the fields only one schedule reads: a field the schedule would ignore is refused."""
    schedule = c.get("lr_schedule", "cosine")
    if schedule not in LR_SCHEDULES:
        raise UserError(f"{part}.lr_schedule={schedule!r} is not one of {LR_SCHEDULES}.")
    if not isinstance(c.get("nesterov", True), bool):
        raise UserError(f"{part}.nesterov={c.nesterov!r} must be True or False.")
    epochs = c.get("lr_decay_epochs", ())
    if not (isinstance(epochs, (tuple, list)) and all(config_checks.is_number(e) and e > 0 for e in epochs)):
        raise UserError(
            f"{part}.lr_decay_epochs={epochs!r} must be a tuple of epochs > 0, e.g. (30, 60, 90)."
        )
    rate = c.get("lr_decay_rate", 0.1)
    if not (config_checks.is_number(rate) and 0 < rate):
        raise UserError(f"{part}.lr_decay_rate={rate!r} must be a finite number > 0.")
    if schedule == "cosine" and (tuple(epochs) or rate != LATER_TRAINING_DEFAULTS["lr_decay_rate"]):
        raise UserError(
            f"{part}.lr_decay_epochs/lr_decay_rate set a step schedule, but {part}.lr_schedule='cosine' "
            "ignores "
            f"them; set {part}.lr_schedule='step' or leave them at () and 0.1."
        )
    if schedule == "step" and c.warmup_epochs:
        raise UserError(
            f"{part}.warmup_epochs={c.warmup_epochs!r} has no effect with {part}.lr_schedule='step' "
            "(no warm-up); "
            "set it to 0."
        )
