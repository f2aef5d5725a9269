"""The evidence study: one teacher, then every method a reader needs beside the DeBKD paper's Tables 1 and 3,
for several seeds (the same seed gives every method the same initialization and data order). Checkpoints are
chosen on validation; test metrics are reported with paired differences against KD and CE.

    CE            the student alone (no teacher)
    KD, KD+KI     Hinton's KD, without / with knowledge infusion
    FKD           KD + FitNets hints (teacher online)
    DeBKD         KI + regions (n = 12) + the de-biased loss (beta 0.2, T 4)
    DeBKD-noKI    DeBKD without knowledge infusion
    DKD           decoupled KD
    BTKD-swap     BTKD with swap rectification and the cos^2 schedule
    DeBKD+BTKD    DeBKD regions on BTKD-rectified logits

The argument is `DATASET[,SCALE][,STUDENT][,foldsK][,smoke]`; `foldsK` (K >= 2) sets teacher.folds = K, the
students' targets on the training images then come from K fold teachers (out-of-fold; docs/teachers.md):

    python -m debkd_jax.main --config=configs/study.py:dogs_vs_cats --workdir=runs/study/dogs_vs_cats
    python -m debkd_jax.main --config=configs/study.py:digits --workdir=runs/study/digits
    python -m debkd_jax.main --config=configs/study.py:digits10 --workdir=runs/study/digits10
    python -m debkd_jax.main --config=configs/study.py:dogs_vs_cats,paper,resnet18 --workdir=runs/paper-study
    python -m debkd_jax.main --config=configs/study.py:digits,smoke --workdir=/tmp/study   # a minute
    # the last flag is optional: it reuses the folds=1 study's teacher
    python -m debkd_jax.main --config=configs/study.py:dogs_vs_cats,folds3 \
        --workdir=runs/study/dogs_vs_cats_folds3 --config.teacher.checkpoint=runs/study/dogs_vs_cats/teacher

Any `--config.data.source=folder:PATH` (or `tfds:NAME`) replaces the dataset's source.

CPU scale (the default; about an hour on 2 CPU cores for Dogs vs Cats): a seeded, class-balanced subset of
2,860 images per class for image folders (4,004 train / 572 val / 1,144 test), all 1,797 digits; a ResNet8x4
teacher and ResNet8 students, 8 and 10 epochs on image folders, 12 and 15 on the binary digits, 12 and 8 on
the 10-class digits; 3 seeds; DKD's warm-up shortened to 2 epochs (mdistiller ramps over 20 of 240 epochs).
Paper scale (an accelerator): all images, ResNet-50 teacher and ResNet-18 or ResNet-8 students, 100 epochs
each, DKD's warm-up 20 epochs; add `--config.dtype=bfloat16` on GPU/TPU.

The report (workdir/results.md, .json, .png) is described in docs/study.md.
"""

from debkd_jax import config_lib

METHODS = ("CE", "KD", "KD+KI", "FKD", "DeBKD", "DeBKD-noKI", "DKD", "BTKD-swap", "DeBKD+BTKD")
DATASETS = {
    "dogs_vs_cats": dict(source="folder:../shared/data/dogs_vs_cats_32", digits_classes=2),
    "digits": dict(source="digits", digits_classes=2),
    "digits10": dict(source="digits", digits_classes=10),
}
# CPU scale, per dataset: (teacher epochs, student epochs). Image folders cost 3.2x the digits per epoch
# (4,004 vs 1,257 training images), so they get fewer epochs to fit the hour; the 10-class digits' students
# get 8.
CPU_EPOCHS = {"dogs_vs_cats": (8, 10), "digits": (12, 15), "digits10": (12, 8)}
SCALES = ("cpu", "paper")
STUDENTS = ("resnet8", "resnet18")
CPU_IMAGES_PER_CLASS = 2860


def get_config(arg: str | None = None):
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    dataset, scale, student, smoke, folds = "dogs_vs_cats", "cpu", "resnet8", False, 1
    for token in tokens:
        if token.startswith("folds") and token[len("folds") :].isdigit() and int(token[len("folds") :]) >= 2:
            folds = int(token[len("folds") :])
        elif token in DATASETS:
            dataset = token
        elif token in SCALES:
            scale = token
        elif token in STUDENTS:
            student = token
        elif token == "smoke":
            smoke = True
        else:
            raise ValueError(
                f"unknown config argument {token!r}: give DATASET[,SCALE][,STUDENT][,foldsK][,smoke] "
                f"with DATASET one of {sorted(DATASETS)}, SCALE one of {SCALES}, STUDENT one of {STUDENTS}, "
                "K >= 2."
            )
    config = config_lib.base_config(METHODS)
    config.seeds = 3
    config.data.source = DATASETS[dataset]["source"]
    config.data.digits_classes = DATASETS[dataset]["digits_classes"]
    if scale == "cpu":
        config.data.max_per_class = 0 if config.data.source == "digits" else CPU_IMAGES_PER_CLASS
        teacher_epochs, student_epochs = CPU_EPOCHS[dataset]
        config.teacher.update(config_lib.train_config("resnet8x4", num_epochs=teacher_epochs))
        config.student.update(config_lib.train_config(student, num_epochs=student_epochs))
        config.methods.DKD.warmup_epochs = 2
    else:
        config.teacher.update(config_lib.train_config("resnet50", num_epochs=100))
        config.student.update(config_lib.train_config(student, num_epochs=100))
    config.teacher.folds = folds
    if smoke:
        config = config_lib.smoke(config)
        config.data.max_per_class = 40
        config.seeds = 2
    return config
