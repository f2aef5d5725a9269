"""Where the students' targets come from, with augmentation on (docs/method.md §11): the same study three
times, `targets = "fixed"` (the teacher on the un-augmented image), `"online"` (the teacher in every step, on
the view the student sees) and `"stored"` (its logits on every view, computed once), for KD and DeBKD, 3
seeds, on the CPU-scale Dogs vs Cats of configs/study.py (2,860 images per class, ResNet8x4 teacher, ResNet-8
students) with pad-4 crops and flips, one view per student epoch. The argument is `[MODE][,smoke]` (MODE
stored if not given):

    python -m debkd_jax.main --config=configs/targets_study.py:fixed --workdir=runs/targets/fixed
    python -m debkd_jax.main --config=configs/targets_study.py:online --workdir=runs/targets/online \\
        --config.teacher.checkpoint=runs/targets/fixed/teacher
    python -m debkd_jax.main --config=configs/targets_study.py:stored --workdir=runs/targets/stored \\
        --config.teacher.checkpoint=runs/targets/fixed/teacher
    python -m debkd_jax.render --compare=results/study/targets/stored_vs_fixed --labels=fixed,stored \\
        runs/targets/fixed/results.json runs/targets/stored/results.json      # and online vs fixed, stored vs
        online

The three share one teacher (trained with the same views), the seeds and so each student's initialization and
batch order: the paired differences between two modes are the targets' alone. About 40 minutes on 2 CPU cores.
"""

import os

from debkd_jax import config_lib

study = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "study.py"))
MODES = ("fixed", "online", "stored")


def get_config(arg: str | None = None):
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    modes = [t for t in tokens if t in MODES]
    unknown = [t for t in tokens if t not in (*MODES, "smoke")]
    if len(modes) > 1 or unknown:
        raise ValueError(
            f"give [MODE][,smoke], MODE one of {MODES}, e.g. targets_study.py:online; got {arg!r}"
        )
    mode = modes[0] if modes else "stored"
    config = study.get_config("dogs_vs_cats,smoke" if "smoke" in tokens else "dogs_vs_cats")
    config.methods = {name: config.methods[name] for name in ("KD", "DeBKD")}
    config.data.augment = True
    config.data.views = config.student.num_epochs  # a new view every epoch
    config.targets = mode
    return config
