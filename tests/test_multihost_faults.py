"""Multi-host faults, for real: every way a multi-process job can fail ends each surviving process with the
project's one `error:` line, last, and exit status 2, never in a signal (debkd_jax/supervisor.py). Nothing is
mocked: each process is a real `python -m debkd_jax.main` (its supervising parent and the job it runs) on
localhost, one CPU device each, Gloo over TCP.

- the coordinator never answers (two kinds of silent address on loopback, see `silent_coordinator`);
- a process never starts (process 0 alone; processes 0 and 1 of 3);
- process 0 (the coordinator) killed during the teacher and during a student, process 1 killed during each;
- a process stops answering (SIGSTOP): the others end after `cluster.heartbeat_timeout`.

JAX's own abort (`client.h:80] Terminating process ...`) may stay in the log above the line: which of JAX's
abort and a failed collective comes first is a race, and the tests repeat each fault to meet both. A run of
the suite repeats each `REPEATS` times; `DEBKD_FAULT_REPEATS=10` repeats each ten times (docs/reliability.md
has the measured outcome).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import random
import signal
import socket
import time

import pytest
import test_multihost
from test_multihost import Job, launch

from debkd_jax import supervisor

# Each fault costs one launch of one to three CLI processes (about 10-25 s on 2 loaded cores); two
# repetitions meet both sides of the race above in most suite runs, ten (by hand, DEBKD_FAULT_REPEATS=10)
# are the measurement behind docs/reliability.md.
REPEATS = int(os.environ.get("DEBKD_FAULT_REPEATS", "1"))
# With DEBKD_FAULT_RECORD=PATH each test appends its outcomes to PATH as one JSON line: the measurement in
# results/multihost_faults.jsonl comes from
#   DEBKD_FAULT_REPEATS=10 DEBKD_FAULT_RECORD=results/multihost_faults.jsonl \
#       python -m pytest tests/test_multihost_faults.py -k "not killed"
#   DEBKD_FAULT_REPEATS=5 DEBKD_FAULT_RECORD=results/multihost_faults.jsonl \
#       python -m pytest tests/test_multihost_faults.py -k killed
RECORD = os.environ.get("DEBKD_FAULT_RECORD", "")


def record(test: str, fields: tuple[str, ...], outcomes: list[tuple], **settings) -> None:
    """Prints the outcomes of a test's runs; appends them, with `settings`, to RECORD when set."""
    rows = [dict(zip(fields, outcome, strict=True)) for outcome in outcomes]
    print(test, rows)
    if RECORD:
        line = {
            "test": test,
            "runs": len(rows),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_1min": round(os.getloadavg()[0], 1),
            "cpu_count": os.cpu_count(),
            **settings,
            "outcomes": rows,
        }
        with open(RECORD, "a") as f:
            f.write(json.dumps(line) + "\n")


INIT_TIMEOUT = 4  # cluster.initialization_timeout of the tests that never join, seconds
# cluster.heartbeat_timeout, seconds: 20 s for the jobs that run (a process starved of CPU for 5 s, as on 2
# cores at load 15, was declared dead: seen once in 18 launches), 5 s where a process is
# stopped on purpose.
HEARTBEAT_TIMEOUT = 20
STOPPED_HEARTBEAT_TIMEOUT = 5
# A guard against hangs, not an expected time: start, compile and one epoch on 2 shared cores.
LAUNCH_SECONDS = 240

# test_multihost's config (the embedded digits at 8x8) cut to 20 images per class and a global batch of 8:
# a teacher epoch is a few steps. The teacher has one epoch more than the kills during it (each launch commits
# at least one more), so that the launches killed during a student train its last epoch first; the student
# never finishes.
FAULT_FLAGS = (
    "--config.data.max_per_class=20",
    "--config.teacher.batch_size=8",
    "--config.student.batch_size=8",
    "--config.teacher.eval_batch_size=32",
    "--config.student.eval_batch_size=32",
    f"--config.teacher.num_epochs={2 * REPEATS + 1}",
    "--config.student.num_epochs=1000",
)


cache_dir, config_file = test_multihost.cache_dir, test_multihost.config_file  # the same fixtures


def launch_faulty(
    tmp_path, name: str, cache_dir, config_file, *flags, heartbeat=HEARTBEAT_TIMEOUT, log_name=None, **where
) -> Job:
    """`test_multihost.launch` with the fault tests' flags, into tmp_path/name, logs in tmp_path/logs-name
    (or tmp_path/log_name)."""
    return launch(
        tmp_path / name,
        cache_dir,
        config_file,
        tmp_path / (log_name or f"logs-{name}"),
        *FAULT_FLAGS,
        f"--config.cluster.heartbeat_timeout={heartbeat}",
        *flags,
        **where,
    )


