"""i. Input pipeline: decode + cache, cached load, batch delivery, side by side with the train step.

    python -m benchmarks.data [--source=folder:../shared/data/dogs_vs_cats_32] [--out=DIR] [--steps=N]

Standalone it writes `BENCHMARKS_DATA.md` and `benchmarks_data.json` into `--out`; as the `data` section of
`python -m benchmarks` it goes into BENCHMARKS.md. Batches are delivered on the path `fit` uses (the memory
kind's iterator: the seeded order, one host gather of images, labels and teacher-logit rows, then
`make_global_batch` onto the mesh) and the DeBKD train step of a student (ResNet-8 by default), its targets
built in the step, runs on those batches.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.render import fmt, ratio, table
from debkd_jax import config_lib, methods, pipeline, training
from debkd_jax import data as data_lib
from debkd_jax.data import logits_store, stream

DEFAULT_SOURCE = "folder:../shared/data/dogs_vs_cats_32"


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def train_batches(source, logits, batch_size: int, mesh, *, epochs: int = 1):
    """The run's global batches as `training.fit` builds them: the memory kind's iterator (one numpy gather of
    images, labels and teacher-logit rows per step) and one `make_global_batch` onto the mesh."""
    sharding = NamedSharding(mesh, P("data"))
    order = stream.TrainOrder(len(source.splits["train"]), batch_size, 0, epochs)
    for local in data_lib.source.train_batches(source, order, logits=logits):
        batch = {k: local[k] for k in ("image", "label", "teacher_logits")}
        yield data_lib.make_global_batch(batch, sharding)


def deliver_batches(source, logits, batch_size: int, mesh, *, limit: int | None = None) -> int:
    """One epoch of batches as `training.fit` builds them; returns the number of images delivered."""
    delivered = 0
    for i, batch in enumerate(train_batches(source, logits, batch_size, mesh)):
        if limit is not None and i >= limit:
            break
        jax.block_until_ready(batch)
        delivered += batch_size
    return delivered


def synthetic_logits(source):
    labels = source.splits["train"].labels
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(labels), source.num_classes)).astype(np.float32)
    logits[np.arange(len(logits)), labels] += 2.0
    return logits_store.ArrayLogits(logits)


def step_images_per_s(source, logits, method_cfg, model: str, batch_size: int, steps: int, mesh) -> float:
    """The DeBKD step of `model`, its targets built in the step from each batch's teacher-logit rows (as the
    job trains), on the first `steps` delivered batches (after two untimed ones)."""
    cfg = config_lib.train_config(model, num_epochs=1, batch_size=batch_size)
    steps_per_epoch = len(source.splits["train"]) // batch_size
    objective = methods.objective(method_cfg, cfg.num_epochs)
    spec = training.build_step_spec(
        cfg, source.num_classes, "float32", objective, steps_per_epoch, False, method_cfg=method_cfg
    )
    replicated = NamedSharding(mesh, P())
    state = training.init_state(
        jax.random.key(0),
        spec.model,
        training.make_optimizer(cfg, steps_per_epoch),
        (source.image_size, source.image_size, 3),
    )
    state, acc = jax.device_put(state, replicated), jax.device_put(training.zero_metrics(), replicated)
    ki_table = pipeline.infusion_table(logits, source.splits["train"].labels, method_cfg.ki_mode)
    infusion = jax.device_put(ki_table, replicated)
    step = training.make_train_step(spec, mesh)
    batches = list(itertools.islice(train_batches(source, logits, batch_size, mesh), steps + 2))
    for b in batches[:2]:
        state, acc = step(state, acc, b, None, infusion)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for b in batches[2:]:
        state, acc = step(state, acc, b, None, infusion)
    jax.block_until_ready(state)
    return len(batches[2:]) * batch_size / (time.perf_counter() - t0)


def measure_source(source: str, batch_size: int = 128, steps: int = 10, model: str = "resnet8") -> dict:
    results: dict = {
        "source": source,
        "batch_size": batch_size,
        "model": model,
        "load_before": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory() as cache_dir:
        load = lambda: data_lib.load_dataset(source, cache_dir=cache_dir, seed=0, progress=False)
        dataset, decode_s = _timed(load)
        _, cached_s = _timed(load)
    n = len(dataset.train_labels) + len(dataset.val_labels) + len(dataset.test_labels)
    results.update(
        images=n, decode_and_cache_images_per_s=n / decode_s, cached_load_images_per_s=n / cached_s
    )
    mesh = training.create_mesh()
    method_cfg = methods.preset("DeBKD")
    source = data_lib.memory_source(dataset)
    logits = synthetic_logits(source)
    deliver_batches(source, logits, batch_size, mesh, limit=2)  # warm-up
    delivered, deliver_s = _timed(lambda: deliver_batches(source, logits, batch_size, mesh))
    results["batch_delivery_images_per_s"] = delivered / deliver_s
    results["train_step_images_per_s"] = step_images_per_s(
        source, logits, method_cfg, model, batch_size, steps, mesh
    )
    results["delivery_over_step"] = (
        results["batch_delivery_images_per_s"] / results["train_step_images_per_s"]
    )
    results["load_after"] = os.getloadavg()[0]
    return results


def measure(ctx) -> dict:
    source = ctx.mode.data_source
    if source.startswith("folder:") and not os.path.isdir(source.split(":", 1)[1]):
        ctx.log(f"data: {source} not found, using digits")
        source = "digits"
    ctx.log(f"data: {source}")
    return measure_source(source, steps=ctx.mode.data_steps, model=ctx.mode.data_model)


def render(r: dict) -> list[str]:
    lines = [f"## i. Input pipeline ({r['source']}, {r['images']:,} images, batch {r['batch_size']})", ""]
    lines += table(
        ["phase", "images/s"],
        [
            ["decode every file and write the cache", fmt(r["decode_and_cache_images_per_s"])],
            ["load the cache", fmt(r["cached_load_images_per_s"])],
            [
                "deliver one epoch of training batches (images, labels, teacher-logit rows) to the mesh",
                fmt(r["batch_delivery_images_per_s"]),
            ],
            [f"{r['model']} DeBKD train step on those batches, targets built in the step",
             fmt(r["train_step_images_per_s"])],
        ],
    )
    return lines + [
        "",
        f"Batch delivery over the train step's rate: {ratio(r['delivery_over_step'], 0)}.",
        "",
    ]


def write(results: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "benchmarks_data.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    text = "\n".join(
        [
            "# Input pipeline benchmark",
            "",
            f"`python -m benchmarks.data --source={results['source']}`; load average "
            f"{results['load_before']:.2f} before, {results['load_after']:.2f} after.",
            "",
            *render(results),
        ]
    )
    with open(os.path.join(out_dir, "BENCHMARKS_DATA.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--out", default=".")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", default="resnet8", help="the student whose train step is timed")
    args = parser.parse_args(argv)
    print(write(measure_source(args.source, args.batch_size, args.steps, args.model), args.out))
    return 0


if __name__ == "__main__":
    from debkd_jax import xla_cpu

    xla_cpu.apply_defaults()
    raise SystemExit(main())
