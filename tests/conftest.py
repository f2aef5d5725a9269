"""Test configuration: 8 fake CPU devices and short compile times.

Both must be set before JAX initialises its backends, so they live here, at import time of the test session.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tiny models and data: compile time dominates, so compile unoptimised (the flax examples do the same).
# Set in the environment so the CLI subprocesses the tests start inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "dogs_vs_cats_32"


@pytest.fixture(scope="session")
def dogs_vs_cats_dir():
    """The real 32x32 Dogs vs Cats images beside the checkout (../shared/data); skipped if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