def never_joining(
    tmp_path, run: int, cache_dir, config_file, waiting: str, **where
) -> tuple[Job, list, float]:
    """Launches a job that cannot form, waits until process `where["started"][0]` says it waits; -> the job,
    the exit statuses, and the seconds from that line to the end."""
    flags = (f"--config.cluster.initialization_timeout={INIT_TIMEOUT}",)
    job = launch_faulty(tmp_path, f"run{run}", cache_dir, config_file, *flags, **where)
    seen = wait_for_line(job, where["started"][0], waiting, LAUNCH_SECONDS)
    returncodes = job.wait(timeout=LAUNCH_SECONDS)
    return job, returncodes, time.monotonic() - seen


def stderr_of(job: Job, process_id: int) -> str:
    return (job.logs / f"p{process_id}.err").read_text()


def assert_ends_in_one_line(job: Job, process_id: int, returncode: int, *needles: str) -> str:
    """Exit status 2 (not a signal) and the last line of stderr our `error:` line, naming `needles`."""
    err = stderr_of(job, process_id)
    lines = [line for line in err.splitlines() if line.strip()]
    assert returncode == 2, (process_id, returncode, err[-3000:])
    assert lines and lines[-1].startswith("error: "), err[-3000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


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


def jax_aborted(job: Job, process_id: int) -> bool:
    """Whether JAX aborted the process's job (its fatal log line), which the launcher turned into our line."""
    return "Terminating process because the JAX distributed service" in stderr_of(job, process_id)


def wait_for_line(job: Job, process_id: int, text: str, timeout: float) -> float:
    """Polls the process's stderr until it holds `text`; returns the time it was seen."""
    deadline = time.monotonic() + timeout
    while text not in stderr_of(job, process_id):
        if time.monotonic() > deadline or all(p.poll() is not None for p in job.procs):
            raise AssertionError(f"{text!r} not seen within {timeout} s: {job.tails()}")
        time.sleep(0.05)
    return time.monotonic()


@pytest.mark.slow
@pytest.mark.timeout(REPEATS * 2 * (LAUNCH_SECONDS + 60))
def test_a_coordinator_that_never_answers_ends_in_one_line(cache_dir, config_file, tmp_path):
    """Process 1 of 2 given a coordinator address where nothing answers: it says that it waits, waits
    `initialization_timeout`, and ends in one line naming the address and the timeout, status 2."""
    outcomes = []
    for run in range(2 * REPEATS):
        kind = ("mute", "dropping")[run % 2]
        with silent_coordinator(kind) as address:
            waiting = f"waiting for the coordinator at {address}"
            job, (returncode,), seconds = never_joining(
                tmp_path, run, cache_dir, config_file, waiting, started=(1,), address=address
            )
        assert_ends_in_one_line(job, 1, returncode, address, f"initialization_timeout={INIT_TIMEOUT} s")
        # Respects the timeout: the launcher ends a child that has not joined 10 s after it (JOIN_GRACE).
        assert INIT_TIMEOUT - 1 <= seconds <= INIT_TIMEOUT + 10 + 5, seconds
        assert not (tmp_path / f"run{run}").exists()
        outcomes.append((kind, returncode, round(seconds, 1), jax_aborted(job, 1)))
    record(
        "coordinator_never_answers",
        ("kind", "exit_status", "seconds_after_waiting_line", "jax_abort"),
        outcomes,
        initialization_timeout=INIT_TIMEOUT,
    )


@pytest.mark.slow
@pytest.mark.timeout(REPEATS * 2 * (LAUNCH_SECONDS + 60))
def test_a_process_that_never_starts_ends_the_others_in_one_line(cache_dir, config_file, tmp_path):
    """Process 0 of 2 alone, and processes 0 and 1 of 3 without process 2: each ends in one line saying that
    not every process joined within `initialization_timeout`, status 2."""
    outcomes = []
    for run in range(2 * REPEATS):
        processes, started = ((2, (0,)), (3, (0, 1)))[run % 2]
        job, returncodes, seconds = never_joining(
            tmp_path,
            run,
            cache_dir,
            config_file,
            "waiting at localhost:",
            processes=processes,
            started=started,
        )
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


def newest_checkpoint(folder: pathlib.Path) -> int:
    return max((int(p.name) for p in folder.glob("[0-9]*") if p.name.isdigit()), default=0)


def wait_for_checkpoint_after(folder: pathlib.Path, epoch: int, job: Job, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while newest_checkpoint(folder) <= epoch:
        if time.monotonic() > deadline or any(p.poll() is not None for p in job.procs):
            job.kill()
            raise AssertionError(
                f"no checkpoint after epoch {epoch} in {folder} within {timeout} s: {job.tails()}"
            )
        time.sleep(0.05)
    return newest_checkpoint(folder)


@pytest.mark.slow
@pytest.mark.timeout(REPEATS * 4 * (LAUNCH_SECONDS + 60))
def test_a_killed_process_ends_the_other_in_one_line_and_a_relaunch_resumes(cache_dir, config_file, tmp_path):
    """Process 0 (the coordinator) and process 1 SIGKILLed in turn, at a moment drawn just after a checkpoint
    commit, during the teacher and then during the student, all in one workdir: the survivor ends in one line
    (what happened, the fix), status 2, well within the heartbeat timeout, and every later launch resumes
    from the last committed checkpoint."""
    workdir = tmp_path / "run"
    teacher, student = (
        workdir / "teacher" / "checkpoints",
        workdir / "students" / "DeBKD-seed0" / "checkpoints",
    )
    schedule = [(victim, "teacher") for _ in range(REPEATS) for victim in (0, 1)]
    schedule += [(victim, "student") for _ in range(REPEATS) for victim in (0, 1)]
    rng = random.Random(0)
    outcomes = []
    for launch_index, (victim, phase) in enumerate(schedule):
        folder = teacher if phase == "teacher" else student
        before = newest_checkpoint(folder)
        job = launch_faulty(tmp_path, "run", cache_dir, config_file, log_name=f"launch{launch_index}")
        wait_for_checkpoint_after(folder, before, job, LAUNCH_SECONDS)
        time.sleep(rng.uniform(0.0, 1.0))  # somewhere in the next epoch: a step, an evaluation, a save
        os.kill(job.procs[victim].pid, signal.SIGKILL)  # its job dies with it (PR_SET_PDEATHSIG), a host lost
        killed = time.monotonic()
        survivor = 1 - victim
        returncodes = job.wait(timeout=LAUNCH_SECONDS)
        seconds = time.monotonic() - killed
        assert returncodes[victim] == -signal.SIGKILL
        line = assert_ends_in_one_line(
            job,
            survivor,
            returncodes[survivor],
            f"process {survivor} of 2",
            "re-launch every process with the same command",
        )
        assert seconds < HEARTBEAT_TIMEOUT + 15, (seconds, line)
        if launch_index > 0:  # what an earlier launch committed is resumed
            resumed = "teacher" if before == 0 else "DeBKD (seed 0)" if phase == "student" else "teacher"
            # On this tiny data the teacher can finish between its checkpoint and the kill: then the relaunch
            # reuses the finished teacher instead of resuming it (seen once in a README test run, 2026-12-04).
            log = stderr_of(job, survivor)
            finished_teacher = resumed == "teacher" and "teacher: reusing" in log
            assert f"{resumed}: resumed from the checkpoint of epoch" in log or finished_teacher, job.tails()
        outcomes.append((phase, victim, returncodes[survivor], round(seconds, 1), jax_aborted(job, survivor)))
    assert not (workdir / "results.json").exists()
    record(
        "process_killed",
        ("phase", "victim", "survivor_exit_status", "seconds_after_kill", "jax_abort"),
        outcomes,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
    )


def children(pid: int) -> list[int]:
    return [int(c) for c in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
@pytest.mark.timeout(REPEATS * (LAUNCH_SECONDS + 60))
def test_a_process_that_stops_answering_ends_the_other_after_the_heartbeat_timeout(
    cache_dir,
    config_file,
    tmp_path,
):
    """Process 1's job frozen (SIGSTOP: a hung host) during the teacher: process 0 ends in one line naming the
    heartbeat timeout, status 2, after about `heartbeat_timeout`."""
    outcomes = []
    for run in range(REPEATS):
        workdir = tmp_path / f"run{run}"
        job = launch_faulty(
            tmp_path, f"run{run}", cache_dir, config_file, heartbeat=STOPPED_HEARTBEAT_TIMEOUT
        )
        wait_for_checkpoint_after(workdir / "teacher" / "checkpoints", 0, job, LAUNCH_SECONDS)
        (frozen,) = children(job.procs[1].pid)
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            returncode = job.procs[0].wait(timeout=LAUNCH_SECONDS)
        finally:
            job.kill()
        seconds = time.monotonic() - stopped
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
