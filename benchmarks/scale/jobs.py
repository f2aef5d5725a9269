"""The scale benchmark's subprocesses and their inputs: generated JPEG folders, a teacher's variables file,
and `configs/imagenet.py:smoke:KD` run under a sampler of its process tree's resident memory."""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks import workers
from benchmarks.steps import init_variables
from debkd_jax import config_checks

SIZES = (5_000, 20_000, 80_000)  # images in the folders of the memory part (`--sizes`)

# Runs the job and samples the summed resident memory of its process tree (the job and grain's worker
# processes) every 0.2 s from /proc; prints the peak.
TREE_RSS = """
import json, os, subprocess, sys, time
from debkd_jax.processes import popen

def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0

def tree(root):
    children = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out

with open(sys.argv[1], "wb") as log:
    proc = popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    peak = main_peak = 0
    while proc.poll() is None:
        pids = tree(proc.pid)
        peak = max(peak, sum(rss_kib(p) for p in pids))
        main_peak = max(main_peak, rss_kib(proc.pid))
        time.sleep(0.2)
print(json.dumps({"returncode": proc.returncode, "peak_tree_kib": peak, "peak_main_kib": main_peak}))
"""

POOL = 256


POOL = 256


def jpeg_pool(width: int, height: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(POOL):
        base = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        pool.append(buf.getvalue())
    return pool


def jpeg_folder(n: int, width: int, height: int) -> str:
    """`n` JPEGs (width x height) in two class folders under the temporary folder, made once."""
    root = os.path.join(tempfile.gettempdir(), f"debkd-bench-jpegs-{n}-{width}x{height}")
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    pool = jpeg_pool(width, height)
    for c in ("a", "b"):
        os.makedirs(os.path.join(root, c), exist_ok=True)
    for i in range(n):
        with open(os.path.join(root, "ab"[i % 2], f"{i:06d}.jpg"), "wb") as f:
            f.write(pool[i % POOL])
    open(done, "w").close()
    return root


def teacher_file(path: str, image_size: int) -> str:
    from flax import serialization

    from debkd_jax import models

    variables = init_variables(models.get_model("imagenet_resnet_tiny", 2), 1, image_size)
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(jax_to_numpy(variables)))
    return path


def jax_to_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


def job_memory(ctx, folder: str, pipeline: str, teacher: str) -> dict:
    """Peak RSS of `configs/imagenet.py:smoke:KD` (teacher given, so: the teacher pass over every image, then
    one student epoch) on `folder` with `data.pipeline=pipeline` (for "memory", the fields only image files
    read, `config_checks.FILES_ONLY_FIELDS`, at their defaults)."""
    workdir = tempfile.mkdtemp(prefix="debkd-bench-scale-")
    cmd = [
        sys.executable,
        "-m",
        "debkd_jax.main",
        "--config=configs/imagenet.py:smoke:KD",
        f"--workdir={workdir}",
        f"--config.data.source=folder:{folder}",
        f"--config.data.pipeline={pipeline}",
        f"--config.teacher.variables={teacher}",
        "--config.student.num_epochs=1",
        "--config.data.max_per_class=0",
    ]
    if pipeline == "memory":  # the in-memory kind refuses the smoke config's grain settings: their defaults
        cmd += [f"--config.{name}={default}" for name, default in config_checks.FILES_ONLY_FIELDS.items()]
    ctx.log("scale: " + " ".join(cmd[2:]))
    log_path = os.path.join(workdir, "main.log")
    t0 = time.perf_counter()
    try:
        usage = workers.run_json(
            [sys.executable, "-c", TREE_RSS, log_path, *cmd],
            env=workers.child_env(drop_flags=("--xla_force_host_platform_device_count",)),
            timeout=ctx.mode.worker_timeout_s,
            section="scale",
            what="the job",
        )
        with open(log_path, "rb") as f:
            tail = f.read().decode(errors="replace")[-600:] if usage["returncode"] else ""
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "pipeline": pipeline,
        "returncode": usage["returncode"],
        "seconds": time.perf_counter() - t0,
        "peak_tree_mib": usage["peak_tree_kib"] / 1024,
        "peak_main_mib": usage["peak_main_kib"] / 1024,
        "tail": tail,
    }


def memory_growth(ctx, sizes) -> dict:
    teacher = teacher_file(os.path.join(tempfile.gettempdir(), "debkd-bench-scale-teacher.msgpack"), 32)
    rows = {}
    for n in sizes:
        folder = jpeg_folder(n, 64, 48)
        rows[str(n)] = {p: job_memory(ctx, folder, p, teacher) for p in ("stream", "memory")}
    return {"sizes": list(sizes), "rows": rows, "image": "64x48 JPEG", "image_size": 32}
