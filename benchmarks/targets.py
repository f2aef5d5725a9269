"""Where the students' targets come from, and what each source costs: `targets` fixed, online and stored,
each a whole job (M methods x S seeds, augmentation on, one given teacher), run side by side and interleaved
over rounds; and the error of a top-k store on a real many-class teacher.

    python -m benchmarks.targets [--out=DIR] [--rounds=3] [--per-class=400] [--epochs=2] [--seeds=2]
    python -m benchmarks.targets --render DIR/targets.json      # TARGETS.md again, from the JSON alone

Cost: `configs/targets_study.py` (KD and DeBKD, ResNet8x4 teacher, ResNet-8 students, pad-4 crops and flips,
one view per student epoch) on `--per-class` images per class of Dogs vs Cats. A first job trains the teacher
(1 epoch); every timed job reuses it (`teacher.checkpoint`), so what differs between the modes is where the
targets come from. Each job is a child process; round 0 is a warm-up and is not reported. Teacher forwards
are the images the teacher network runs on for the training targets, counted from each run's records.

Top-k: the teacher of `configs/study.py:digits10` (10 classes, the many-class data here) gives its logits
on its training images; each is stored as its top k (`logits_store.pack_topk`) and rebuilt
(`unpack_topk`), and every method's targets (`methods.method_targets`) are compared with those of the whole
rows: the largest absolute error of a soft label, and the share of rows whose DeBKD region moves.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks.render import fmt, ratio, table
from benchmarks.timing import rotation
from debkd_jax import methods, processes, workdir_lib
from debkd_jax.data import logits_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("fixed", "online", "stored")
IMAGENET_TRAIN_IMAGES = 1_281_167  # TFDS imagenet2012, train split
IMAGENET_CLASSES = 1000
JOB_SECONDS = 3600


def job(mode: str, workdir: str, args, *extra: str) -> dict:
    """One `python -m debkd_jax.main` run of configs/targets_study.py:MODE; its wall time and records."""
    cmd = [
        sys.executable, "-m", "debkd_jax.main", f"--config=configs/targets_study.py:{mode}",
        f"--workdir={workdir}", f"--config.data.max_per_class={args.per_class}",
        f"--config.student.num_epochs={args.epochs}", f"--config.data.views={args.epochs}",
        f"--config.seeds={args.seeds}", "--config.teacher.num_epochs=1", "--config.progress=False", *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    proc = processes.run(cmd, timeout=JOB_SECONDS, cwd=REPO)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{mode} job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    results = workdir_lib.read_json(os.path.join(workdir, "results.json"))
    return {"wall_seconds": wall, **costs(results, workdir)}


def costs(results: dict, workdir: str) -> dict:
    """What a finished run spent on its targets, from its records: teacher forwards for the training
    targets (its views pass, and in `online` the teacher in every step), the students' and the pass's
    seconds, and the bytes of a stored view."""
    n = results["dataset"]["sizes"]["train"]
    views = results["targets"].get("views", 1)
    students = [r for m in results["methods"].values() for r in m["per_seed"]]
    views_file = os.path.join(workdir, "teacher", "views.npz")
    stored = os.path.exists(views_file)
    forwards = views * n if stored else n
    if results["targets"]["mode"] == "online":
        batch = workdir_lib.read_json(os.path.join(workdir, "config.json"))["student"]["batch_size"]
        forwards += len(students) * results["student_epochs"] * (n // batch) * batch
    return {
        "students": len(students),
        "teacher_forwards": forwards,
        "student_seconds": results["meta"]["student_seconds"],
        "targets_seconds": results["meta"]["targets_seconds"],
        "views_pass": stored,
        "bytes_per_view": os.path.getsize(views_file) / (views * n) if stored else None,
        "train_images": n,
        "views": views,
    }


def measure_cost(args, work: str) -> dict:
    teacher_run = os.path.join(work, "teacher")
    job("fixed", teacher_run, args)
    checkpoint = f"--config.teacher.checkpoint={os.path.join(teacher_run, 'teacher')}"
    rounds = []
    for r in range(args.rounds + 1):
        order = rotation(MODES, r)
        got = {m: job(m, os.path.join(work, f"r{r}-{m}"), args, checkpoint) for m in order}
        print(f"round {r}: " + ", ".join(f"{m} {got[m]['wall_seconds']:.0f} s" for m in MODES), flush=True)
        if r:
            rounds.append(got)
    first = workdir_lib.read_json(os.path.join(work, "r1-fixed", "results.json"))
    return {"rounds": rounds, "methods": list(first["methods"]), "seeds": args.seeds, "epochs": args.epochs}


def imagenet_store(top_k: int = 100, views: int = 100) -> dict:
    """Bytes of one stored view of 1,000 classes (a top-k row as `pack_topk` writes it, or a whole float32
    row) and of the store for ImageNet's training images at `views` views."""
    row = logits_store.pack_topk(np.zeros((1, IMAGENET_CLASSES), np.float32), top_k)
    whole = np.zeros((1, IMAGENET_CLASSES), np.float32)
    per_view = {"top_k": row.nbytes, "whole": whole.nbytes}
    total = {k: v * views * IMAGENET_TRAIN_IMAGES for k, v in per_view.items()}
    return {"top_k": top_k, "views": views, "bytes_per_view": per_view, "bytes": total}


