"""Every method of both papers in one table, one teacher, the same student, seed and data order for each:

    CE            no distillation (the student alone)
    KD, KD+KI     Hinton's KD (alpha 0.9, T 4), without / with knowledge infusion
    FKD, FKD+KI   KD + FitNets hints from the teacher's 1st, 3rd and last blocks (teacher online), -/+ KI
    DeBKD         KI + de-biasing regions (n = 12) + the de-biased loss (beta 0.2, T 4)
    DeBKD-noKI    DeBKD without knowledge infusion (the paper's Table 3 ablation)
    BTKD-swap     BTKD: easy/hard split by teacher correctness, swap rectification, b(e) = cos^2(pi/2 e/E)
    BTKD-released BTKD with the released code's rectification (calibrate3)
    DeBKD+BTKD    DeBKD regions on BTKD-rectified (swap) logits instead of KI
    DeBKD-cos2    DeBKD with BTKD's cos^2 schedule on beta
    DKD           decoupled KD (alpha 1, beta 8, T 4, 20 warm-up epochs)

    python -m debkd_jax.main --config=configs/methods.py --workdir=runs/methods
    python -m debkd_jax.main --config=configs/methods.py:dogs_vs_cats --workdir=runs/methods_dogs
    python -m debkd_jax.main --config=configs/methods.py:smoke --workdir=/tmp/methods_smoke   # a minute

Defaults: the embedded binary digits, ResNet8x4 teacher, ResNet8 students, 15 epochs (so DKD's 20-epoch
warm-up ramps its distillation term to 15/20 only: --config.methods.DKD.warmup_epochs=N changes it).
Formulas and the choices made where the papers are silent: docs/method.md. Results: workdir/results.md.
"""

from debkd_jax import config_lib

METHODS = (
    "CE",
    "KD",
    "KD+KI",
    "FKD",
    "FKD+KI",
    "DeBKD",
    "DeBKD-noKI",
    "BTKD-swap",
    "BTKD-released",
    "DeBKD+BTKD",
    "DeBKD-cos2",
    "DKD",
)
DATASETS = {"digits": "digits", "dogs_vs_cats": "folder:../shared/data/dogs_vs_cats_32"}


def get_config(arg: str | None = None):
    """arg: comma-separated, each optional: a dataset (digits, dogs_vs_cats) and 'smoke'."""
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    config = config_lib.base_config(METHODS)
    for token in tokens:
        if token in DATASETS:
            config.data.source = DATASETS[token]
        elif token != "smoke":
            raise ValueError(
                f"unknown config argument {token!r}: give any of {sorted(DATASETS)} and 'smoke'."
            )
    return config_lib.smoke(config) if "smoke" in tokens else config
