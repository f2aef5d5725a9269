"""What CI requires of the suite (tests/conftest.py): with `CI=true` nothing passes by skipping. Each case
runs pytest in a subprocess, as .ci/run does, with torch hidden where the case needs it gone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO_ROOT, missing_requirements

from debkd_jax import processes

# Runs pytest on argv[1:], first hiding torch if HIDE_TORCH is set: a None entry in sys.modules makes both
# `import torch` and `importlib.util.find_spec("torch")` find nothing, as on a machine without it.
RUN_PYTEST = textwrap.dedent(
    """
    import os, sys
    if os.environ.get("HIDE_TORCH"):
        sys.modules["torch"] = None
    import pytest
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--durations=0", *sys.argv[1:]]))
    """
)


def run_pytest(*args, ci: bool, hide_torch: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "HIDE_TORCH", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)])
    if ci:
        env["CI"] = "true"
    if hide_torch:
        env["HIDE_TORCH"] = "1"
    return processes.run(
        [sys.executable, "-c", RUN_PYTEST, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=240,
    )


PEER_TESTS = "tests/test_torch_peer.py"


@pytest.mark.timeout(300)
def test_without_torch_ci_stops_at_the_start_naming_it():
    proc = run_pytest(PEER_TESTS, ci=True, hide_torch=True)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "CI=true and the suite's requirements are missing: torch, the PyTorch peer" in out, out[-3000:]


@pytest.mark.timeout(300)
def test_in_ci_a_skipping_test_fails_with_its_reason(tmp_path):
    if missing_requirements():
        pytest.skip(f"a CI run here would stop at its start: {missing_requirements()}")
    case = tmp_path / "test_case.py"
    case.write_text("import pytest\n\ndef test_skips():\n    pytest.skip('no widget here')\n")
    # Outside tests/, so the suite's conftest is loaded as a plugin (-p conftest, from PYTHONPATH).
    proc = run_pytest("-p", "conftest", str(case), ci=True)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "CI=true runs every check, and this one skipped: Skipped: no widget here" in proc.stdout
    assert "1 failed" in proc.stdout
    proc = run_pytest("-p", "conftest", str(case), ci=False)
    assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout[-3000:]