def digits10_logits(work: str) -> tuple[np.ndarray, np.ndarray]:
    """The configs/study.py:digits10 teacher's logits on its training images, and their labels."""
    workdir = os.path.join(work, "digits10")
    cmd = [
        sys.executable, "-m", "debkd_jax.main", "--config=configs/study.py:digits10", f"--workdir={workdir}",
        "--config.seeds=1", "--config.student.num_epochs=1", "--config.progress=False",
    ]  # fmt: skip
    proc = processes.run(cmd, timeout=JOB_SECONDS, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"digits10 job failed:\n{proc.stderr[-3000:]}")
    with np.load(os.path.join(workdir, "teacher", "logits.npz")) as z:
        logits = z["train"]
    with open(os.path.join(workdir, "splits.csv"), encoding="utf-8") as f:
        labels = [int(r["label"]) for r in csv.DictReader(f) if r["split"] == "train"]
    return logits, np.asarray(labels, np.int32)


def topk_error(logits: np.ndarray, labels: np.ndarray, ks) -> list[dict]:
    """For each k, each method's targets from the rebuilt top-k rows against those from the whole rows."""
    import jax

    def soft_labels(cfg, targets):
        return np.asarray(jax.nn.softmax(targets.logits / cfg.temperature, -1))

    whole = {}  # per method: its config, targets and soft labels from the whole rows
    for name in ("KD", "DKD", "DeBKD", "BTKD-swap"):
        cfg = methods.preset(name)
        a = methods.method_targets(cfg, logits, labels)
        whole[name] = (cfg, a, soft_labels(cfg, a))
    out = []
    for k in ks:
        rebuilt = logits_store.unpack_topk(logits_store.pack_topk(logits, k), logits.shape[1], k)
        row = {"k": k, "max_abs_logit_error_top": float(_top_error(logits, rebuilt, k))}
        for name, (cfg, a, p) in whole.items():
            b = methods.method_targets(cfg, rebuilt, labels)
            q = soft_labels(cfg, b)
            moved = np.any(
                (np.asarray(a.lo) != np.asarray(b.lo)) | (np.asarray(a.hi) != np.asarray(b.hi)), -1
            )
            row[name] = {
                "max_abs_soft_label_error": float(np.max(np.abs(p - q))),
                "rows_whose_region_moves": float(moved.mean()),
            }
        out.append(row)
    return out


def _top_error(logits, rebuilt, k):
    idx = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return np.max(np.abs(np.take_along_axis(logits, idx, -1) - np.take_along_axis(rebuilt, idx, -1)))


def summarize(cost: dict) -> dict:
    """Per mode: medians over rounds of wall time, per-student seconds and the pass's seconds; the ratios of
    each mode's to fixed's, per round then the median."""

    def per_student(run):
        return run["student_seconds"] / run["students"]

    def median(values):
        return float(np.median(list(values)))

    out, fixed = {}, [r["fixed"] for r in cost["rounds"]]
    counted = ("teacher_forwards", "bytes_per_view", "students", "views", "train_images")
    for m in MODES:
        runs = [r[m] for r in cost["rounds"]]
        pairs = list(zip(runs, fixed, strict=True))
        out[m] = {
            "wall_seconds": median(r["wall_seconds"] for r in runs),
            "seconds_per_student": median(per_student(r) for r in runs),
            "targets_seconds": median(r["targets_seconds"] for r in runs),
            "over_fixed": median(r["wall_seconds"] / f["wall_seconds"] for r, f in pairs),
            "student_over_fixed": median(per_student(r) / per_student(f) for r, f in pairs),
            **{k: runs[0][k] for k in counted},
        }
    return out


