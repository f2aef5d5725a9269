"""XLA:CPU settings the command-line tools start with; the library does not (importing `debkd_jax` changes
nothing).

XLA:CPU (jax 0.10.2) hands convolutions and reductions to YNNPACK fusions by default. On this project's
networks its own emitters are faster (measured by the levers benchmark, folded away since; the figures and
their artifacts: docs/performance-findings-2026-11.md). So `python -m debkd_jax.main`, `.sweep`, `.export`,
`.predict` and `python -m benchmarks` turn YNNPACK fusions off before JAX creates its backend, unless
`XLA_FLAGS` already says something about them or `DEBKD_XLA_CPU_DEFAULTS=0` asks for XLA's own defaults. The
flag only concerns the CPU backend; on GPU/TPU it changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

YNNPACK_OFF = "--xla_cpu_experimental_ynn_fusion_type="
OPT_OUT = "DEBKD_XLA_CPU_DEFAULTS"


def apply_defaults(environ: MutableMapping[str, str] = os.environ) -> str:
    """Add `YNNPACK_OFF` to `environ["XLA_FLAGS"]` unless the user set that flag or
    `DEBKD_XLA_CPU_DEFAULTS=0`. Call before the first JAX computation (the flags are read when the backend
    starts). -> the XLA_FLAGS."""
    flags = environ.get("XLA_FLAGS", "")
    if environ.get(OPT_OUT, "1") != "0" and "xla_cpu_experimental_ynn_fusion_type" not in flags:
        environ["XLA_FLAGS"] = f"{flags} {YNNPACK_OFF}".strip()
    return environ.get("XLA_FLAGS", "")
