"""The DeBKD paper's study at its scale, one command inside a time budget (the issue on the paper's Table 1):

    python -m results.paper.run_study --out=OUT --seconds=540                       # dogs_vs_cats,resnet8,gpu
    python -m results.paper.run_study --out=OUT --seconds=540 --variant=dogs_vs_cats,resnet18,gpu
    python -m results.paper.run_study --out=/tmp/ps --seconds=300 --variant=dogs_vs_cats,resnet8,gpu,smoke
    python -m results.paper.run_study --render OUT/paper_study.json   # the Markdown, from the JSON alone

From the repository root. It runs `python -m debkd_jax.main --config=configs/paper.py:VARIANT
--workdir=WORKDIR --config.seeds=k` for k = 1, 2, 3 in turn (`--seeds=N` plans N), each a child process whose
deadline is what is left of `--seconds` less `--margin`: the first trains the teacher and seed 0, each later
one only seed k - 1 (the job reuses the teacher and finished students, identity-checked), and each rewrites
WORKDIR/results.json with every finished seed; a student's result.json exists as soon as it finishes. A seed
is not started when `--safety` times the last seed's wall time does not fit in what is left, so a cut-off
leaves whole seeds; at the deadline the child's whole process group is killed. Re-running the command with the
same WORKDIR resumes (a seed finished before by the same command is not run again).

OUT receives 6 files at most (a device's $OUT returns 8): paper_study.json (the report: the paper's numbers
beside ours, the run, the job's whole results; `--render` rebuilds paper_study.md from it alone),
paper_study.md, log.txt (every child's output), commands.txt (the exact commands), environment.txt
(nvidia-smi, jax.devices(), versions), and WORKDIR itself (default OUT/run) or, when WORKDIR lies outside OUT
(checkpoints too large to copy back), run_records.tar.gz: its JSON, Markdown, CSV, plots and logits, without
checkpoints. `--data=PATH` sets `--config.data.source=folder:PATH`; each `--extra=--config.FIELD=V` is passed
on. docs/paper.md has the command for a GPU machine.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence

from debkd_jax import cli, config_lib, processes, workdir_lib
from debkd_jax.errors import UserError
from debkd_jax.report import paper

CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "paper.py"
)
BASENAME = "paper_study"
STEPS_FILE = "paper_study_steps.json"  # in WORKDIR: every step of every invocation, for the estimates
RECORD_SUFFIXES = (".json", ".md", ".png", ".csv", ".jsonl", ".npz")
NOT_RECORDS = ("checkpoints", "final", "tensorboard")
ENVIRONMENT = """import json, platform, jax, jaxlib, flax, optax, numpy
print(json.dumps(dict(backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
    device_kinds=sorted({d.device_kind for d in jax.devices()}),
    versions=dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
    flax=flax.__version__, optax=optax.__version__, numpy=numpy.__version__))))"""


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m results.paper.run_study", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", help="the output folder")
    p.add_argument("--seconds", type=float, help="the whole study ends inside this many seconds")
    p.add_argument("--variant", default="dogs_vs_cats,resnet8,gpu", help="configs/paper.py's argument")
    p.add_argument("--data", help="an image folder: --config.data.source=folder:PATH")
    p.add_argument(
        "--workdir", help="the job's workdir (default OUT/run); outside OUT its records are bundled"
    )
    p.add_argument(
        "--extra", action="append", default=[], help="--config.FIELD=V for every child; repeatable"
    )
    p.add_argument(
        "--seeds", type=int, help="plan this many seeds (default the variant's 3); a short loan plans fewer"
    )
    p.add_argument("--margin", type=float, default=30.0, help="seconds kept for the report (default 30)")
    p.add_argument(
        "--safety",
        type=float,
        default=1.0,
        help="start a seed only if this times the last seed's wall time fits (default 1)",
    )
    p.add_argument("--render", metavar="JSON", help="rebuild paper_study.md from this JSON (or its folder)")
    return p.parse_args(argv)


class Study:
    """One invocation: the budget, the log, the steps; `run` trains, `write` reports."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str]):
        self.start, self.started = time.monotonic(), _now()
        self.args, self.out = args, args.out
        self.workdir = args.workdir or os.path.join(args.out, "run")
        self.bundle = not _inside(self.workdir, self.out)
        module = config_lib.load_config_file(CONFIG)
        self.dataset, self.student, _smoke, _gpu = module.parse_arg(args.variant)
        self.config = module.get_config(args.variant)
        self.seeds = list(range(self.config.seed, self.config.seed + (args.seeds or self.config.seeds)))
        self.command = " ".join(["python -m results.paper.run_study", *argv])
        self.steps = workdir_lib.read_json(os.path.join(self.workdir, STEPS_FILE)) or []
        self.stopped, self.failed, self.environment = "not started", False, {}
        os.makedirs(self.out, exist_ok=True)
        self.log_file = open(os.path.join(self.out, "log.txt"), "a", encoding="utf-8")  # noqa: SIM115

    def left(self) -> float:
        return self.args.seconds - (time.monotonic() - self.start) - self.args.margin

    def say(self, text: str) -> None:
        line = f"=== [{time.monotonic() - self.start:.0f} s] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def child_command(self, k: int) -> list[str]:
        config = os.path.relpath(CONFIG)
        cmd = [
            "-m",
            "debkd_jax.main",
            f"--config={config}:{self.args.variant}",
            f"--workdir={self.workdir}",
            f"--config.seeds={k}",
            "--config.progress=False",
        ]
        if self.args.data:
            cmd.append(f"--config.data.source=folder:{self.args.data}")
        return cmd + list(self.args.extra)

    def seed_done(self, seed: int) -> list[str]:
        """The result.json of each student of `seed` that has finished."""
        paths = [
            os.path.join(self.workdir, "students", f"{workdir_lib.safe_name(m)}-seed{seed}", "result.json")
            for m in self.config.methods
        ]
        return [p for p in paths if os.path.exists(p)]

    def finished_before(self, k: int) -> bool:
        """Seeds 0..k-1 are in WORKDIR/results.json, written by a step of this same command (less its
        --config.seeds): step k would only reuse them, so it is not run again."""
        same = [
            c
            for c in self.steps
            if c["returncode"] == 0
            and c["seeds"] >= k
            and _without_seeds(c["command"][1:]) == _without_seeds(self.child_command(k))
        ]
        results = workdir_lib.read_json(os.path.join(self.workdir, "results.json"))
        return bool(same) and set(self.seeds[:k]) <= set(paper.finished_seeds(results))

    def estimate(self) -> tuple[float, float] | None:
        """(the last seed's wall time less any teacher trained in its step, that times --safety)."""
        for step in reversed(self.steps):
            if step.get("seed_seconds") is not None:
                return step["seed_seconds"], self.args.safety * step["seed_seconds"]
        return None

    def run(self) -> None:
        self.say(
            f"{self.command}: {len(self.seeds)} seeds of configs/paper.py:{self.args.variant} in "
            f"{self.args.seconds:.0f} s, workdir {self.workdir}"
        )
        self.environment = environment(max(1.0, min(120.0, self.left())), self.log_file)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for k, seed in enumerate(self.seeds, start=1):
            if self.finished_before(k):
                self.say(f"step {k}: seed {seed} finished before with this command; not run again")
                continue
            left, trained_before = self.left(), len(self.seed_done(seed)) == len(self.config.methods)
            estimate = None if trained_before else self.estimate()
            if left <= 0:
                self.stopped = (
                    f"the budget: nothing left for seed {seed} after the {self.args.margin:.0f} s margin"
                )
                break
            if estimate is not None and estimate[1] > left:
                self.stopped = (
                    f"the budget: seed {seed} would take about {estimate[0]:.0f} s (the last seed's "
                    f"time; times --safety={self.args.safety:g}: {estimate[1]:.0f} s), {left:.0f} s "
                    "were left"
                )
                break
            teacher_before = os.path.exists(os.path.join(self.workdir, "teacher", "teacher.json"))
            trains = (
                "reuses seed"
                if trained_before
                else ("the teacher and seed" if not teacher_before else "seed")
            )
            cmd = self.child_command(k)
            self.say(f"step {k}: {trains} {seed}, deadline {left:.0f} s: python {' '.join(cmd)}")
            t0, rc, timed_out = time.monotonic(), None, False
            try:
                rc = processes.run(
                    [sys.executable, *cmd],
                    timeout=left,
                    capture_output=False,
                    text=True,
                    stdout=self.log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                ).returncode
            except subprocess.TimeoutExpired:
                timed_out = True
            seconds = time.monotonic() - t0
            results = workdir_lib.read_json(os.path.join(self.workdir, "results.json"))
            step = dict(
                seeds=k,
                seed=seed,
                trains=f"{trains} {seed}",
                command=["python", *cmd],
                seconds=seconds,
                returncode=rc,
                timed_out=timed_out,
                started=_now(),
                new_students=len(self.seed_done(seed)),
                seed_seconds=None,
            )
            if rc == 0 and not trained_before:
                teacher = (
                    0.0
                    if teacher_before
                    else float(((results or {}).get("teacher") or {}).get("wall_seconds") or 0.0)
                )
                step["seed_seconds"] = max(seconds - teacher, 0.0)
            self.steps.append(step)
            workdir_lib.write_json(os.path.join(self.workdir, STEPS_FILE), self.steps)
            self.say(
                f"step {k}: exit {rc}{' (deadline)' if timed_out else ''} after {seconds:.0f} s; "
                f"{step['new_students']} of {len(self.config.methods)} students of seed {seed} finished"
            )
            if timed_out:
                self.stopped = (
                    f"the deadline: --config.seeds={k} (seed {seed}) was stopped after {seconds:.0f} s; "
                    "its finished students are kept and reused by a re-run"
                )
                break
            if rc != 0:
                self.stopped, self.failed = (
                    f"an error: --config.seeds={k} exited with status {rc} (log.txt)",
                    True,
                )
                break
        else:
            self.stopped = f"all {len(self.seeds)} seeds finished"

    def setup(self) -> dict:
        """The settings the job ran with (its config.json, overrides included), else the variant's."""
        config = workdir_lib.read_json(os.path.join(self.workdir, "config.json")) or self.config.to_dict()
        keep = ("source", "max_per_class", "augment", "image_size", "pipeline")
        return {
            "teacher": {k: v for k, v in config["teacher"].items() if k != "logits"},
            "student": dict(config["student"]),
            "dtype": config["dtype"],
            "seed": config["seed"],
            "data": {k: config["data"].get(k) for k in keep},
        }

    def write(self) -> list[str]:
        results = workdir_lib.read_json(os.path.join(self.workdir, "results.json"))
        run = dict(
            command=self.command,
            variant=self.args.variant,
            seconds=self.args.seconds,
            margin=self.args.margin,
            safety=self.args.safety,
            started=self.started,
            finished=_now(),
            elapsed=time.monotonic() - self.start,
            stopped=self.stopped,
            workdir=self.workdir,
            teacher_finished=os.path.exists(os.path.join(self.workdir, "teacher", "teacher.json")),
            steps=self.steps,
            environment=self.environment,
        )
        study = paper.paper_study(
            results=results,
            dataset=self.dataset,
            student=self.student,
            setup=self.setup(),
            seeds_planned=self.seeds,
            run=run,
        )
        written = paper.write_paper_study(self.out, study, BASENAME)
        lines = [f"# {self.started}, from the repository root", self.command]
        lines += [
            f"# step {s['seeds']} ({s['trains']}): exit {s['returncode']}, {s['seconds']:.0f} s\n"
            + " ".join(s["command"])
            for s in self.steps
        ]
        workdir_lib.atomic_write_bytes(
            os.path.join(self.out, "commands.txt"), ("\n".join(lines) + "\n").encode()
        )
        if self.bundle and os.path.isdir(self.workdir):
            workdir_lib.atomic_write_bytes(
                os.path.join(self.out, "run_records.tar.gz"), records(self.workdir)
            )
        self.say(
            f"stopped by {self.stopped}; {len(study['seeds']['finished'])} of {len(self.seeds)} seeds "
            f"finished; wrote {', '.join(written)}"
        )
        return written


