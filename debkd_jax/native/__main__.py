"""`python -m debkd_jax.native`: builds the oneDNN conv library ahead of time (into the cache) and checks it.

Prints where the library is, oneDNN's version and threads, then runs the self-check (`native.check`: y, dx and
dw of every geometry class against `lax.conv_general_dilated`, repeated) in a child process under the threads
the native conv will use, killed at its deadline; exits 1 when the native conv cannot run here or fails it.
The verdict is written to the cache that `conv_backward="auto"` reads.

`--json`: runs the check in this process, with guarded scratchpads (`native.set_guarded`), and prints one JSON
line, `{"rows": [...], "failures": [...]}` (what the child of the self-check runs).
"""

import argparse
import json
import os
import sys
import time

from debkd_jax import native
from debkd_jax.native import check


def check_here() -> int:
    built = native.library()
    if not built.ok:
        print(json.dumps({"error": built.reason}))
        return 1
    import jax

    native.set_guarded(True)
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            rows = check.largest_differences()
    except Exception as e:  # a kernel's error, e.g. a write past its scratchpad
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(json.dumps({"rows": [], "failures": [first[:300]], "threads": built.threads}))
        return 0
    print(json.dumps({"rows": rows, "failures": check.failures(rows), "threads": built.threads}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m debkd_jax.native", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="check in this process, print one JSON line")
    parser.add_argument(
        "--deadline",
        type=float,
        default=check.deadline_seconds(),
        help="seconds the self-check's child may take before it is killed",
    )
    args = parser.parse_args(argv)
    if args.json:
        return check_here()
    built = native.library()
    if not built.ok:
        print(f"the native conv cannot run here: {built.reason}", file=sys.stderr)
        return 1
    print(f"library: {built.path}")
    isa = os.environ.get(check.ISA_ENV) or "the CPU's best"
    threads = f"{built.threads} OpenMP thread(s) (${native.THREADS_ENV})"
    print(f"oneDNN {built.onednn_version}, {threads}, ISA: {isa}")
    started = time.monotonic()
    ok, reason = check.verdict(built.path, built.threads, deadline=args.deadline, fresh=True)
    took = time.monotonic() - started
    if not ok:
        print(f"error: the native conv is unsafe here: {reason}", file=sys.stderr)
        return 1
    print(
        f"self-check: y, dx and dw of {len(check.GEOMETRIES)} geometries x {check.REPEATS} calls within "
        f"{check.TOLERANCE:g} of lax.conv_general_dilated ({took:.0f} s)"
    )
    print("ok: conv_backward='onednn' runs natively")
    return 0


if __name__ == "__main__":
    sys.exit(main())
