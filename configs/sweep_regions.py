"""The paper's Table 2: DeBKD over the learning freedom 1/n, n in {8, 10, 12, 14, 16}, in the paper's setup
(configs/paper.py: ResNet-50 teacher, 3 seeds). The argument picks the dataset and the student as there:

    python -m debkd_jax.sweep --config=configs/sweep_regions.py:dogs_vs_cats,resnet8 --workdir=runs/dogs
    python -m debkd_jax.sweep --config=configs/sweep_regions.py:dogs_vs_cats,resnet18 --workdir=runs/dogs
    python -m debkd_jax.sweep --config=configs/sweep_regions.py:digits,resnet8,smoke --workdir=/tmp/sweep

One teacher for the whole sweep (the workdir's teacher/, shared with configs/paper.py runs in the same
workdir), one student per n and seed; finished points are reused on a re-run. Writes
workdir/sweep-regions-<student>.{md,json,png}: test accuracy vs 1/n with error bars over seeds. Five points x
3 seeds with a ResNet-50 teacher is an hour or more of GPU time per dataset and student (the smoke line above
takes a minute or two on a CPU). Other values: `--config.sweep.grid="(4, 8, 12, 24)"`.
"""

import os

from debkd_jax import config_lib, sweep

paper = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "paper.py"))


def get_config(arg: str | None = None):
    config = paper.paper_config(arg, method_names=("DeBKD",))
    config.sweep = sweep.sweep_block(
        "regions",
        "DeBKD",
        "num_regions",
        (8, 10, 12, 14, 16),
        x_label="learning freedom 1/n",
        tick_format="1/{}",
    )
    return config
