"""Multi-host faults, for real: every way a multi-process job can fail ends each surviving process with the
project's one `error:` line, last, and exit status 2, never in a signal (debkd_jax/supervisor.py). Nothing is
mocked: each process is a real `python -m debkd_jax.main` (its supervising parent and the job it runs) on
localhost, one CPU device each, Gloo over TCP.

- the coordinator never answers (two kinds of silent address on loopback, see `silent_coordinator`);
- a process never starts (process 0 alone; processes 0 and 1 of 3);
- a process stops answering (SIGSTOP): the others end after `cluster.heartbeat_timeout`.

Killed processes, and the relaunches that resume, are in test_multihost (beside the uninterrupted run whose
results the last relaunch must give).

JAX's own abort (`client.h:80] Terminating process ...`) may stay in the log above the line: which of JAX's
abort and a failed collective comes first is a race, and the tests repeat each fault to meet both. A run of
the suite repeats each `REPEATS` times; `DEBKD_FAULT_REPEATS=10` repeats each ten times (docs/reliability.md
has the measured outcome, test_multihost the command that records it). Every fault launch of the module runs
at the same time (`fault_runs`): each mostly waits out a timeout, so together they take about as long as the
longest, and each test then checks its own.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pathlib
import signal
import socket
import time

import pytest
import test_multihost
from test_multihost import (
    REPEATS,
    Job,
    assert_ends_in_one_line,
    jax_aborted,
    launch,
    record,
    stderr_of,
    wait_for_checkpoint_after,
)

from debkd_jax import supervisor

INIT_TIMEOUT = 4  # cluster.initialization_timeout of the tests that never join, seconds
STOPPED_HEARTBEAT_TIMEOUT = 5  # cluster.heartbeat_timeout where a process is stopped on purpose, seconds
# A guard against hangs, not an expected time: start, compile and one epoch on 2 shared cores.
LAUNCH_SECONDS = 240

# test_multihost's config (the embedded digits at 8x8) cut to 20 images per class and a global batch of 8: a
# teacher epoch is a few steps, and the teacher never finishes while the faults happen.
FAULT_FLAGS = (
    "--config.data.max_per_class=20",
    "--config.teacher.batch_size=8",
    "--config.student.batch_size=8",
    "--config.teacher.eval_batch_size=32",
    "--config.student.eval_batch_size=32",
    "--config.teacher.num_epochs=1000",
)


cache_dir, config_file = test_multihost.cache_dir, test_multihost.config_file  # the same fixtures


def launch_faulty(
    tmp_path,
    name: str,
    cache_dir,
    config_file,
    *flags,
    heartbeat=test_multihost.KILL_HEARTBEAT_TIMEOUT,
    **where,
) -> Job:
    """`test_multihost.launch` with the fault tests' flags, into tmp_path/name, logs in tmp_path/logs-name."""
    return launch(
        tmp_path / name,
        cache_dir,
        config_file,
        tmp_path / f"logs-{name}",
        *FAULT_FLAGS,
        f"--config.cluster.heartbeat_timeout={heartbeat}",
        *flags,
        **where,
    )


