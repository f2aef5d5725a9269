"""i. Input pipeline: decode + cache, cached load, batch delivery, side by side with the train step.

    python -m benchmarks.data [--source=folder:../shared/data/dogs_vs_cats_32] [--out=DIR] [--steps=N]

Standalone it writes `BENCHMARKS_DATA.md` and `benchmarks_data.json` into `--out`; as the `data` section of
`python -m benchmarks` it goes into BENCHMARKS.md. Batches are delivered on the path `fit` uses (seeded
`batch_indices`, host gather of images, labels and target rows, `make_global_batch` onto the mesh) and the
DeBKD train step of a student (ResNet-8 by default) runs on those batches.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.render import fmt, ratio, table
from debkd_jax import config_lib, methods, training
from debkd_jax import data as data_lib

DEFAULT_SOURCE = "folder:../shared/data/dogs_vs_cats_32"


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def global_batch(dataset, host_targets, idx, sharding) -> dict:
    """One batch exactly as `training.fit` builds it: images, labels and target rows sharded on 'data'."""
    return data_lib.gather_batch(dataset, host_targets, idx, sharding)


def deliver_batches(
    dataset, host_targets, batch_size: int, mesh, *, epoch: int = 0, limit: int | None = None
):
    """One epoch of batches as `training.fit` builds them; returns the number of images delivered."""
    sharding = NamedSharding(mesh, P("data"))
    order = data_lib.batch_indices(len(dataset.train_labels), batch_size, seed=0, epoch=epoch)
    delivered = 0
    for idx in order[:limit]:
        jax.block_until_ready(global_batch(dataset, host_targets, idx, sharding))
        delivered += len(idx)
    return delivered


def synthetic_targets(dataset, method_cfg):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(dataset.train_labels), dataset.num_classes)).astype(np.float32)
    logits[np.arange(len(logits)), dataset.train_labels] += 2.0
    return jax.tree.map(np.asarray, methods.method_targets(method_cfg, logits, dataset.train_labels))


def step_images_per_s(dataset, targets, method_cfg, model: str, batch_size: int, steps: int, mesh) -> float:
    """The DeBKD step of `model` on the first `steps` delivered batches (after two untimed ones)."""
    cfg = config_lib.train_config(model, num_epochs=1, batch_size=batch_size)
    steps_per_epoch = len(dataset.train_labels) // batch_size
    objective = methods.objective(method_cfg, cfg.num_epochs)
    spec = training.build_step_spec(
        cfg, dataset.num_classes, "float32", objective, steps_per_epoch, False, method_cfg=method_cfg
    )
    replicated, sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = training.init_state(
        jax.random.key(0),
        spec.model,
        training.make_optimizer(cfg, steps_per_epoch),
        dataset.train_images.shape[1:],
    )
    state, acc = jax.device_put(state, replicated), jax.device_put(training.zero_metrics(), replicated)
    step = training.make_train_step(spec, mesh, seed=0)
    order = data_lib.batch_indices(len(dataset.train_labels), batch_size, seed=0, epoch=0)
    batches = [global_batch(dataset, targets, idx, sharding) for idx in order[: steps + 2]]
    for b in batches[:2]:
        state, acc = step(state, acc, b, None, None)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for b in batches[2:]:
        state, acc = step(state, acc, b, None, None)
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
    targets = synthetic_targets(dataset, method_cfg)
    deliver_batches(dataset, targets, batch_size, mesh, limit=2)  # warm-up
    delivered, deliver_s = _timed(lambda: deliver_batches(dataset, targets, batch_size, mesh, epoch=1))
    results["batch_delivery_images_per_s"] = delivered / deliver_s
    results["train_step_images_per_s"] = step_images_per_s(
        dataset, targets, method_cfg, model, batch_size, steps, mesh
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
                "deliver one epoch of training batches (images, labels, target rows) to the mesh",
                fmt(r["batch_delivery_images_per_s"]),
            ],
            [f"{r['model']} DeBKD train step on those batches", fmt(r["train_step_images_per_s"])],
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
