"""The command line: `python -m debkd_jax.main --config=configs/debkd.py [--workdir=DIR] [--config.FIELD=V]`;
`--plan` checks the config and prints what the job would do, writing nothing.

Thin on purpose: it parses flags and calls `pipeline.train_and_evaluate`, which tests call directly too.
Errors the user can fix end with one `error: ...` line and exit status 2 (`debkd_jax.cli`); re-running an
interrupted command resumes it.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from debkd_jax import cli, xla_cpu

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "./workdir", "Folder for checkpoints, logs and results.")
config_flags.DEFINE_config_file(
    "config", None, "A config file from configs/ (its docstring says how to run it).", lock_config=True
)
flags.DEFINE_bool(
    "plan", False, "Check the config as the job would and print what it would do (JSON); write nothing."
)
flags.mark_flags_as_required(["config"])


def main(argv) -> int:
    cli.start(argv)
    cli.supervise(FLAGS.config)
    from debkd_jax import console, pipeline, report

    console.log_to_stderr()
    if "sweep" in FLAGS.config:
        cli.fail(
            f"{cli_config_name()} has a sweep block: run it with python -m debkd_jax.sweep, which trains "
            "one student per value of the sweep."
        )
    if FLAGS.plan:
        import json

        with cli.user_errors():
            described = pipeline.plan(FLAGS.config, FLAGS.workdir)
        print(json.dumps(pipeline.json_ready(described), indent=1, sort_keys=True))
        return 0
    with cli.user_errors(FLAGS.workdir):
        results = pipeline.train_and_evaluate(
            FLAGS.config, FLAGS.workdir, command=" ".join(["python -m debkd_jax.main", *sys.argv[1:]])
        )
    print()
    print(report.results_table(results))
    print(f"\nResults in {FLAGS.workdir}: results.md, results.json, val_accuracy.png")
    return 0


def cli_config_name() -> str:
    spec = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "the config")
    return spec


def run() -> None:
    xla_cpu.apply_defaults()
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
