"""Subprocesses with a deadline: one-shot JSON workers and a long-lived line-protocol worker.

Every wait has a timeout. A worker that misses it is killed (its whole process group) and the caller gets a
`WorkerTimeout` naming the section and what it waited for. A worker also dies with the thread that started it
(`debkd_jax.processes`), so a benchmark or test process that is itself killed leaves no worker behind.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import tempfile
import time

from debkd_jax import processes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WorkerTimeout(RuntimeError):
    """A benchmark subprocess did not answer in time and was killed."""


class WorkerFailed(RuntimeError):
    """A benchmark subprocess exited with an error."""


def run_json(cmd: list[str], *, env: dict, timeout: float, section: str, what: str) -> dict:
    """Runs `cmd` to completion and returns the JSON object on its last stdout line."""
    try:
        done = processes.run(cmd, env=env, cwd=REPO_ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise WorkerTimeout(f"{section}: {what} did not finish within {timeout:.0f} s; killed it") from None
    if done.returncode != 0:
        tail = done.stderr.strip()[-400:]
        raise WorkerFailed(f"{section}: {what} exited with status {done.returncode}: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_env(drop_flags: tuple[str, ...] = (), **extra: str) -> dict:
    """This process's environment without the XLA flags starting with `drop_flags`, plus `extra`."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(drop_flags)]
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(extra)
    return env


class LineWorker:
    """A child process answering one JSON line on stdout for each JSON request line on stdin."""

    def __init__(self, cmd: list[str], *, env: dict, name: str):
        self.name = name
        # stderr to a file: a pipe nobody reads would fill up and stall the child.
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = processes.popen(
            cmd,
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
        )

    def request(self, op: str, *, timeout: float, section: str, **fields) -> dict:
        """Sends {'op': op, **fields} and waits at most `timeout` seconds for the answer."""
        if self.proc.poll() is not None:
            raise WorkerFailed(f"{section}: {self.name} has exited ({self.proc.returncode}) before {op!r}")
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        line = self._read_line(timeout)
        if line is None:
            self.kill()
            raise WorkerTimeout(
                f"{section}: {self.name} did not answer {op!r} {fields or ''} within {timeout:.0f} s; "
                "killed it"
            )
        if not line:
            self.proc.wait(timeout=timeout)
            raise WorkerFailed(f"{section}: {self.name} exited during {op!r}: {self.stderr_tail()}")
        answer = json.loads(line)
        if "error" in answer:
            raise WorkerFailed(f"{section}: {self.name} failed on {op!r}: {answer['error']}")
        return answer

    def _read_line(self, timeout: float) -> str | None:
        """One line from the child's stdout, '' at its end, None when the deadline passes first."""
        deadline = time.monotonic() + timeout
        stream = self.proc.stdout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([stream], [], [], left)
            if ready:
                return stream.readline()

    def stderr_tail(self, chars: int = 400) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-chars:].strip()

    def kill(self) -> None:
        processes.kill_group(self.proc)

    def close(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
