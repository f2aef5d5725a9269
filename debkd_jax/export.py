"""Deployable students: one StableHLO file (`jax.export`) that takes uint8 images, plus a JSON sidecar.

    python -m debkd_jax.export --run=WORKDIR/students/DeBKD-seed0 --out=student.jax
    python -m debkd_jax.predict --model=student.jax cat.jpg dog.png

The exported function is `uint8 (b, S, S, 3) -> (logits float32 (b, k), probabilities float32 (b, k))` with a
symbolic batch size `b`: the data pipeline's normalization (`data.normalize`) is inside, the network runs in
eval mode, and every BatchNorm that directly follows a convolution is folded into it (`kernel * a`, then
`+ b`, with `a = scale / sqrt(var + eps)`, `b = bias - mean * a`). The variables are constants of the module,
so the file is all a user needs: `predict.py` runs it with `jax.export.deserialize`, without the model code.

The sidecar `<out>.json` holds the class names, the image size, how an image file becomes the model's input
(`preprocessing`: the run's own, from its `model.json`: "squash" or "resize_crop" with its crop; `predict`
applies it) and how the file was made (see `sidecar_path`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from debkd_jax import cli, models, workdir_lib, xla_cpu
from debkd_jax import data as data_lib
from debkd_jax.errors import UserError

FORMAT = "debkd_jax.export/1"
OUTPUTS = ("logits", "probabilities")


def sidecar_path(model_path: str) -> str:
    """The JSON sidecar beside an exported model: `student.jax` -> `student.jax.json`."""
    return os.fspath(model_path) + ".json"


def load_run(run_dir: str) -> tuple[dict, Any]:
    """(model.json metadata, eval variables {'params', 'batch_stats'}) of a finished student run folder."""
    run_dir = workdir_lib.expand(run_dir)
    meta = workdir_lib.read_json(os.path.join(run_dir, "model.json"))
    if meta is None:
        raise UserError(
            f"{run_dir} holds no trained student (no model.json); pass a finished run's folder, e.g. "
            "WORKDIR/students/DeBKD-seed0."
        )
    for field in ("model", "num_classes", "class_names", "image_size"):
        if field not in meta:
            raise UserError(
                f"{run_dir}/model.json lacks the field {field!r}; it was not written by debkd_jax."
            )
    variables = workdir_lib.restore_variables(os.path.join(run_dir, "final"))
    return meta, {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


# ----------------------------------------------------------------------------------------------------------
# BatchNorm folding, by interception: no second copy of the model code.


def _path(module: nn.Module) -> tuple[str, ...]:
    return tuple(module.scope.path)


def _conv_bn_pairs(model: nn.Module, variables, image_shape: Sequence[int]) -> dict[tuple, tuple]:
    """{BatchNorm path: (conv path, epsilon)} for every BatchNorm whose input is a Conv's output.

    Found by tracing the eval-mode forward abstractly and matching the BatchNorm's input to the Conv's output.
    """
    conv_out: dict[int, tuple] = {}
    keep = []  # keeps the traced values alive so their ids stay unique
    pairs: dict[tuple, tuple] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        if isinstance(module, nn.Conv) and not module.use_bias and module.feature_group_count == 1:
            conv_out[id(out)] = _path(module)
            keep.append(out)
        elif isinstance(module, nn.BatchNorm) and args and id(args[0]) in conv_out:
            pairs[_path(module)] = (conv_out[id(args[0])], float(module.epsilon))
        return out

    def forward(x):
        with nn.intercept_methods(record):
            return model.apply(variables, x, train=False)

    jax.eval_shape(forward, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    return pairs


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def fold_batchnorm(model: nn.Module, variables, image_shape: Sequence[int]) -> tuple[dict, dict]:
    """Folds each conv -> BatchNorm pair: returns (variables with scaled conv kernels, {bn path: shift}).

    Apply the result with `folded_interceptor(shifts)` active; every other module computes as before.
    Math in float64 on the host, stored as float32.
    """
    params = jax.tree.map(np.asarray, unfreeze(variables["params"]))
    stats = jax.tree.map(np.asarray, unfreeze(variables.get("batch_stats", {})))
    shifts: dict[tuple, np.ndarray] = {}
    for bn_path, (conv_path, eps) in _conv_bn_pairs(model, variables, image_shape).items():
        bn_p, bn_s = _get(params, bn_path), _get(stats, bn_path)
        a = np.asarray(bn_p["scale"], np.float64) / np.sqrt(np.asarray(bn_s["var"], np.float64) + eps)
        shift = np.asarray(bn_p["bias"], np.float64) - np.asarray(bn_s["mean"], np.float64) * a
        conv = _get(params, conv_path)
        conv["kernel"] = (np.asarray(conv["kernel"], np.float64) * a).astype(np.float32)
        shifts[bn_path] = shift.astype(np.float32)
        parent, name = bn_path[:-1], bn_path[-1]
        del _get(params, parent)[name]
        del _get(stats, parent)[name]
    return {"params": params, "batch_stats": stats}, shifts


def folded_interceptor(shifts: dict[tuple, np.ndarray]) -> Callable:
    """A Flax method interceptor that replaces each folded BatchNorm by `x + shift`."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.BatchNorm):
            shift = shifts.get(_path(module))
            if shift is not None:
                x = args[0]
                return x + jnp.asarray(shift, x.dtype)
        return next_fun(*args, **kwargs)

    return intercept


