"""Trains the teacher alone (and a CE-only student as the no-distillation baseline).

    python -m debkd_jax.main --config=configs/teacher.py --workdir=runs/teacher
    # later runs reuse it: --config.teacher.checkpoint=runs/teacher/teacher
"""

from debkd_jax import config_lib


def get_config(arg: str | None = None):
    config = config_lib.base_config(("CE",))
    return config_lib.smoke(config) if arg == "smoke" else config
