"""The command-line tools' XLA:CPU defaults (debkd_jax/xla_cpu.py)."""

import os
import sys

import pytest

from debkd_jax import processes, xla_cpu


def test_apply_defaults_adds_the_flag_to_what_is_there():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_cpu.apply_defaults(env) == f"--xla_force_host_platform_device_count=2 {xla_cpu.YNNPACK_OFF}"
    assert xla_cpu.apply_defaults(env) == env["XLA_FLAGS"]  # idempotent
    assert xla_cpu.apply_defaults({}) == xla_cpu.YNNPACK_OFF


def test_apply_defaults_leaves_the_users_choice_alone():
    mine = "--xla_cpu_experimental_ynn_fusion_type=reduce"
    assert xla_cpu.apply_defaults({"XLA_FLAGS": mine}) == mine
    opted_out = {xla_cpu.OPT_OUT: "0", "XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}
    assert xla_cpu.apply_defaults(opted_out) == "--xla_cpu_enable_fast_math=true"
    assert "XLA_FLAGS" not in (empty := {xla_cpu.OPT_OUT: "0"}) and xla_cpu.apply_defaults(empty) == ""


_PROBE = """
from debkd_jax import xla_cpu
import jax, jax.numpy as jnp
xla_cpu.apply_defaults()  # after `import jax`, before the first computation: as the CLIs do
rows = jnp.ones((64, 100))
print(jax.jit(lambda r: jnp.sum(jnp.exp(r), -1)).lower(rows).compile().as_text().count("__ynn_fusion"))
"""


@pytest.mark.parametrize("opt_out", [False, True])
def test_the_flag_reaches_the_compiler(opt_out):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT)}
    if opt_out:
        env[xla_cpu.OPT_OUT] = "0"
    out = processes.run([sys.executable, "-c", _PROBE], env=env, timeout=120, check=True)
    ynn_fusions = int(out.stdout.strip().splitlines()[-1])
    assert (ynn_fusions > 0) if opt_out else (ynn_fusions == 0)