def environment(timeout: float, log_file) -> dict:
    """jax.devices() and the versions (in a child: this process never takes the accelerator), nvidia-smi's
    output where there is one; also written to environment.txt beside log.txt."""
    found: dict = {"platform": sys.platform, "cpus": os.cpu_count(), "hostname": os.uname().nodename}
    text = []
    try:
        done = processes.run([sys.executable, "-c", ENVIRONMENT], timeout=timeout)
        found.update(
            json.loads(done.stdout.strip().splitlines()[-1])
            if done.returncode == 0
            else {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}  # no traceback paths
        )
    except subprocess.TimeoutExpired:  # its repr names the interpreter's path
        found["error"] = f"no answer within {timeout:.0f} s"
    except (IndexError, json.JSONDecodeError) as e:
        found["error"] = repr(e)
    if shutil.which("nvidia-smi"):
        for args in ([], ["--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv"]):
            try:
                done = processes.run(["nvidia-smi", *args], timeout=60)
                text.append(done.stdout + done.stderr)
            except subprocess.TimeoutExpired:
                text.append("nvidia-smi did not answer in 60 s")
        found["nvidia_smi"] = text[-1].strip()
    else:
        text.append("no nvidia-smi on this machine")
    text.append(json.dumps(found, indent=1))
    path = os.path.join(os.path.dirname(log_file.name), "environment.txt")
    workdir_lib.atomic_write_bytes(path, ("\n".join(text) + "\n").encode())
    log_file.write("\n".join(text) + "\n")
    log_file.flush()
    return found


