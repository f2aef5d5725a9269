"""The paper's section 4.4.2: DeBKD over the mixing weight beta in {0.1, 0.2, 0.3, 0.4, 0.5} (the paper finds
0.1-0.3 stable and a decline above 0.3; its default is 0.2), in the paper's setup (configs/paper.py). The
argument picks the dataset and the student as there:

    python -m debkd_jax.sweep --config=configs/sweep_beta.py:dogs_vs_cats,resnet8 --workdir=runs/paper/dogs
    python -m debkd_jax.sweep --config=configs/sweep_beta.py:digits,resnet8,smoke --workdir=/tmp/sweep

One teacher for the whole sweep (the workdir's teacher/), one student per beta and seed; finished points are
reused on a re-run. Writes workdir/sweep-beta-<student>.{md,json,png}. Hours of GPU time for all of the
paper's datasets and both students.
"""

import os

from debkd_jax import config_lib, sweep

paper = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "paper.py"))


def get_config(arg: str | None = None):
    config = paper.paper_config(arg, method_names=("DeBKD",))
    config.sweep = sweep.sweep_block(
        "beta", "DeBKD", "beta", (0.1, 0.2, 0.3, 0.4, 0.5), x_label="mixing weight beta"
    )
    return config
