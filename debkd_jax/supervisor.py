"""A multi-process job's launching process: it runs the job as a child and ends every fault in one line.

JAX ends a process of a multi-process job from its C++ runtime, with SIGABRT and a stack trace that Python
cannot catch, whenever its coordination service fails: the coordinator does not answer within the
initialization timeout, a process is missing at start, the coordinator or another process dies, a heartbeat
times out. So with `config.distributed` the command lines run the job as a child process (the same command
line), as torchrun's agent does, and this parent turns however the child ended into the project's one
`error: ...` line and exit status 2:

- the child's own `error:` line (`cli.fail` also sends it here), printed again last if JAX wrote after it;
- otherwise, for a child ended by a signal, a line saying what happened (from where the child had got to and,
  when JAX says it, which process stopped), with the coordinator's address, the timeout involved and the fix.

The parent also says that it is waiting while the child connects (a line at the start, then one every
`WAIT_REPORT_SECONDS`), and ends a child that has not joined the job `JOIN_GRACE_SECONDS` after
`cluster.initialization_timeout`. The child dies with the parent (`PR_SET_PDEATHSIG` on Linux).

The child reports to the parent over a pipe named by the environment variable `CHANNEL`: JSON lines
`{"event": "connecting" | "joined" | "error", ...}`; outside a supervised child, `tell_parent` does nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

CHANNEL = "DEBKD_JAX_SUPERVISOR_FD"
PARENT_PID = "DEBKD_JAX_SUPERVISOR_PID"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
WAIT_REPORT_SECONDS = 30.0
# How long past `cluster.initialization_timeout` a child that has not joined may take before the parent ends
# it: JAX gives up by itself about then (measured: 5-6 s after a 5 s timeout).
JOIN_GRACE_SECONDS = 10.0
# After Ctrl-C, how long a child still connecting (inside JAX's C++ connect, which Python cannot interrupt)
# has to stop before the parent ends it.
INTERRUPT_GRACE_SECONDS = 3.0
TAIL_BYTES = 64 * 1024


# ----------------------------------------------------------------------------------------------------------
# The child's side.


def is_supervised() -> bool:
    """Whether this process is the job that a supervising parent runs."""
    return CHANNEL in os.environ


def start_child() -> None:
    """In a supervised child, first thing: die with the parent (Linux), and stop if it is already gone."""
    if not is_supervised():
        return
    os.set_inheritable(int(os.environ[CHANNEL]), False)  # the job's own subprocesses get no copy
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(os.environ.get(PARENT_PID, os.getppid())):
        os._exit(EXIT_USER_ERROR)


def tell_parent(event: str, **fields) -> None:
    """Sends `event` with `fields` to the supervising parent; nothing outside a supervised child."""
    if not is_supervised():
        return
    fields = {k: v[:2000] if isinstance(v, str) else v for k, v in fields.items()}
    line = json.dumps({"event": event, **fields}).encode() + b"\n"  # under PIPE_BUF (4 KiB): one write
    try:
        os.write(int(os.environ[CHANNEL]), line)
    except OSError:  # the parent is gone; this process is about to be killed with it
        pass


# ----------------------------------------------------------------------------------------------------------
# The parent's side.


class _Tee(threading.Thread):
    """Copies the child's stderr to ours as it comes, keeping its last `TAIL_BYTES`."""

    def __init__(self, source, lock: threading.Lock):
        super().__init__(daemon=True)
        self.source, self.lock, self.tail = source, lock, b""

    def run(self) -> None:
        out = sys.stderr.buffer
        while chunk := os.read(self.source.fileno(), 65536):
            with self.lock, contextlib.suppress(OSError):  # our stderr closed: keep draining the child's
                out.write(chunk)
                out.flush()
            self.tail = (self.tail + chunk)[-TAIL_BYTES:]

    def text(self) -> str:
        return self.tail.decode(errors="replace")

    def last_line(self) -> str:
        lines = [line.strip() for line in re.split(r"[\r\n]", self.text()) if line.strip()]
        return lines[-1] if lines else ""


