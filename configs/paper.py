"""The DeBKD paper's setup (Li et al. 2024, section 4): ResNet-50 teacher, ResNet-18 or ResNet-8 students,
32x32 images, 70/10/20 split, 3 seeds; the methods of its Table 1 (KD, FKD, DeBKD) and Table 3 (each with and
without knowledge infusion: KD+KI, FKD+KI, DeBKD-noKI). The argument picks the dataset and the student:

    python -m debkd_jax.main --config=configs/paper.py:dogs_vs_cats,resnet18 \
        --workdir=runs/paper/dogs-resnet18
    python -m debkd_jax.main --config=configs/paper.py:dogs_vs_cats,resnet8 \
        --workdir=runs/paper/dogs-resnet8 --config.teacher.checkpoint=runs/paper/dogs-resnet18/teacher
    python -m debkd_jax.main --config=configs/paper.py:digits,resnet8,smoke --workdir=/tmp/paper  # minutes

One workdir per student, one teacher per dataset: the first command trains the ResNet-50 teacher, the second
reuses it through `teacher.checkpoint`. Datasets (`folder:` paths relative to where you run the command, the
repository root; set your own with `--config.data.source=folder:PATH`):

    dogs_vs_cats       folder:../shared/data/dogs_vs_cats_32   (Kaggle Dogs vs Cats, 25,000 images)
    chihuahua_muffin   folder:data/chihuahua_vs_muffin          (Kaggle Chihuahua vs Muffin, 5,917 images)
    car_bike           folder:data/car_vs_bike                  (Kaggle Car vs Bike, 4,000 images)
    digits             the embedded binary digits (not the paper's: to try the setup without a download)

All of it -- 3 datasets x 2 students x 6 methods x 3 seeds, plus the sweeps of configs/sweep_regions.py (the
paper's Table 2) and configs/sweep_beta.py (section 4.4.2) -- is hours of GPU time: a ResNet-50 teacher and
36 students per dataset, 100 epochs each, and FKD runs the teacher in every student step. On one GPU:

    for d in dogs_vs_cats chihuahua_muffin car_bike; do
      t=runs/paper/$d-resnet18/teacher
      for s in resnet18 resnet8; do
        python -m debkd_jax.main --config=configs/paper.py:$d,$s --workdir=runs/paper/$d-$s \
            --config.teacher.checkpoint=$t
        python -m debkd_jax.sweep --config=configs/sweep_regions.py:$d,$s --workdir=runs/paper/$d-$s \
            --config.teacher.checkpoint=$t
      done
      python -m debkd_jax.sweep --config=configs/sweep_beta.py:$d,resnet8 --workdir=runs/paper/$d-resnet8 \
          --config.teacher.checkpoint=$t
    done

(add `--config.dtype=bfloat16` for speed). The paper gives no optimizer, schedule or augmentation: SGD
(Nesterov 0.9, weight decay 5e-4), peak learning rate 0.05 at batch 64, one warm-up epoch then cosine decay,
100 epochs for teacher and students, no augmentation (the paper lists only resizing and normalization).
Results: workdir/results.md, laid out like the paper's Table 1 (and Table 3 for the +KI / -KI rows).

`gpu` (with either student) is the paper-scale study for an accelerator, the issue on the paper's Table 1:

    python -m results.paper.run_study --out=OUT --seconds=540 --variant=dogs_vs_cats,resnet8,gpu
    python -m results.paper.run_study --out=/tmp/ps --seconds=300 --variant=dogs_vs_cats,resnet8,gpu,smoke

It adds CE alone and DKD to the six methods (Table 1's KD, FKD, DeBKD and Table 3's KD+KI, FKD+KI,
DeBKD-noKI), trains in bfloat16, and uses batch 512 (`GPU_BATCH`) for the teacher and the students with the
peak learning rate scaled linearly from 0.05 at batch 64 to 0.4 (`gpu_learning_rate`), warmed up over 5
epochs (`GPU_WARMUP_EPOCHS`) instead of 1. Why: the paper gives no batch size, optimizer or schedule. At batch
64 a ResNet-8 step on a GPU is bound by its launch latency (the 1-seed study of results/gpu/ ran about 7k
images/s); at 512 it ran 242k images/s in bfloat16 (benchmarks/results/gpu-h200-2026-12-04/), and 17,500
training images still give 34 steps per epoch, 3,400 in 100 epochs (at 2048 only 8). Scaling the learning
rate with the batch keeps the update per image of the recipe above (Goyal et al. 2017, "Accurate, large
minibatch SGD"); their gradual warm-up over 5 epochs stands in for the recipe's 1 epoch, which at 512 would be
34 steps. Everything else is the paper's setup above: all images, 100 epochs, 3 seeds, no augmentation. With
`smoke` too: the same flags on tiny models and data (config_lib.smoke: resnet_tiny, 2 epochs, batch 32, 60
images per class), still 3 seeds: the study's command tested on a CPU. docs/paper.md has the GPU command.
"""

