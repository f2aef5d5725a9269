"""The command line: `python -m debkd_jax.main --config=configs/debkd.py [--workdir=DIR] [--config.FIELD=V]`.

Thin on purpose: it parses flags and calls `train.train_and_evaluate`, which tests call directly too.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "./workdir", "Folder for checkpoints, logs and results.")
config_flags.DEFINE_config_file("config", None, "A config file from configs/ (its docstring says how to run it).",
                                lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    ours = logging.getLogger("debkd_jax")
    ours.setLevel(logging.INFO)
    ours.propagate = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours.addHandler(handler)
    from debkd_jax import report, train
    from debkd_jax.errors import UserError

    try:
        results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(report.results_table(results))
    print(f"\nResults in {FLAGS.workdir}: results.md, results.json, val_accuracy.png")
    return 0


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
