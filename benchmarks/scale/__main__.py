"""`python -m benchmarks.scale`: the command-line XLA defaults first (before JAX starts), then the run."""

import sys

from debkd_jax import xla_cpu

xla_cpu.apply_defaults()

from benchmarks.scale.run import main  # noqa: E402

sys.exit(main())
