"""Hinton's KD (alpha = 0.9, T = 4), with and without knowledge infusion.

    python -m debkd_jax.main --config=configs/kd.py --workdir=runs/kd
    python -m debkd_jax.main --config=configs/kd.py:smoke --workdir=/tmp/kd_smoke
"""

from debkd_jax import config_lib


def get_config(arg: str | None = None):
    config = config_lib.base_config(("KD", "KD+KI"))
    return config_lib.smoke(config) if arg == "smoke" else config
