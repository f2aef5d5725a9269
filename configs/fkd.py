"""FKD: KD plus FitNets hints from the teacher's 1st, 3rd and last blocks (teacher run online), +/- KI.

    python -m debkd_jax.main --config=configs/fkd.py --workdir=runs/fkd
    python -m debkd_jax.main --config=configs/fkd.py:smoke --workdir=/tmp/fkd_smoke
"""

from debkd_jax import config_lib


def get_config(arg: str | None = None):
    config = config_lib.base_config(("FKD", "FKD+KI"))
    return config_lib.smoke(config) if arg == "smoke" else config
