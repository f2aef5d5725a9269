"""`python -m debkd_jax.render RESULTS.json ...`: regenerate a main job's results.md and plots from its JSON.

With `--headline`, print one table row per results.json instead (the README's study table):
`python -m debkd_jax.render --headline results/study/*/results.json`.

With `--compare=OUT_DIR` and two results.json (same data and seeds), write the per-method paired comparison of
the second against the first to OUT_DIR/comparison.{json,md,png}, e.g. teacher.folds=1 against 3:
`python -m debkd_jax.render --compare=results/study/folds results/study/dogs_vs_cats/results.json
results/study/dogs_vs_cats_folds3/results.json`. Each run is labelled by its folder's name, or by
`--labels=A,B`.

Reports are generated, never edited by hand: this rebuilds them from the JSON alone (`report.render`), for
example after the report's layout changed or for results copied out of a workdir (results/ in this repo).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from debkd_jax import cli, report
from debkd_jax.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m debkd_jax.render",
        description="Regenerate results.md and the plots beside a results.json (from the JSON alone).",
    )
    parser.add_argument("results", nargs="+", help="results.json files written by python -m debkd_jax.main")
    parser.add_argument("--headline", action="store_true", help="print one summary row per results.json")
    parser.add_argument(
        "--compare", metavar="OUT_DIR", help="write the paired comparison of two results.json to OUT_DIR"
    )
    parser.add_argument(
        "--labels", metavar="A,B", help="with --compare: the two runs' names (default: their folders' names)"
    )
    args = parser.parse_args(argv)
    with cli.user_errors():
        if args.compare:
            if len(args.results) != 2:
                raise UserError(
                    f"--compare takes two results.json (base, then other), got {len(args.results)}."
                )
            runs = [report.read_results(path) for path in args.results]
            labels = tuple(os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.results)
            if args.labels:
                labels = tuple(label.strip() for label in args.labels.split(","))
                if len(labels) != 2 or not all(labels) or labels[0] == labels[1]:
                    raise UserError(
                        f"--labels={args.labels!r} must name the two runs, e.g. 'folds=1,folds=3'."
                    )
            comparison = report.compare_results(*runs, labels)
            print("wrote " + ", ".join(report.write_comparison(args.compare, comparison)))
            return 0
        if args.headline:
            studies = {}
            for path in args.results:
                studies[os.path.basename(os.path.dirname(os.path.abspath(path)))] = report.read_results(path)
            print(report.headline_table(studies))
            return 0
        for path in args.results:
            print("wrote " + ", ".join(report.render(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
