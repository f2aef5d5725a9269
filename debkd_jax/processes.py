"""Child processes that never outlive their parent or their deadline (stdlib only).

    popen(cmd, **kw)           `subprocess.Popen` in a new session (its own process group) that gets SIGKILL
                               when the thread that started it ends
    kill_group(proc)           SIGKILL to the child's whole process group, then reaps the child
    run(cmd, timeout=...)      `subprocess.run` through `popen`; at the deadline the whole group is killed and
                               `subprocess.TimeoutExpired` raised
    descendants(pid)           the live processes below `pid`, from /proc

On Linux the child asks for that signal itself (`prctl(PR_SET_PDEATHSIG)`, which survives `exec`) in a small
shim that then execs the command: a `preexec_fn` would make Python fork a multithreaded JAX process, which can
deadlock. The signal fires when the *thread* that started the child ends, so start children from a thread that
waits for them. Elsewhere the shim is skipped and the deadline's kill is what remains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

# Runs as `python -S -c SHIM <parent pid> <command...>`: dies with the parent, or exits if it is already gone.
_SHIM = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(125)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group of `proc` (started by `popen`), then reaps it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def popen(cmd, **kwargs) -> subprocess.Popen:
    """`subprocess.Popen(cmd, **kwargs)` (cmd a list) in a new session that dies with this thread."""
    if sys.platform.startswith("linux"):
        cmd = [sys.executable, "-S", "-c", _SHIM, str(os.getpid()), *cmd]
    return subprocess.Popen(cmd, start_new_session=True, **kwargs)


def run(
    cmd, *, timeout: float, capture_output: bool = True, text: bool = True, input=None, check: bool = False,
    **kwargs,
) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, timeout=timeout, ...)` through `popen`: at the deadline the child's whole
    process group is killed (not only the child) before `subprocess.TimeoutExpired` is raised, and nothing of
    the group is left running when it returns."""
    if capture_output:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
    if input is not None:
        kwargs.setdefault("stdin", subprocess.PIPE)
    proc = popen(cmd, text=text, **kwargs)
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        kill_group(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from e
    except BaseException:
        kill_group(proc)
        raise
    finally:
        # The group may hold grandchildren after the child itself has exited.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def descendants(pid: int | None = None) -> list[int]:
    """The live (not zombie) processes below `pid` (default: this process), from /proc; [] elsewhere."""
    pid = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(entry))
    found, todo = [], list(children.get(pid, ()))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, ()))
    return found
