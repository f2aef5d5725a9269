"""k-class DeBKD (the paper's stated future work) through the box-simplex projection, against KD, on the
embedded 10-class handwritten digits (no download):

    python -m debkd_jax.main --config=configs/multiclass.py --workdir=runs/digits10
    python -m debkd_jax.main --config=configs/multiclass.py:smoke --workdir=/tmp/digits10   # seconds

Precision, recall and F1 are macro averages over the k classes. Any field can be overridden, e.g. the 10-class
digits of another config: `--config.data.digits_classes=10`.

CIFAR-10 / CIFAR-100 through TFDS: `configs/multiclass.py:cifar10` (or `:cifar100`) reads `tfds:cifar10`.
Nothing is downloaded: prepare the dataset once where there is internet,

    tfds build cifar10 --file_format=array_record --data_dir=DIR

copy DIR here and add `--config.data.tfds_data_dir=DIR` (or leave it out for TFDS's default
~/tensorflow_datasets). `--config.data.use_dataset_test_split=True` keeps CIFAR's own test split as the test
set (the train split is then split train/val 7:1). With CIFAR-100's 100 classes most of the teacher's
probabilities lie in the bottom region [0, 1/n), which a student meets easily: the de-biased term acts mainly
on the target class and the few likely ones (docs/method.md §5.3).
"""

from debkd_jax import config_lib

SOURCES = {"digits": "digits", "cifar10": "tfds:cifar10", "cifar100": "tfds:cifar100"}


def get_config(arg: str | None = None):
    """arg: comma-separated, each optional: a source (digits, cifar10, cifar100) and 'smoke'."""
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    config = config_lib.base_config(("KD", "DeBKD"))
    config.data.digits_classes = 10
    for token in tokens:
        if token in SOURCES:
            config.data.source = SOURCES[token]
        elif token != "smoke":
            raise ValueError(f"unknown config argument {token!r}: give any of {sorted(SOURCES)} and 'smoke'.")
    if "smoke" in tokens:
        config = config_lib.smoke(config)
        config.data.max_per_class = 20
    return config
