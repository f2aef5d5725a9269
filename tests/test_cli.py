"""The real command line, end to end, in subprocesses: a run on the generated image folder (conftest's
`shapes_dir`, so it runs in every checkout) and one on real Dogs vs Cats photos where they are beside the
checkout, resume after SIGKILL (from outside mid-training, inside a checkpoint commit and inside the
teacher-logits write), re-runs; and the error messages for bad flags and config values, in this process
(`run_main`: the same flag parsing and `main(argv)`, without a process start per message).

Every subprocess runs `python -m debkd_jax.main` (or a driver that installs a kill hook and then calls
`debkd_jax.main.run()`) on one CPU device, with XLA's optimisations off and the session's persistent
compilation cache (tests/conftest.py), so that each compiles only what the previous ones did not.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import io
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from debkd_jax import processes

REPO = pathlib.Path(__file__).resolve().parents[1]
DEBKD = str(REPO / "configs" / "debkd.py")
STUDENTS = ("CE", "KD", "DeBKD")  # the students configs/debkd.py trains: the two methods and the CE baseline

# The whole generated folder (150 images per class: 210 train, 30 val, 60 test), batch 16 (13 steps per
# epoch), 3 epochs at a high learning rate. Measured test accuracy of the teacher and the CE, KD and DeBKD
# students (chance 50%; its 8% mislabeled images cap it near 92%): 90.0-91.7% at seed 0 (the test's) and
# seed 1, 86.7-88.3% at seed 2; best val accuracy 90-93% at seed 0.
SHAPES_MIN_ACCURACY = 0.85  # one test image (1.7 points) below the lowest measured
SHAPES_FLAGS = (
    "--config.data.max_per_class=150",
    "--config.teacher.num_epochs=3",
    "--config.student.num_epochs=3",
    "--config.teacher.batch_size=16",
    "--config.student.batch_size=16",
    "--config.teacher.learning_rate=0.2",
    "--config.student.learning_rate=0.2",
)

# A slice of the real photos that the tiny models learn from in a few epochs, in 30-50 s on 2 shared CPU
# cores.
# Measured test accuracy on its 400 test photos (chance 50%, one standard error 2.5 points), teacher / CE / KD
# / DeBKD: seed 0 (the test's) 59.0 / 59.0 / 58.0 / 59.75%, seed 1 61.25 / 61.25 / 61.5 / 61.5%, seed 2
# 63.5 / 63.5 / 61.5 / 64.75%; best val accuracy (200 photos) 63.5-65% at seed 0.
PHOTO_MIN_ACCURACY = 0.57  # below every measured value, by a point under the lowest (58.0%)
PHOTO_FLAGS = (
    "--config.data.max_per_class=1000",
    "--config.teacher.num_epochs=3",
    "--config.student.num_epochs=3",
    "--config.teacher.learning_rate=0.2",
    "--config.student.learning_rate=0.2",
)


def cli_env(cache_dir: pathlib.Path, devices: int = 1) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def cli_args(workdir, data_cache, *flags, config=DEBKD + ":smoke") -> list[str]:
    return [f"--config={config}", f"--workdir={workdir}", f"--config.data.cache_dir={data_cache}", *flags]


def run_cli(args, env, *, driver: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, driver] if driver else [sys.executable, "-m", "debkd_jax.main"]
    return processes.run(cmd + list(args), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_main(args) -> subprocess.CompletedProcess:
    """`python -m debkd_jax.main ARGS` in this process: the CLI's flag parsing and `main(argv)`, as `run()`
    calls them, with stdout and stderr captured and the exit status of `SystemExit`. For checks of what the
    command line answers, where a new process would add only its start (the session's 8 CPU devices stand in
    for the subprocesses' one). The process-wide state the command line sets (its flags, `sys.argv`, logging)
    is restored afterwards: debkd_jax.main is imported for the call and its flags removed after it, and the
    flags that another of the project's command lines defined in this process (third_party.write_logits': its
    own --config and required --model, --out) are set aside meanwhile."""
    from absl import flags
    from absl import logging as absl_logging

    from debkd_jax import cli

    FLAGS = flags.FLAGS
    others = {
        flag.name: (module, flag)
        for module, defined in FLAGS.flags_by_module_dict().items()
        if module.startswith(("debkd_jax.", "third_party.", "benchmarks."))
        for flag in defined
    }
    for name in others:
        delattr(FLAGS, name)
    sys.modules.pop("debkd_jax.main", None)
    main = importlib.import_module("debkd_jax.main")  # defines its flags anew

    argv = ["debkd_jax.main", *args]
    ours, absl_handler = logging.getLogger("debkd_jax"), absl_logging.get_absl_handler()
    saved = (
        sys.argv,
        list(ours.handlers),
        ours.level,
        ours.propagate,
        logging.root.manager.disable,
        list(absl_handler.filters),
        absl_logging.get_verbosity(),
    )
    out, err = io.StringIO(), io.StringIO()
    try:
        sys.argv = argv  # ml_collections reads the --config.X overrides from sys.argv
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main.main(cli.parse_flags(argv))
            except SystemExit as e:
                status = e.code
    finally:
        sys.argv, ours.handlers[:], ours.level, ours.propagate = saved[:4]
        disable, absl_handler.filters[:], verbosity = saved[4:]
        logging.disable(disable)
        absl_logging.set_verbosity(verbosity)
        FLAGS.unparse_flags()
        for name in [
            name for name in FLAGS if name in ("config", "workdir", "plan") or name.startswith("config.")
        ]:
            delattr(FLAGS, name)
        sys.modules.pop("debkd_jax.main", None)
        for name, (module, flag) in others.items():
            FLAGS[name] = flag
            FLAGS.register_flag_by_module(module, flag)
    return subprocess.CompletedProcess(argv, status or 0, out.getvalue(), err.getvalue())


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, one `error: ...` message naming `needles`, no Python traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


# Installs one kill point, then runs the CLI. The kill is a real SIGKILL of the process, at a chosen moment:
#   logits      inside the teacher-logits cache write (the data written, before the rename that commits it)
#   checkpoint  inside orbax's commit of KD's epoch-1 checkpoint (all files written, before the rename)
DRIVER = textwrap.dedent(
    """
    import os, re, signal, sys

    where = os.environ["DEBKD_TEST_KILL_AT"]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "logits":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if os.path.basename(os.fspath(dst)) == "logits.npz":
                die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif where == "checkpoint":
        real_rename = os.rename

        def rename(src, dst, *args, **kwargs):
            if re.search(r"students/KD-seed0/checkpoints/1$", os.fspath(dst)):
                die()
            return real_rename(src, dst, *args, **kwargs)

        os.rename = rename
    else:
        raise SystemExit(f"unknown kill point {where}")

    from debkd_jax import main

    sys.argv = ["debkd_jax.main", *sys.argv[1:]]
    main.run()
    """
)


def shared_cache_dir(tmp_path_factory) -> pathlib.Path:
    """One folder per test session for the compilation and data caches of every CLI subprocess."""
    path = tmp_path_factory.getbasetemp() / "debkd_cli_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return shared_cache_dir(tmp_path_factory)


def run_end_to_end(cache_dir: pathlib.Path, workdir: pathlib.Path, folder: pathlib.Path, flags) -> dict:
    """One uninterrupted run of the real CLI (configs/debkd.py:smoke: CE, KD and DeBKD) on an image folder,
    with progress bars; fails unless it exits 0."""
    args = cli_args(
        workdir, cache_dir / "data", f"--config.data.source=folder:{folder}", *flags, "--config.progress=True"
    )
    t0 = time.perf_counter()
    proc = run_cli(args, cli_env(cache_dir))
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {"workdir": workdir, "proc": proc, "args": args, "seconds": seconds}


@pytest.fixture(scope="module")
def e2e_run(cache_dir, shapes_dir, tmp_path_factory):
    """The run on the generated folder that the resume and re-run tests compare against."""
    return run_end_to_end(cache_dir, tmp_path_factory.mktemp("e2e") / "run", shapes_dir, SHAPES_FLAGS)


def check_run_writes_everything_and_learns(
    run: dict, *, class_names, class_counts, steps_per_epoch: int, min_accuracy: float, max_per_class: int
) -> None:
    """The workdir of a 3-epoch run holds every file it promises, with consistent contents, and the teacher
    and every student reach `min_accuracy` on the test split."""
    workdir, proc = run["workdir"], run["proc"]
    for name in ("config.json", "results.json", "results.md", "val_accuracy.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert (workdir / "val_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((workdir / "config.json").read_text())["data"]["max_per_class"] == max_per_class

    results = json.loads((workdir / "results.json").read_text())
    d = results["dataset"]
    assert d["class_names"] == class_names and d["skipped_files"] == 0
    assert d["class_counts"] == class_counts
    assert d["sizes"] == {split: sum(counts) for split, counts in class_counts.items()}
    assert set(results["methods"]) == set(STUDENTS)
    n = d["sizes"]

    # The teacher: checkpoint, final model, metadata, cached logits for every split.
    teacher = workdir / "teacher"
    assert (teacher / "checkpoints" / "3").is_dir() and (teacher / "final").is_dir()
    meta = json.loads((teacher / "teacher.json").read_text())
    assert [e["epoch"] for e in meta["history"]] == [1, 2, 3]
    with np.load(teacher / "logits.npz") as z:
        assert {split: z[split].shape for split in n} == {split: (size, 2) for split, size in n.items()}
    assert not list(workdir.rglob(".*.tmp")), "a temporary file was left behind"

    for method in STUDENTS:
        student = workdir / "students" / f"{method}-seed0"
        records = read_jsonl(student / "metrics.jsonl")
        assert [r["epoch"] for r in records] == [1, 2, 3]
        assert [r["step"] for r in records] == [steps_per_epoch * e for e in (1, 2, 3)]
        events = list((student / "tensorboard").glob("events.out.tfevents.*"))
        assert events and b"val_accuracy" in events[0].read_bytes()
        assert (student / "checkpoints" / "3" / "state").is_dir() and (student / "final").is_dir()
        result = json.loads((student / "result.json").read_text())
        assert result["history"] == records
        test = result["test"]
        assert test["accuracy"] > min_accuracy, (method, test)
        assert records[-1]["train_loss"] < records[0]["train_loss"]
        assert max(r["val_accuracy"] for r in records) > min_accuracy
        row = results["methods"][method]["test"]["accuracy"]
        assert row["mean"] == test["accuracy"] and row["n"] == 1
    assert results["teacher"]["test"]["accuracy"] > min_accuracy

    # What the person at the terminal sees: the table on stdout, a progress bar per phase on stderr.
    assert "| resnet_tiny | DeBKD |" in proc.stdout and "results.md" in proc.stdout
    for bar in ("decoding", "teacher", "teacher logits (train)", *(f"{m} (seed 0)" for m in STUDENTS)):
        assert bar in proc.stderr, bar
    assert "3/3" in proc.stderr and "val_acc=" in proc.stderr
    assert "Traceback" not in proc.stderr
    print(
        f"end-to-end CLI run: {run['seconds']:.1f} s; test accuracy:",
        {m: results["methods"][m]["test"]["accuracy"]["mean"] for m in STUDENTS},
        "teacher",
        results["teacher"]["test"]["accuracy"],
    )


@pytest.mark.slow
@pytest.mark.timeout(600)  # pays for the module's e2e_run (one CLI run, up to 300 s)
def test_end_to_end_on_the_generated_folder_writes_everything_and_learns(e2e_run):
    """60 test images, chance 50% (one standard error 6.5 points)."""
    check_run_writes_everything_and_learns(
        e2e_run,
        class_names=["bar", "disc"],
        class_counts={"train": [105, 105], "val": [15, 15], "test": [30, 30]},
        steps_per_epoch=210 // 16,
        min_accuracy=SHAPES_MIN_ACCURACY,
        max_per_class=150,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)  # one CLI run on real photos, bounded by its own timeout
def test_end_to_end_on_real_photos_writes_everything_and_learns(cache_dir, dogs_vs_cats_dir, tmp_path):
    """2,000 real Kaggle JPEGs, harder than the generated shapes: 400 test photos, chance 50% (one standard
    error 2.5 points)."""
    run = run_end_to_end(cache_dir, tmp_path / "run", dogs_vs_cats_dir, PHOTO_FLAGS)
    check_run_writes_everything_and_learns(
        run,
        class_names=["cat", "dog"],
        class_counts={"train": [700, 700], "val": [100, 100], "test": [200, 200]},
        steps_per_epoch=1400 // 32,
        min_accuracy=PHOTO_MIN_ACCURACY,
        max_per_class=1000,
    )


def kill_when(args, env, ready: pathlib.Path, timeout: float = 240) -> tuple[int, str]:
    """Runs the CLI with `args` and SIGKILLs it as soon as the folder `ready` exists (or after `timeout` s, or
    not at all if it ended first); returns (its exit status, its stderr)."""
    child = processes.popen(
        [sys.executable, "-m", "debkd_jax.main", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not ready.is_dir() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        _, err = child.communicate(timeout=60)
    return child.returncode, err


def results_without_times(path: pathlib.Path):
    """A results JSON file without what differs between two runs of the same computation: wall times, and
    the run's command (its workdir) and finishing time."""

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("wall_seconds", "meta")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip(json.loads(path.read_text()))


