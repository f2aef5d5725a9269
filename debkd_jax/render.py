"""`python -m debkd_jax.render RESULTS.json ...`: regenerate a main job's results.md and plots from its JSON.

With `--headline`, print one table row per results.json instead (the README's study table):
`python -m debkd_jax.render --headline results/study/*/results.json`.

Reports are generated, never edited by hand: this rebuilds them from the JSON alone (`report.render`), for
example after the report's layout changed or for results copied out of a workdir (results/ in this repo).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from debkd_jax import cli, report, workdir_lib
from debkd_jax.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m debkd_jax.render",
        description="Regenerate results.md and the plots beside a results.json (from the JSON alone).",
    )
    parser.add_argument("results", nargs="+", help="results.json files written by python -m debkd_jax.main")
    parser.add_argument("--headline", action="store_true", help="print one summary row per results.json")
    args = parser.parse_args(argv)
    with cli.user_errors():
        if args.headline:
            studies = {}
            for path in args.results:
                results = workdir_lib.read_json(path)
                if not isinstance(results, dict) or "methods" not in results:
                    raise UserError(f"{path} is not a results.json written by python -m debkd_jax.main.")
                studies[os.path.basename(os.path.dirname(os.path.abspath(path)))] = results
            print(report.headline_table(studies))
            return 0
        for path in args.results:
            print("wrote " + ", ".join(report.render(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