def never_joining(
    tmp_path, cache_dir, config_file, runs: list[tuple[str, dict]]
) -> list[tuple[Job, list, float]]:
    """Launches at once one job per `(waiting, where)` in `runs`, each unable to form; waits until every
    process has ended -> per run: the job, the exit statuses, and the seconds from when process
    `where["started"][0]` said `waiting` to when the job's last process ended."""
    flags = (f"--config.cluster.initialization_timeout={INIT_TIMEOUT}",)
    jobs = [
        launch_faulty(tmp_path, f"run{run}", cache_dir, config_file, *flags, **where)
        for run, (_, where) in enumerate(runs)
    ]
    seen, ended = [None] * len(jobs), [None] * len(jobs)
    deadline = time.monotonic() + LAUNCH_SECONDS
    while None in ended:
        now = time.monotonic()
        for i, (job, (waiting, where)) in enumerate(zip(jobs, runs, strict=True)):
            if seen[i] is None and waiting in stderr_of(job, where["started"][0]):
                seen[i] = now
            if ended[i] is None and all(p.poll() is not None for p in job.procs):
                ended[i] = now
        if now > deadline:
            for job in jobs:
                job.kill()
            raise AssertionError(f"not ended within {LAUNCH_SECONDS} s: {[job.tails() for job in jobs]}")
        time.sleep(0.05)
    for job, (waiting, _), start in zip(jobs, runs, seen, strict=True):
        assert start is not None, f"{waiting!r} never said: {job.tails()}"
    return [
        (job, [p.returncode for p in job.procs], end - start)
        for job, start, end in zip(jobs, seen, ended, strict=True)
    ]


@contextlib.contextmanager
def silent_coordinator(kind: str):
    """A coordinator address on loopback that never answers, as a wrong or firewalled one does elsewhere
    (this machine sends nothing off loopback; a free port would refuse at once, which is not the case here):

    - "dropping": a listening socket whose accept queue is full, so the kernel drops every new SYN and a
      connect times out, as for a non-routable address or a firewall that drops;
    - "mute": a listening socket that never accepts: the kernel completes the TCP handshake, so JAX's gRPC
      client connects, sends its request and never hears back (a booting host's port, a wrong service, a
      proxy). This is the path on which JAX aborts the process (`RegisterTask ... DEADLINE_EXCEEDED`).
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0 if kind == "dropping" else 64)
    address = f"127.0.0.1:{server.getsockname()[1]}"
    fillers = []
    if kind == "dropping":  # fill the accept queue (length 0 admits one) so that later SYNs are dropped
        for _ in range(2):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(server.getsockname())
            fillers.append(filler)
        time.sleep(0.2)
        probe = socket.socket()
        probe.settimeout(1.0)
        with pytest.raises(TimeoutError):  # the premise: a connect times out rather than being refused
            probe.connect(server.getsockname())
        probe.close()
    try:
        yield address
    finally:
        for s in (*fillers, server):
            s.close()


def coordinator_never_answers(tmp_path, cache_dir, config_file) -> list[tuple[str, str, tuple]]:
    """Process 1 of 2 alone, given a coordinator address where nothing answers, `2 * REPEATS` times (the two
    kinds of silence in turn) -> per run: the kind, the address, and `never_joining`'s outcome."""
    kinds = [("mute", "dropping")[run % 2] for run in range(2 * REPEATS)]
    with contextlib.ExitStack() as stack:
        addresses = [stack.enter_context(silent_coordinator(kind)) for kind in kinds]
        runs = never_joining(
            tmp_path,
            cache_dir,
            config_file,
            [(f"waiting for the coordinator at {a}", {"started": (1,), "address": a}) for a in addresses],
        )
    return list(zip(kinds, addresses, runs, strict=True))


def processes_never_start(tmp_path, cache_dir, config_file) -> list[tuple[tuple, tuple]]:
    """Process 0 of 2 alone, and processes 0 and 1 of 3 without process 2, `REPEATS` times each -> per run:
    (processes, started) and `never_joining`'s outcome."""
    shapes = [((2, (0,)), (3, (0, 1)))[run % 2] for run in range(2 * REPEATS)]
    runs = never_joining(
        tmp_path,
        cache_dir,
        config_file,
        [("waiting at localhost:", {"processes": n, "started": started}) for n, started in shapes],
    )
    return list(zip(shapes, runs, strict=True))


