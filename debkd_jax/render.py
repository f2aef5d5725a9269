"""`python -m debkd_jax.render RESULTS.json`: regenerate a main job's results.md and plots from its JSON.

Reports are generated, never edited by hand: this rebuilds them from the JSON alone (`report.render`), for
example after the report's layout changed or for results copied out of a workdir (results/ in this repo).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from debkd_jax import cli, report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m debkd_jax.render",
        description="Regenerate results.md and the plots beside a results.json (from the JSON alone).",
    )
    parser.add_argument("results", help="a results.json written by python -m debkd_jax.main")
    args = parser.parse_args(argv)
    with cli.user_errors():
        written = report.render(args.results)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