def records(workdir: str) -> bytes:
    """A .tar.gz of the workdir's records (JSON, Markdown, CSV, plots, logits), without checkpoints."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for root, dirs, names in os.walk(workdir):
            dirs[:] = sorted(d for d in dirs if d not in NOT_RECORDS)
            for name in sorted(names):
                if name.endswith(RECORD_SUFFIXES):
                    path = os.path.join(root, name)
                    tar.add(path, arcname=os.path.join("run", os.path.relpath(path, workdir)))
    return buf.getvalue()


def _without_seeds(command: Sequence[str]) -> list[str]:
    return [a for a in command if not a.startswith("--config.seeds=")]


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    with cli.user_errors():
        if args.render:
            path = (
                os.path.join(args.render, f"{BASENAME}.json") if os.path.isdir(args.render) else args.render
            )
            print("wrote " + paper.render_paper_study(path))
            return 0
        if not args.out or args.seconds is None or args.seconds <= 0:
            raise UserError("give --out=FOLDER and --seconds=N (N > 0), or --render=JSON.")
        if args.seeds is not None and args.seeds < 1:
            raise UserError(f"--seeds={args.seeds}: give at least 1 seed.")
        for extra in args.extra:
            if not extra.startswith("--config.") or extra.split("=")[0] in (
                "--config.seeds",
                "--config.seed",
            ):
                raise UserError(f"--extra={extra!r}: give --config.FIELD=VALUE; seeds are the study's own.")
        try:
            study = Study(args, argv)
        except ValueError as e:  # configs/paper.py's word on an unknown variant
            raise UserError(str(e)) from e
        try:
            study.run()
        finally:
            study.write()
            study.log_file.close()
    return 1 if study.failed else 0


if __name__ == "__main__":
    sys.exit(main())