def children(pid: int) -> list[int]:
    return [int(c) for c in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def process_stops_answering(tmp_path, cache_dir, config_file) -> list[tuple[Job, int, float]]:
    """Process 1's job frozen (SIGSTOP) after the teacher's first checkpoint, `REPEATS` times -> per run: the
    job, process 0's exit status, and the seconds from the stop to its end."""
    runs = []
    for run in range(REPEATS):
        job = launch_faulty(
            tmp_path, f"run{run}", cache_dir, config_file, heartbeat=STOPPED_HEARTBEAT_TIMEOUT
        )
        wait_for_checkpoint_after(job.workdir / "teacher" / "checkpoints", 0, job, LAUNCH_SECONDS)
        (frozen,) = children(job.procs[1].pid)
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            returncode = job.procs[0].wait(timeout=LAUNCH_SECONDS)
        finally:
            job.kill()
        runs.append((job, returncode, time.monotonic() - stopped))
    return runs


@pytest.fixture(scope="module")
def fault_runs(cache_dir, config_file, tmp_path_factory):
    """Every fault launch of the module, started at once, each fault in a thread of its own -> the fault's
    name: a future of its runs. The launches mostly wait out timeouts, so together they take about as long
    as the longest; each test waits for its own."""
    faults = (coordinator_never_answers, processes_never_start, process_stops_answering)
    with concurrent.futures.ThreadPoolExecutor(len(faults)) as pool:
        folders = [tmp_path_factory.mktemp(fault.__name__) for fault in faults]
        yield {
            fault.__name__: pool.submit(fault, folder, cache_dir, config_file)
            for fault, folder in zip(faults, folders, strict=True)
        }


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_SECONDS)
def test_a_coordinator_that_never_answers_ends_in_one_line(fault_runs):
    """Process 1 of 2 given a coordinator address where nothing answers: it says that it waits, waits
    `initialization_timeout`, and ends in one line naming the address and the timeout, status 2."""
    outcomes = []
    for kind, address, (job, (returncode,), seconds) in fault_runs["coordinator_never_answers"].result():
        assert_ends_in_one_line(job, 1, returncode, address, f"initialization_timeout={INIT_TIMEOUT} s")
        # Respects the timeout: the launcher ends a child that has not joined 10 s after it (JOIN_GRACE).
        assert INIT_TIMEOUT - 1 <= seconds <= INIT_TIMEOUT + 10 + 5, seconds
        assert not job.workdir.exists()
        outcomes.append((kind, returncode, round(seconds, 1), jax_aborted(job, 1)))
    record(
        "coordinator_never_answers",
        ("kind", "exit_status", "seconds_after_waiting_line", "jax_abort"),
        outcomes,
        initialization_timeout=INIT_TIMEOUT,
    )


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_SECONDS)
def test_a_process_that_never_starts_ends_the_others_in_one_line(fault_runs):
    """Process 0 of 2 alone, and processes 0 and 1 of 3 without process 2: each ends in one line saying that
    not every process joined within `initialization_timeout`, status 2."""
    outcomes = []
    for (processes, started), (job, returncodes, seconds) in fault_runs["processes_never_start"].result():
        for process_id, returncode in zip(started, returncodes, strict=True):
            assert_ends_in_one_line(
                job,
                process_id,
                returncode,
                f"initialization_timeout={INIT_TIMEOUT} s",
                "not every process joined",
            )
        assert INIT_TIMEOUT - 1 <= seconds <= INIT_TIMEOUT + 10 + 5, seconds
        outcomes.append(
            (
                f"{len(started)} of {processes}",
                returncodes,
                round(seconds, 1),
                [jax_aborted(job, i) for i in started],
            )
        )
    record(
        "process_never_starts",
        ("started", "exit_statuses", "seconds_after_waiting_line", "jax_abort"),
        outcomes,
        initialization_timeout=INIT_TIMEOUT,
    )


