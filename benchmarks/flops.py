"""d. FLOPs per image (closed form and XLA's cost analysis) and the train step's share of a GEMM's FLOP/s."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.render import table
from benchmarks.steps import get_step
from benchmarks.timing import block, interleaved
from benchmarks.train_step import headline
from debkd_jax import models, training

CONVENTION = (
    "FLOPs = 2 x multiply-accumulates of Conv and Dense layers (BatchNorm, ReLU, adds, pooling and the "
    "optimizer not counted); a training step = forward + weight gradient + input gradient (none for the "
    "first layer) ~= 3 x forward. XLA's cost analysis counts every HLO op, elementwise ones included."
)


def conv_dense_macs(model_name: str, num_classes: int = 2, image_size: int = 32) -> dict:
    """Multiply-accumulates per image of every Conv and Dense layer, found by tracing the forward pass.

    Returns {'forward': MACs, 'first_layer': MACs of the stem (no input gradient is needed there), 'layers'}.
    """
    import flax.linen as nn

    model = models.get_model(model_name, num_classes)
    found = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
            kernel = module.get_variable("params", "kernel")
            per_output = math.prod(kernel.shape[:-1])
            if isinstance(module, nn.Conv):
                per_output //= module.feature_group_count
            found.append(math.prod(out.shape[1:]) * per_output)
        return out

    def forward(x):
        variables = model.init(jax.random.key(0), x, train=False)
        found.clear()
        with nn.intercept_methods(record):
            return model.apply(variables, x, train=False)

    jax.eval_shape(forward, jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
    return {"forward": int(sum(found)), "first_layer": int(found[0]), "layers": len(found)}


def training_flops_per_image(macs: dict) -> int:
    """Closed form: 2 FLOPs per MAC; forward + weight gradient + input gradient (none for the first layer)."""
    return 2 * (3 * macs["forward"] - macs["first_layer"])


def xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def gemm_peak(n: int, rounds: int = 5) -> dict:
    """float32 (n, n) @ (n, n) with XLA: FLOP/s of the best and the median call, and every sample."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n), np.float32))
    b = jnp.asarray(rng.standard_normal((n, n), np.float32))
    matmul = jax.jit(lambda a, b: a @ b)
    block(matmul(a, b))
    times = interleaved({"gemm": lambda: block(matmul(a, b))}, rounds=rounds, calls=1, warmup=0)["gemm"]
    flops = 2.0 * n**3
    return {
        "n": n,
        "samples_s": times,
        "flops_per_s": flops / float(np.min(times)),
        "median_flops_per_s": flops / float(np.median(times)),
    }


def _abstract_init(model):
    return model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


def model_flops(name: str) -> dict:
    macs = conv_dense_macs(name)
    model = models.get_model(name, 2)
    variables = jax.eval_shape(functools.partial(_abstract_init, model))
    predict = training.make_predict_fn(model, jnp.float32)
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.uint8)
    return {
        "macs_per_image": macs["forward"],
        "forward_flops_per_image": 2 * macs["forward"],
        "training_flops_per_image": training_flops_per_image(macs),
        "xla_forward_flops_per_image": xla_flops(predict.lower(variables, images).compile()),
        "parameters": models.count_params(variables["params"]),
    }


def achieved(ctx, name: str, per_image: int, peak: dict) -> dict | None:
    """FLOP/s of the train-step section's measured images/s (None when that section did not run)."""
    row = (
        headline(ctx.results["train_step"], ctx.mode.batch).get(name) if "train_step" in ctx.results else None
    )
    if row is None:
        return None
    step = get_step(name, "CE", batch=ctx.mode.batch)
    out = {
        "training_flops_per_step": per_image * ctx.mode.batch,
        "xla_flops_per_step": xla_flops(step.lowered().compile()),
    }
    for side, key in (("jax", "jax_ce"), ("torch", "torch_ce")):
        if key in row:
            out[f"{side}_flops_per_s"] = per_image * row[key]["images_per_s"]
            out[f"{side}_share_of_gemm_peak"] = out[f"{side}_flops_per_s"] / peak["flops_per_s"]
    return out


def measure(ctx) -> dict:
    mode = ctx.mode
    ctx.log(f"flops: GEMM {mode.gemm_n}^2 and cost analyses")
    peak = gemm_peak(mode.gemm_n)
    names = sorted(set(mode.train_models) | set(mode.inference_models) | {mode.epoch_teacher})
    per_model = {name: model_flops(name) for name in names}
    steps = {}
    for name in mode.train_models:
        row = achieved(ctx, name, per_model[name]["training_flops_per_image"], peak)
        if row is not None:
            steps[name] = row
    return {"gemm": peak, "models": per_model, "train_step": steps, "convention": CONVENTION}


def _g(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x / 1e9:.{digits}f}"


def _share(v: dict, side: str) -> str:
    key = f"{side}_share_of_gemm_peak"
    return f"{100 * v[key]:.1f}%" if key in v else "n/a"


def render(r: dict) -> list[str]:
    g = r["gemm"]
    lines = [
        "## d. FLOPs and achieved FLOP/s",
        "",
        f"float32 GEMM {g['n']}x{g['n']} (XLA): {g['flops_per_s'] / 1e9:.1f} GFLOP/s best, "
        f"{g['median_flops_per_s'] / 1e9:.1f} median -- the peak used below.",
        "",
    ]
    lines += table(
        ["model", "params", "fwd GFLOP/img (closed form)", "fwd GFLOP/img (XLA)", "train GFLOP/img"],
        [
            [
                k,
                f"{v['parameters']:,}",
                _g(v["forward_flops_per_image"], 4),
                _g(v["xla_forward_flops_per_image"], 4),
                _g(v["training_flops_per_image"], 4),
            ]
            for k, v in r["models"].items()
        ],
    )
    if r["train_step"]:
        lines += [""] + table(
            [
                "model",
                "train GFLOP/step",
                "XLA GFLOP/step",
                "JAX GFLOP/s",
                "share of peak",
                "PyTorch GFLOP/s",
                "share of peak",
            ],
            [
                [
                    k,
                    _g(v["training_flops_per_step"]),
                    _g(v["xla_flops_per_step"]),
                    _g(v.get("jax_flops_per_s"), 1),
                    _share(v, "jax"),
                    _g(v.get("torch_flops_per_s"), 1),
                    _share(v, "torch"),
                ]
                for k, v in r["train_step"].items()
            ],
        )
    return lines + ["", f"Convention: {r['convention']}", ""]
