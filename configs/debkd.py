"""DeBKD against plain KD and the student alone (CE): same teacher, same student, same seed and data order.

    python -m debkd_jax.main --config=configs/debkd.py --workdir=runs/debkd
    python -m debkd_jax.main --config=configs/debkd.py:smoke --workdir=/tmp/debkd_smoke   # seconds
    python -m debkd_jax.main --config=configs/debkd.py \
        --config.data.source=folder:../shared/data/dogs_vs_cats_32 --workdir=runs/dogs_vs_cats

Defaults: embedded digits data (binary "0-4" vs "5-9"), ResNet8x4 teacher (6 epochs), ResNet8 students (15
epochs), DeBKD with knowledge infusion, n = 12 regions, beta = 0.2, T = 4 (docs/method.md §3-5).
"""

from debkd_jax import config_lib


def get_config(arg: str | None = None):
    config = config_lib.base_config(("CE", "KD", "DeBKD"))
    return config_lib.smoke(config) if arg == "smoke" else config