@pytest.mark.slow
@pytest.mark.timeout(REPEATS * (LAUNCH_SECONDS + 60))
def test_a_process_that_stops_answering_ends_the_other_after_the_heartbeat_timeout(fault_runs):
    """Process 1's job frozen (SIGSTOP: a hung host) during the teacher: process 0 ends in one line naming the
    heartbeat timeout, status 2, after about `heartbeat_timeout`."""
    outcomes = []
    for job, returncode, seconds in fault_runs["process_stops_answering"].result():
        line = assert_ends_in_one_line(job, 0, returncode, "process 0 of 2", "re-launch every process")
        assert f"heartbeat_timeout={STOPPED_HEARTBEAT_TIMEOUT} s" in line, line
        # The timeout runs from process 1's last heartbeat, which can precede the stop by up to one heartbeat
        # interval: measured 3.3 s after the stop once (CI, 2026-12-04), 4.7-7.7 s in the record.
        assert STOPPED_HEARTBEAT_TIMEOUT / 2 <= seconds <= 3 * STOPPED_HEARTBEAT_TIMEOUT + 10, (seconds, line)
        outcomes.append((returncode, round(seconds, 1), jax_aborted(job, 0)))
    record(
        "process_stops_answering",
        ("exit_status", "seconds_after_stop", "jax_abort"),
        outcomes,
        heartbeat_timeout=STOPPED_HEARTBEAT_TIMEOUT,
    )


def connecting(supervised: supervisor.Supervisor, process_id: int, timeout: int = 100) -> float:
    supervised.receive(
        {
            "event": "connecting",
            "address": "10.0.0.1:1234",
            "process_id": process_id,
            "num_processes": 4,
            "timeout": timeout,
            "heartbeat_timeout": 30,
        }
    )
    return supervised.connecting_since


def test_the_launcher_says_it_waits_at_the_start_and_every_30_seconds(capsys):
    supervised = supervisor.Supervisor([])
    start = connecting(supervised, process_id=2)
    for second in range(0, 100):
        supervised.check_clock(start + second)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (
        "distributed: process 2 of 4 waiting for the coordinator at 10.0.0.1:1234 (up to "
        "cluster.initialization_timeout=100 s)."
    )
    assert [line.split("(")[1] for line in lines[1:]] == [
        f"{s} s of cluster.initialization_timeout=100 s)." for s in (30, 60, 90)
    ]
    assert all("still waiting" in line for line in lines[1:])
    supervised = supervisor.Supervisor([])
    connecting(supervised, process_id=0)
    assert "process 0 of 4 waiting at 10.0.0.1:1234 for 4 processes to join" in capsys.readouterr().err


# JAX's fatal lines (jaxlib 0.10.2) as the faults above printed them.
JAX_LOST_COORDINATOR = (
    "F1204 15:23:19.865331   10343 client.h:80] Terminating process because the JAX distributed service "
    "detected fatal errors. ... absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. "
    "Either the leader task was preempted/died/restarted unexpectedly or this task is experiencing "
    "network issues."
)
JAX_SILENT_TASK = (
    "F1204 15:23:27.418203   10473 client.h:80] Terminating process because the JAX distributed service "
    "detected fatal errors. ... UNAVAILABLE: The following tasks are unhealthy (stopped sending "
    "heartbeats):\n3\nThe tasks have crashed."
)


@pytest.mark.parametrize(
    "tail, needles",
    [
        (JAX_LOST_COORDINATOR, ["the coordinator at 10.0.0.1:1234 (process 0) stopped or cannot be reached"]),
        (JAX_SILENT_TASK, ["process 3 sent no heartbeat", "cluster.heartbeat_timeout=30 s"]),
        ("F... client.h:80] Terminating process", ["another process stopped", "heartbeat_timeout=30 s"]),
    ],
)
def test_the_launcher_names_what_jax_reported(tail, needles):
    supervised = supervisor.Supervisor([])
    connecting(supervised, process_id=1)
    supervised.receive({"event": "joined", "process_id": 1, "num_processes": 4})
    line = supervised.lost("SIGABRT", tail)
    assert line.startswith("process 1 of 4: "), line
    for needle in needles + ["SIGABRT", "re-launch every process with the same command"]:
        assert needle in line, line
