"""The DeBKD paper's setup (Li et al. 2024, section 4): ResNet-50 teacher, ResNet-18 or ResNet-8 students,
32x32 images, 70/10/20 split, 3 seeds; the methods of its Table 1 (KD, FKD, DeBKD) and Table 3 (each with and
without knowledge infusion: KD+KI, FKD+KI, DeBKD-noKI). The argument picks the dataset and the student:

    python -m debkd_jax.main --config=configs/paper.py:dogs_vs_cats,resnet18 --workdir=runs/paper/dogs-resnet18
    python -m debkd_jax.main --config=configs/paper.py:dogs_vs_cats,resnet8 --workdir=runs/paper/dogs-resnet8 \
        --config.teacher.checkpoint=runs/paper/dogs-resnet18/teacher
    python -m debkd_jax.main --config=configs/paper.py:digits,resnet8,smoke --workdir=/tmp/paper  # minutes

One workdir per student, one teacher per dataset: the first command trains the ResNet-50 teacher, the second
reuses it through `teacher.checkpoint`. Datasets (`folder:` paths relative to where you run the command, the repository root; set your own
with `--config.data.source=folder:PATH`):

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
NUM_EPOCHS = 100


def parse_arg(arg: str | None) -> tuple[str, str, bool]:
    """'DATASET,STUDENT[,smoke]' (any order, each optional) -> (dataset, student, smoke)."""
    dataset, student, smoke = "dogs_vs_cats", "resnet18", False
    for token in (t.strip() for t in (arg or "").split(",") if t.strip()):
        if token in DATASETS:
            dataset = token
        elif token in STUDENTS:
            student = token
        elif token == "smoke":
            smoke = True
        else:
            raise ValueError(
                f"unknown config argument {token!r}: give DATASET,STUDENT[,smoke] with DATASET one of "
                f"{sorted(DATASETS)} and STUDENT one of {STUDENTS}, e.g. paper.py:dogs_vs_cats,resnet8."
            )
    return dataset, student, smoke


def paper_config(arg: str | None, method_names=METHODS):
    """The paper's run config for `arg` (see `parse_arg`); the sweep configs start from it too."""
    dataset, student, smoke = parse_arg(arg)
    config = config_lib.base_config(method_names)
    config.data.source = DATASETS[dataset]
    config.data.augment = False
    # Every field of the base stays (teacher.logits, teacher.variables, ...): only the training ones change.
    config.teacher.update(config_lib.train_config("resnet50", num_epochs=NUM_EPOCHS))
    config.student.update(config_lib.train_config(student, num_epochs=NUM_EPOCHS))
    config.seeds = 3
    if smoke:
        config = config_lib.smoke(config)
        config.seeds = 2
    return config


def get_config(arg: str | None = None):
    return paper_config(arg)