def render(results: dict) -> list[str]:
    s, c = results["summary"], results["cost"]
    n, v = s["fixed"]["train_images"], s["fixed"]["views"]
    lines = [
        "## Cost of each source of targets",
        "",
        f"One job per mode: {len(c['methods'])} methods ({', '.join(c['methods'])}) x {c['seeds']} seeds "
        f"= {s['fixed']['students']} students of {c['epochs']} epochs on {n} training images, {v} views, the "
        f"teacher given; medians over {len(c['rounds'])} interleaved rounds (a warm-up round not counted). "
        "Ratios: per round, then the median (> 1: costs more than fixed).",
        "",
    ]
    rows = [
        [m, fmt(s[m]["teacher_forwards"]), fmt(s[m]["targets_seconds"], 1),
         fmt(s[m]["seconds_per_student"], 1), ratio(s[m]["student_over_fixed"]), fmt(s[m]["wall_seconds"], 1),
         ratio(s[m]["over_fixed"]), "" if s[m]["bytes_per_view"] is None else fmt(s[m]["bytes_per_view"], 1)]
        for m in MODES
    ]  # fmt: skip
    headers = ["targets", "teacher forwards", "views pass (s)", "s per student", "per student / fixed",
               "job wall (s)", "job / fixed", "bytes per stored view"]  # fmt: skip
    lines += table(headers, rows)
    im = results["imagenet_store"]
    gb = {k: b / 1e9 for k, b in im["bytes"].items()}
    lines += [
        "",
        f"ImageNet at V = {im['views']} views ({IMAGENET_TRAIN_IMAGES:,} training images, 1,000 classes): "
        f"a top-{im['top_k']} view is {im['bytes_per_view']['top_k']} bytes (`pack_topk`: {im['top_k']} "
        f"values, {im['top_k']} indices and a log-sum-exp, float32), {gb['top_k']:,.0f} GB in all; whole "
        f"float32 rows would be {im['bytes_per_view']['whole']} bytes a view, {gb['whole']:,.0f} GB. "
        "Formula: V x N x 4 (2k + 1) bytes.",
        "",
        "## Error of a top-k store",
        "",
        f"The teacher of `configs/study.py:digits10` (10 classes) on its {results['topk_rows']} training "
        "images: each method's targets from the rebuilt top-k rows against those from the whole rows.",
        "",
    ]
    names = ("KD", "DKD", "DeBKD", "BTKD-swap")
    rows = [
        [r["k"], f"{r['max_abs_logit_error_top']:.2e}",
         *(f"{r[m]['max_abs_soft_label_error']:.2e}" for m in names),
         f"{100 * r['DeBKD']['rows_whose_region_moves']:.2f}%"]
        for r in results["topk"]
    ]  # fmt: skip
    headers = ["k", "top-k logits (float16)", *(f"{m} soft label" for m in names), "DeBKD regions moved"]
    return lines + table(headers, rows) + [""]


def write(results: dict, out_dir: str) -> str:
    text = "\n".join(
        [
            "# Targets: fixed, online, stored",
            "",
            f"`{results['command']}` on {results['date']}; load average {results['load_before']:.2f} before, "
            f"{results['load_after']:.2f} after; {results['cpus']} CPUs.",
            "",
            *render(results),
        ]
    )
    workdir_lib.write_json(os.path.join(out_dir, "targets.json"), results)
    workdir_lib.atomic_write_bytes(os.path.join(out_dir, "TARGETS.md"), text.encode())
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.targets", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--top-k", default="1,2,3,5,9")
    parser.add_argument("--render", default="", help="a targets.json: rewrite its TARGETS.md from it alone")
    parser.add_argument("--work", default="", help="where the jobs run (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.render:
        print(write(workdir_lib.read_json(args.render), os.path.dirname(os.path.abspath(args.render))))
        return 0
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"targets-{date}")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="debkd-targets-") as temporary:
        work = args.work or temporary
        logits, labels = digits10_logits(work)
        cost = measure_cost(args, work)
    results = {
        "command": "python -m benchmarks.targets " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": date,
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "cost": cost,
        "summary": summarize(cost),
        "imagenet_store": imagenet_store(),
        "topk_rows": len(labels),
        "topk": topk_error(logits, labels, [int(k) for k in args.top_k.split(",")]),
    }
    print(write(results, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