from debkd_jax import config_lib

DATASETS = {
    "dogs_vs_cats": "folder:../shared/data/dogs_vs_cats_32",
    "chihuahua_muffin": "folder:data/chihuahua_vs_muffin",
    "car_bike": "folder:data/car_vs_bike",
    "digits": "digits",
}
STUDENTS = ("resnet18", "resnet8")
METHODS = ("KD", "KD+KI", "FKD", "FKD+KI", "DeBKD", "DeBKD-noKI")
# `gpu`: the study's methods, the paper's six plus the student alone and DKD.
GPU_METHODS = ("CE", *METHODS, "DKD")
NUM_EPOCHS = 100
BASE_BATCH, BASE_LEARNING_RATE = 64, 0.05  # config_lib.train_config's recipe
GPU_BATCH = 512
GPU_WARMUP_EPOCHS = 5.0
GPU_EVAL_BATCH = 1024


def gpu_learning_rate(batch_size: int = GPU_BATCH) -> float:
    """The recipe's peak learning rate scaled linearly to `batch_size`: 0.05 * batch_size / 64 (512: 0.4)."""
    return BASE_LEARNING_RATE * batch_size / BASE_BATCH


def parse_arg(arg: str | None) -> tuple[str, str, bool, bool]:
    """'DATASET,STUDENT[,gpu][,smoke]' (any order, each optional) -> (dataset, student, smoke, gpu)."""
    dataset, student, smoke, gpu = "dogs_vs_cats", "resnet18", False, False
    for token in (t.strip() for t in (arg or "").split(",") if t.strip()):
        if token in DATASETS:
            dataset = token
        elif token in STUDENTS:
            student = token
        elif token == "smoke":
            smoke = True
        elif token == "gpu":
            gpu = True
        else:
            raise ValueError(
                f"unknown config argument {token!r}: give DATASET,STUDENT[,gpu][,smoke] with DATASET one of "
                f"{sorted(DATASETS)} and STUDENT one of {STUDENTS}, e.g. paper.py:dogs_vs_cats,resnet8."
            )
    return dataset, student, smoke, gpu


def paper_config(arg: str | None, method_names=None):
    """The paper's run config for `arg` (see `parse_arg`); the sweep configs start from it too. The methods
    are `method_names`, by default `METHODS` (`GPU_METHODS` with `gpu`)."""
    dataset, student, smoke, gpu = parse_arg(arg)
    if method_names is None:
        method_names = GPU_METHODS if gpu else METHODS
    config = config_lib.base_config(method_names)
    config.data.source = DATASETS[dataset]
    config.data.augment = False
    # Every field of the base stays (teacher.logits, teacher.variables, ...): only the training ones change.
    config.teacher.update(config_lib.train_config("resnet50", num_epochs=NUM_EPOCHS))
    config.student.update(config_lib.train_config(student, num_epochs=NUM_EPOCHS))
    config.seeds = 3
    if gpu:
        config.dtype = "bfloat16"
        for part in (config.teacher, config.student):
            part.batch_size = GPU_BATCH
            part.learning_rate = gpu_learning_rate(GPU_BATCH)
            part.warmup_epochs = GPU_WARMUP_EPOCHS
            part.eval_batch_size = GPU_EVAL_BATCH
    if smoke:
        config = config_lib.smoke(config)
        # The study's seed loop is what a smoke run of `gpu` tests: its 3 seeds stay.
        config.seeds = 3 if gpu else 2
    return config


def get_config(arg: str | None = None):
    return paper_config(arg)
