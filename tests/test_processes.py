"""Child processes never outlive their deadline or their parent (`debkd_jax.processes`), on real processes."""

import os
import signal
import subprocess
import sys
import time

import pytest

from debkd_jax import processes

SLEEP = "import sys, time; time.sleep(600)"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_run_returns_what_subprocess_run_returns():
    done = processes.run([sys.executable, "-c", "import sys; print(sys.stdin.read().upper()); sys.exit(3)"],
                         input="abc", timeout=60)
    assert (done.returncode, done.stdout.strip()) == (3, "ABC")
    with pytest.raises(subprocess.CalledProcessError):
        processes.run([sys.executable, "-c", "raise SystemExit(1)"], timeout=60, check=True)


def test_a_child_past_its_deadline_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    before = set(processes.descendants())
    spawn = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {SLEEP!r}]); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        processes.run([sys.executable, "-c", spawn], timeout=3)
    assert time.monotonic() - started < 15
    assert wait_until(pid_file.exists, 1)
    assert wait_until(lambda: not alive(int(pid_file.read_text())), 5)
    assert set(processes.descendants()) <= before


def test_a_child_dies_with_its_parent(tmp_path):
    """The parent (itself started plainly) starts a child through `popen` and is then SIGKILLed: no handler
    runs in it, yet the child goes too."""
    pid_file = tmp_path / "child.pid"
    parent_code = (
        "import sys, time\n"
        "from debkd_jax import processes\n"
        f"child = processes.popen([sys.executable, '-c', {SLEEP!r}])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        assert wait_until(pid_file.exists, 30)
        child = int(pid_file.read_text())
        assert wait_until(lambda: alive(child), 5)
        assert child in processes.descendants(parent.pid)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    assert wait_until(lambda: not alive(child), 5)


def test_descendants_lists_a_running_child_and_forgets_it_once_killed():
    child = processes.popen([sys.executable, "-c", SLEEP])
    try:
        assert wait_until(lambda: child.pid in processes.descendants(), 5)
    finally:
        processes.kill_group(child)
    assert child.pid not in processes.descendants()