def serving_fn(model: nn.Module, variables, image_size: int, *, fold: bool = True) -> Callable:
    """`uint8 (b, S, S, 3) -> (logits, probabilities)`, float32, eval mode, variables as constants."""
    image_shape = (image_size, image_size, 3)
    if fold:
        variables, shifts = fold_batchnorm(model, variables, image_shape)
        intercept = folded_interceptor(shifts)
    else:
        intercept = lambda next_fun, args, kwargs, context: next_fun(*args, **kwargs)

    def serve(images):
        x = data_lib.normalize(images, jnp.float32)
        with nn.intercept_methods(intercept):
            logits, _ = model.apply(variables, x, train=False)
        logits = logits.astype(jnp.float32)
        return logits, jax.nn.softmax(logits, axis=-1)

    return serve


def export_model(
    model: nn.Module,
    variables,
    image_size: int,
    *,
    platforms: Sequence[str] = ("cpu",),
    fold: bool = True,
) -> jax.export.Exported:
    """`jax.export` of `serving_fn` with a symbolic batch dimension."""
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)
    fn = jax.jit(serving_fn(model, variables, image_size, fold=fold))
    return jax.export.export(fn, platforms=tuple(platforms))(spec)


def preprocessing_of(meta: dict) -> dict:
    """How the run made its inputs from an image file (`model.json`'s, `data.DataSource.preprocessing`); a run
    recorded before that field existed decoded as the memory kind does ("squash")."""
    default = {
        "resize": "squash",
        "image_size": int(meta["image_size"]),
        "normalize": dict(data_lib.NORMALIZATION),
    }
    recorded = meta.get("preprocessing")
    return dict(recorded) if isinstance(recorded, dict) else default


def export_run(run_dir: str, out: str, *, platforms: Sequence[str] = ("cpu",), fold: bool = True) -> dict:
    """Exports the student of `run_dir` to `out` (+ sidecar); returns the sidecar's content."""
    meta, variables = load_run(run_dir)
    model = models.get_model(meta["model"], int(meta["num_classes"]), "float32")
    image_size = int(meta["image_size"])
    try:
        exported = export_model(model, variables, image_size, platforms=platforms, fold=fold)
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(
            f"cannot export {run_dir}: its checkpoint does not fit model {meta['model']!r} "
            f"with {meta['num_classes']} classes ({type(e).__name__}: {e})."
        ) from e
    sidecar = {
        "format": FORMAT,
        "model": meta["model"],
        "num_classes": int(meta["num_classes"]),
        "class_names": list(meta["class_names"]),
        "image_size": image_size,
        "input": {"dtype": "uint8", "shape": ["batch", image_size, image_size, 3], "layout": "NHWC RGB"},
        "outputs": list(OUTPUTS),
        "preprocessing": preprocessing_of(meta),
        "batchnorm": "folded into the convolutions" if fold else "eval-mode statistics",
        "platforms": list(exported.platforms),
        "parameters": models.count_params(variables["params"]),
        "source": os.path.abspath(run_dir),
        "jax_version": jax.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = os.path.abspath(os.path.expanduser(out))
    workdir_lib.atomic_write_bytes(out, bytes(exported.serialize()))
    workdir_lib.write_json(sidecar_path(out), sidecar)
    return sidecar


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m debkd_jax.export",
        description="Serialize a trained student (eval mode, BatchNorm folded, uint8 input) with jax.export.",
    )
    parser.add_argument(
        "--run", required=True, help="a finished student folder: WORKDIR/students/<method>-seed<s>"
    )
    parser.add_argument("--out", required=True, help="the model file to write; its sidecar is <out>.json")
    parser.add_argument(
        "--platforms", default="cpu", help="comma-separated jax.export platforms (cpu, cuda, rocm, tpu)"
    )
    parser.add_argument("--no-fold", action="store_true", help="keep BatchNorm as eval-mode statistics")
    args = parser.parse_args(argv)
    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    with cli.user_errors():
        sidecar = export_run(args.run, args.out, platforms=platforms, fold=not args.no_fold)
    size = os.path.getsize(os.path.abspath(os.path.expanduser(args.out)))
    print(
        f"wrote {args.out} ({size / 1e6:.2f} MB, {sidecar['model']}, {sidecar['parameters']:,} parameters, "
        f"classes {sidecar['class_names']}, platforms {sidecar['platforms']}) and {sidecar_path(args.out)}"
    )
    return 0


if __name__ == "__main__":
    xla_cpu.apply_defaults()
    sys.exit(main())