class Supervisor:
    """Runs `command` as the job and returns the exit status to end with (see the module docstring)."""

    def __init__(self, command: list[str]):
        self.command = command
        self.cluster: dict = {}  # what the child reports when it connects
        self.lock = threading.Lock()
        self.events: dict[str, dict] = {}
        self.connecting_since: float | None = None
        self.next_wait_report = 0.0
        self.ended_by_us: str | None = None  # "join" or "interrupt": why the parent ended the child
        self.interrupted_at: float | None = None

    def say(self, line: str) -> None:
        with self.lock:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def run(self) -> int:
        read_end, write_end = os.pipe()
        env = {**os.environ, CHANNEL: str(write_end), PARENT_PID: str(os.getpid())}
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        # Ctrl-C reaches the child too (same process group): the parent only notes it. SIGTERM and SIGHUP
        # (a scheduler, a closed terminal) are passed on. Python handlers, not SIG_IGN: exec resets them.
        signal.signal(signal.SIGINT, lambda *_: self.note_interrupt())
        try:
            self.child = subprocess.Popen(
                self.command, env=env, pass_fds=(write_end,), stderr=subprocess.PIPE
            )
        finally:
            os.close(write_end)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda s, _: self.child.send_signal(s))
        tee = _Tee(self.child.stderr, self.lock)
        tee.start()
        try:
            self.watch(read_end)
        finally:
            os.close(read_end)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        tee.join(timeout=5)
        return self.conclude(self.child.returncode, tee)

    def note_interrupt(self) -> None:
        self.interrupted_at = self.interrupted_at or time.monotonic()

    def watch(self, read_end: int) -> None:
        """Reads the child's events until it exits; reports waiting, ends a child that cannot join."""
        buffer, exited_at = b"", None
        while True:
            ready, _, _ = select.select([read_end], [], [], 0.5)
            data = os.read(read_end, 65536) if ready else b""
            if ready and not data:
                break  # the end of the pipe: the child is gone
            *lines, buffer = (buffer + data).split(b"\n")
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:  # cut short: the child died while writing it
                    continue
                self.receive(event)
            if self.child.poll() is None:
                self.check_clock(time.monotonic())
            else:  # read what it wrote before it exited; a grandchild holding the pipe is not waited for
                exited_at = exited_at or time.monotonic()
                if not ready and time.monotonic() > exited_at + 1.0:
                    break
        self.child.wait()

    def receive(self, event: dict) -> None:
        self.events[event["event"]] = event
        if event["event"] == "connecting":
            self.connecting_since = time.monotonic()
            self.next_wait_report = self.connecting_since + WAIT_REPORT_SECONDS
            self.cluster.update({k: v for k, v in event.items() if k != "event"})
            self.say(f"distributed: {self.waiting_for()} (up to {self.timeout_words()}).")

    def check_clock(self, now: float) -> None:
        joining = self.connecting_since is not None and "joined" not in self.events
        if joining and now >= self.next_wait_report:
            waited = now - self.connecting_since
            self.say(
                f"distributed: {self.waiting_for(still=True)} ({waited:.0f} s of {self.timeout_words()})."
            )
            self.next_wait_report += WAIT_REPORT_SECONDS
        if joining and now > self.connecting_since + self.cluster["timeout"] + JOIN_GRACE_SECONDS:
            self.end_child("join")
        if self.interrupted_at and "joined" not in self.events:
            if now > self.interrupted_at + INTERRUPT_GRACE_SECONDS:
                self.end_child("interrupt")

    def end_child(self, why: str) -> None:
        if self.ended_by_us is None:
            self.ended_by_us = why
            self.child.kill()

    # -- the words -----------------------------------------------------------------------------------------

    def who(self) -> str:
        joined = self.events.get("joined", {})
        pid = joined.get("process_id", self.cluster.get("process_id"))
        count = joined.get("num_processes", self.cluster.get("num_processes"))
        if pid is None or pid < 0:
            return "this process"
        return f"process {pid} of {count}" if count and count > 0 else f"process {pid}"

    def address(self) -> str:
        return self.cluster.get("address") or "the detected address"

    def timeout_words(self) -> str:
        return f"cluster.initialization_timeout={self.cluster.get('timeout', '?')} s"

    def waiting_for(self, still: bool = False) -> str:
        waiting = f"{self.who()} {'still ' if still else ''}waiting"
        if self.cluster.get("process_id") == 0:
            count = self.cluster.get("num_processes") or "all"
            return f"{waiting} at {self.address()} for {count} processes to join"
        return f"{waiting} for the coordinator at {self.address()}"

    def join_failure(self) -> str:
        fix = (
            "Start all processes within that time, with process_id 0 .. num_processes - 1 and the same "
            "coordinator_address (process 0's host and a free port) and num_processes, or raise "
            "--config.cluster.initialization_timeout."
        )
        if self.cluster.get("process_id") == 0:
            return (
                f"{self.who()} serves the coordinator at {self.address()}, but not every process joined "
                f"within {self.timeout_words()}. {fix}"
            )
        # The job checked that the coordinator's port takes TCP connections before it asked JAX to join.
        return (
            f"{self.who()} could not join the job within {self.timeout_words()}: the coordinator at "
            f"{self.address()} takes connections but the job did not form (not every process joined, or what "
            f"listens there is not this job's process 0). {fix}"
        )

    def lost(self, how: str, tail: str) -> str:
        heartbeat = f"cluster.heartbeat_timeout={self.cluster.get('heartbeat_timeout', '?')} s"
        silent = re.search(r"[Tt]ask (\d+) heartbeat timeout", tail) or re.search(
            r"stopped sending heartbeats\):\s*(\d+)", tail
        )
        if silent:
            quiet = int(silent.group(1))
            itself = quiet == self.events.get("joined", {}).get("process_id")
            what = (
                f"{'this process' if itself else f'process {quiet}'} sent no heartbeat to the coordinator at "
                f"{self.address()} for {heartbeat} (killed, hung, starved of CPU, or its host down or "
                "unreachable)"
            )
        elif re.search(r"leader task|Failed to send RPC to coordination service", tail):
            what = f"the coordinator at {self.address()} (process 0) stopped or cannot be reached"
        else:
            what = (
                f"another process stopped, or the coordinator at {self.address()} did (or one of them sent "
                f"no heartbeat for {heartbeat})"
            )
        return (
            f"{self.who()}: {what}, so JAX's coordination service stopped this process ({how}). Committed "
            "checkpoints are kept: re-launch every process with the same command to resume."
        )

    def conclude(self, returncode: int, tee: _Tee) -> int:
        """The exit status; prints the last line where the child's output does not end with ours."""
        error = self.events.get("error")
        if error is not None:
            line = f"error: {error['message']}"
            if tee.last_line() != line:
                self.say(line)
            return int(error.get("status", EXIT_USER_ERROR))
        if self.interrupted_at is not None and returncode != 0:  # Ctrl-C before the job could say so
            self.say("error: interrupted. Committed checkpoints are kept: re-run the same command to resume.")
            return EXIT_INTERRUPTED
        if returncode >= 0 and self.ended_by_us is None:
            return returncode  # success, or a bug with its traceback
        how = "ended by the launching process" if self.ended_by_us else _signal_name(-returncode)
        joined = "joined" in self.events
        gave_up = self.ended_by_us == "join" or returncode == -signal.SIGABRT
        if not joined and self.connecting_since is not None and gave_up:
            self.say(f"error: {self.join_failure()}")
        elif returncode == -signal.SIGABRT:
            self.say(f"error: {self.lost(how, tee.text())}")
        else:
            self.say(
                f"error: {self.who()} was stopped by {how} from outside (a scheduler, the out-of-memory "
                "killer, a user). Committed checkpoints are kept: re-launch every process with the same "
                "command to resume."
            )
        return EXIT_USER_ERROR


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run_supervised() -> int:
    """Runs this same command line again, as a supervised child; returns the status to exit with."""
    return Supervisor([sys.executable, *sys.orig_argv[1:]]).run()
