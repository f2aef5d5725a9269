"""The run config every `configs/*.py` starts from, and the `smoke` shrink used by tests and quick checks.

Optimizer defaults (the paper gives none): SGD with Nesterov momentum 0.9, weight decay 5e-4 on conv and dense
kernels, one warm-up epoch then cosine decay to 0, peak learning rate 0.05 at batch 64 -- the usual CIFAR
ResNet recipe (mdistiller, torchdistill) scaled linearly to the batch size.
"""

from __future__ import annotations

import ml_collections

from debkd_jax import methods


def train_config(model: str, num_epochs: int, batch_size: int = 64, learning_rate: float = 0.05):
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
    config.distributed = False  # call jax.distributed.initialize() (multi-host TPU pods)

    config.data = ml_collections.ConfigDict()
    config.data.source = "digits"  # "digits" | "folder:PATH" | "tfds:NAME"
    config.data.cache_dir = "~/.cache/debkd_jax"  # decoded images are cached here; "" disables
    config.data.image_size = 32
    config.data.max_per_class = 0  # 0 = all images; >0 a seeded subset per class
    config.data.digits_classes = 2  # digits: 2 = "0-4" vs "5-9", 10 = ten digits
    config.data.tfds_data_dir = ""
    config.data.use_dataset_test_split = False
    config.data.augment = False  # random crop (pad 4) + flip on device

    config.teacher = train_config("resnet8x4", num_epochs=6)
    config.teacher.checkpoint = ""  # a finished run's teacher/ folder to reuse instead of training
    config.student = train_config("resnet8", num_epochs=15)

    config.methods = ml_collections.ConfigDict({name: methods.preset(name) for name in method_names})
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
