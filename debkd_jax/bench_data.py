"""Input-pipeline benchmark: decode + cache, cached load, batch delivery, side by side with a train step.

    python -m debkd_jax.bench_data [--source=folder:../shared/data/dogs_vs_cats_32] [--out=DIR] [--steps=N]

Writes `BENCHMARKS_DATA.md` and `benchmarks_data.json` into `--out`. Batch delivery is timed on the path `fit`
uses (seeded `batch_indices`, host gather of images, labels and target rows, `make_global_batch` onto the mesh)
and compared with the ResNet-8 train step at the same batch size: delivery must be far faster (>= 20x) so that
input never limits training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from debkd_jax import config_lib, methods, train
from debkd_jax import data as data_lib


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def deliver_batches(dataset, host_targets, batch_size: int, mesh, *, epoch: int = 0, limit: int | None = None):
    """One epoch of batches exactly as `train.fit` builds them; returns the number of images delivered."""
    sharding = NamedSharding(mesh, P("data"))
    order = data_lib.batch_indices(len(dataset.train_labels), batch_size, seed=0, epoch=epoch)
    delivered = 0
    for idx in order[:limit]:
        batch = data_lib.make_global_batch(
            {"image": dataset.train_images[idx], "label": dataset.train_labels[idx]}, sharding
        )
        batch["rows"] = jax.tree.map(
            lambda a, idx=idx: jax.make_array_from_process_local_data(sharding, a[idx]), host_targets
        )
        jax.block_until_ready(batch)
        delivered += len(idx)
    return delivered


def run(source: str, out_dir: str, batch_size: int = 128, steps: int = 10) -> dict:
    results: dict = {"source": source, "batch_size": batch_size, "machine": platform.processor() or platform.machine(),
                     "cpus": os.cpu_count(), "jax": jax.__version__, "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as cache_dir:
        load = lambda: data_lib.load_dataset(source, cache_dir=cache_dir, seed=0, progress=False)
        dataset, decode_s = _timed(load)
        n = len(dataset.train_labels) + len(dataset.val_labels) + len(dataset.test_labels)
        _, cached_s = _timed(load)
    results["images"] = n
    results["decode_and_cache_images_per_s"] = n / decode_s
    results["cached_load_images_per_s"] = n / cached_s

    mesh = train.create_mesh()
    k = dataset.num_classes
    rng = np.random.default_rng(0)
    teacher_logits = rng.normal(size=(len(dataset.train_labels), k)).astype(np.float32)
    teacher_logits[np.arange(len(teacher_logits)), dataset.train_labels] += 2.0
    method_cfg = methods.preset("DeBKD")
    targets = jax.tree.map(np.asarray, methods.method_targets(method_cfg, teacher_logits, dataset.train_labels))

    deliver_batches(dataset, targets, batch_size, mesh, limit=2)  # warm-up
    delivered, deliver_s = _timed(lambda: deliver_batches(dataset, targets, batch_size, mesh, epoch=1))
    results["batch_delivery_images_per_s"] = delivered / deliver_s

    # The ResNet-8 DeBKD step at the same batch size, on the same batches.
    scfg = config_lib.train_config("resnet8", num_epochs=1, batch_size=batch_size)
    steps_per_epoch = len(dataset.train_labels) // batch_size
    objective = methods.objective(method_cfg, scfg.num_epochs)
    spec = train._step_spec(scfg, k, "float32", objective, steps_per_epoch, False, method_cfg=method_cfg)
    state = train.init_state(jax.random.key(0), spec.model, train.make_optimizer(scfg, steps_per_epoch),
                             dataset.train_images.shape[1:])
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(state, replicated)
    acc = jax.device_put(train.zero_metrics(), replicated)
    step = train.make_train_step(spec, mesh, seed=0)
    sharding = NamedSharding(mesh, P("data"))
    order = data_lib.batch_indices(len(dataset.train_labels), batch_size, seed=0, epoch=0)
    batches = []
    for idx in order[: steps + 2]:
        b = data_lib.make_global_batch({"image": dataset.train_images[idx], "label": dataset.train_labels[idx]},
                                       sharding)
        b["rows"] = jax.tree.map(lambda a, idx=idx: jax.make_array_from_process_local_data(sharding, a[idx]),
                                 targets)
        batches.append(b)
    for b in batches[:2]:
        state, acc = step(state, acc, b, None, None)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for b in batches[2:]:
        state, acc = step(state, acc, b, None, None)
    jax.block_until_ready(state)
    results["train_step_images_per_s"] = steps * batch_size / (time.perf_counter() - t0)
    results["delivery_over_step"] = results["batch_delivery_images_per_s"] / results["train_step_images_per_s"]
    results["load_after"] = os.getloadavg()[0]
    _write(results, out_dir)
    return results


def _write(results: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "benchmarks_data.json"), "w") as f:
        json.dump(results, f, indent=2)
    r = results
    md = f"""# Input pipeline benchmark

`python -m debkd_jax.bench_data --source={r['source']}` on {r['cpus']} CPU cores ({r['machine']}), jax {r['jax']},
load average {r['load_before']:.2f} before and {r['load_after']:.2f} after. {r['images']:,} images, batch {r['batch_size']}.

| phase | images/s |
|---|---:|
| decode every file and write the cache | {r['decode_and_cache_images_per_s']:,.0f} |
| load the cache | {r['cached_load_images_per_s']:,.0f} |
| deliver one epoch of training batches (images, labels, target rows) to the mesh | {r['batch_delivery_images_per_s']:,.0f} |
| ResNet-8 DeBKD train step on those batches | {r['train_step_images_per_s']:,.0f} |

Batch delivery is **{r['delivery_over_step']:.0f}x** the train step's rate (target: at least 20x).
"""
    with open(os.path.join(out_dir, "BENCHMARKS_DATA.md"), "w") as f:
        f.write(md)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="folder:../shared/data/dogs_vs_cats_32")
    parser.add_argument("--out", default=".")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    r = run(args.source, args.out, args.batch_size, args.steps)
    print(open(os.path.join(args.out, "BENCHMARKS_DATA.md")).read())
    del r


if __name__ == "__main__":
    main()