def _same_outputs(a: pathlib.Path, b: pathlib.Path) -> None:
    """The files that hold results are identical up to wall times: results, per-epoch histories, metrics,
    teacher logits."""
    assert results_without_times(a / "results.json") == results_without_times(b / "results.json")
    assert results_without_times(a / "teacher" / "teacher.json") == results_without_times(
        b / "teacher" / "teacher.json"
    )
    for method in STUDENTS:
        run_a, run_b = a / "students" / f"{method}-seed0", b / "students" / f"{method}-seed0"
        assert (run_a / "metrics.jsonl").read_text() == (run_b / "metrics.jsonl").read_text(), method
        assert results_without_times(run_a / "result.json") == results_without_times(run_b / "result.json"), (
            method
        )
    with np.load(a / "teacher" / "logits.npz") as za, np.load(b / "teacher" / "logits.npz") as zb:
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(za[split], zb[split])


@pytest.mark.slow
@pytest.mark.timeout(1200)  # four CLI runs, each bounded by its own timeout, plus e2e_run if first
def test_killed_runs_resume_to_the_same_results(e2e_run, cache_dir, tmp_path):
    """Three SIGKILLs -- inside the teacher-logits write, inside a checkpoint commit, and from outside right
    after a checkpoint appeared mid-training -- then a plain re-run: every result file is identical to the
    uninterrupted run's (same config and seed)."""
    workdir = tmp_path / "run"
    args = [a.replace(str(e2e_run["workdir"]), str(workdir)) for a in e2e_run["args"]]
    args = [a for a in args if a != "--config.progress=True"]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = cli_env(cache_dir)

    # 1. Killed while writing teacher/logits.npz: the teacher is finished, the cache file never appears.
    proc = run_cli(args, {**env, "DEBKD_TEST_KILL_AT": "logits"}, driver=str(driver))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (workdir / "teacher" / "teacher.json").exists()
    assert not (workdir / "teacher" / "logits.npz").exists()
    assert list((workdir / "teacher").glob(".logits.npz.*.tmp")), "expected the partial write's temp file"

    # 2. Killed inside the commit of KD's first checkpoint: only orbax's temporary folder is there.
    proc = run_cli(args, {**env, "DEBKD_TEST_KILL_AT": "checkpoint"}, driver=str(driver))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (workdir / "teacher" / "logits.npz").exists()
    assert not list((workdir / "teacher").glob(".logits.npz.*.tmp")), "the stale temp file was not removed"
    ckpts = workdir / "students" / "KD-seed0" / "checkpoints"
    assert not (ckpts / "1").exists() and [p.name for p in ckpts.iterdir() if "tmp" in p.name]

    # 3. Killed from outside as soon as a checkpoint is committed, in the middle of training KD.
    returncode, err = kill_when(args, env, ckpts / "1")
    assert returncode == -signal.SIGKILL, err[-3000:]
    assert not (workdir / "students" / "KD-seed0" / "result.json").exists(), "KD finished before the kill"
    assert not (workdir / "results.json").exists()

    # 4. The same command again: resumes and finishes; the outputs equal the uninterrupted run's.
    proc = run_cli(args, env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "resumed from the checkpoint of epoch" in proc.stderr
    _same_outputs(e2e_run["workdir"], workdir)
    assert not list(workdir.rglob(".*.tmp")) and not list(ckpts.glob("*tmp*"))


@pytest.mark.slow
@pytest.mark.timeout(900)  # two CLI runs, plus e2e_run if first
def test_rerun_reuses_finished_work_and_never_overwrites_results(e2e_run, cache_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(e2e_run["workdir"], workdir)
    args = [a.replace(str(e2e_run["workdir"]), str(workdir)) for a in e2e_run["args"]]
    args = [a for a in args if a != "--config.progress=True"]
    before = {
        p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")
    }
    result_mtime = (workdir / "students" / "KD-seed0" / "result.json").stat().st_mtime_ns

    proc = run_cli(args, cli_env(cache_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher: reusing" in proc.stderr
    assert proc.stderr.count("finished before, reusing") == len(STUDENTS)
    assert (workdir / "students" / "KD-seed0" / "result.json").stat().st_mtime_ns == result_mtime
    for path, payload in before.items():
        if path.name != "config.json":  # the config of this run (progress=False); the old one is kept aside
            assert path.read_bytes() == payload, path
    assert not list(workdir.glob("results.*.json")), "identical results must not be backed up"
    assert [p.name for p in workdir.glob("config.*.json")], "the previous, different config.json was dropped"

    # A changed method setting is refused for the finished student instead of silently reusing it.
    proc = run_cli([*args, "--config.methods.DeBKD.beta=0.5"], cli_env(cache_dir))
    assert_clean_error(proc, "DeBKD-seed0", "other settings", "method.beta: 0.2 -> 0.5", "overwrite")
    assert json.loads((workdir / "results.json").read_text()) == json.loads(
        (e2e_run["workdir"] / "results.json").read_text()
    )


@pytest.mark.timeout(600)  # a CLI run, plus e2e_run if first
def test_reused_teacher_of_another_architecture_is_refused(e2e_run, tmp_path):
    teacher = e2e_run["workdir"] / "teacher"
    args = [
        *[a for a in e2e_run["args"] if not a.startswith("--workdir")],
        f"--workdir={tmp_path / 'run'}",
        f"--config.teacher.checkpoint={teacher}",
        "--config.teacher.model=resnet8",
    ]
    proc = run_main(args)
    assert_clean_error(proc, "architecture", "'resnet_tiny'", "'resnet8'")


@pytest.mark.parametrize(
    "flag, needles",
    [
        ("--config.nosuch=1", ["--config.nosuch=1", "no field 'nosuch'", "seeds"]),
        ("--config.methods.Nope.beta=1", ["no field 'Nope'", "DeBKD, KD"]),
        ("--config.teacher.num_epochs=1.5", ["num_epochs=1.5", "takes an int"]),
        ("--config.methods.DeBKD.num_regions=0", ["num_regions=0", ">= 1"]),
    ],
)
def test_bad_flags_and_values_give_one_clear_error(flag, needles, cache_dir, tmp_path):
    proc = run_main(cli_args(tmp_path / "run", cache_dir / "data", flag))
    assert_clean_error(proc, *needles)
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())


@pytest.mark.parametrize(
    "config, needles",
    [
        ("configs/nosuch.py", ["no config file", "nosuch.py"]),
        ("configs/methods.py:bogus", ["get_config() failed", "unknown config argument 'bogus'"]),
    ],
)
def test_bad_config_file_gives_one_clear_error(config, needles, cache_dir, tmp_path):
    proc = run_main(cli_args(tmp_path / "run", cache_dir / "data", config=config))
    assert_clean_error(proc, *needles)


def test_batch_size_not_divisible_by_devices(cache_dir, tmp_path):
    assert jax.device_count() == 8  # conftest's fake devices
    args = cli_args(tmp_path / "run", cache_dir / "data", "--config.student.batch_size=12")
    proc = run_main(args)
    assert_clean_error(proc, "student.batch_size=12", "8 devices")


def test_second_run_on_a_busy_workdir_is_refused(cache_dir, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with open(workdir / ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running job holds
        proc = run_main(cli_args(workdir, cache_dir / "data"))  # flock: this second open file is refused too
    assert_clean_error(proc, "in use by a running job", str(workdir))
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]


def test_unwritable_workdir(cache_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_main(cli_args(blocker / "run", cache_dir / "data"))
    assert_clean_error(proc, "cannot write", str(blocker / "run"))
    assert blocker.read_text() == "not a folder"
