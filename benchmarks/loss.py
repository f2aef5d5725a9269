"""g. `debkd_loss` with its gradient vs softmax cross entropy with its gradient, on (batch, k) logits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.render import fmt, ratio, table
from benchmarks.steps import synthetic_teacher_logits
from benchmarks.timing import call, interleaved, paired_ratio
from debkd_jax import losses, methods


def loss_inputs(batch: int, k: int, case: str, seed: int = 0):
    """(student logits, labels, lo, hi) as during training ('realistic') or far from the regions ('worst').

    realistic: regions from teacher-like logits after knowledge infusion; the student's logits are the
    teacher's plus noise, so most samples' probabilities sit just inside or outside their region.
    worst: student logits of scale 10, unrelated to the teacher: p far from every region.
    """
    labels, t_logits = synthetic_teacher_logits(batch, k, seed)
    targets = methods.method_targets(methods.preset("DeBKD"), t_logits, labels)
    rng = np.random.default_rng(seed + 1)
    if case == "realistic":
        noise = 1.5 if k == 2 else 3.0
        student = np.asarray(targets.logits) + noise * rng.standard_normal((batch, k)).astype(np.float32)
    else:
        student = 10.0 * rng.standard_normal((batch, k)).astype(np.float32)
    return tuple(jnp.asarray(a) for a in (student.astype(np.float32), labels, targets.lo, targets.hi))


def newton_iterations(p, lo, hi) -> int:
    """How many Newton/bisection steps `losses.box_projection` takes on these rows (0 for k = 2: a clip)."""
    if p.shape[-1] == 2:
        return 0
    return int(losses.projection_shift(*(jnp.asarray(a, jnp.float32) for a in (p, lo, hi)))[1])


def _functions():
    ce = jax.jit(jax.value_and_grad(lambda s, y: jnp.mean(losses.cross_entropy(s, y))))
    optax_ce = jax.jit(
        jax.value_and_grad(lambda s, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(s, y)))
    )
    debkd = jax.jit(jax.value_and_grad(lambda s, y, lo, hi: losses.debkd_loss(s, y, lo, hi)))
    return ce, optax_ce, debkd, jax.jit(losses.box_projection)


def measure(ctx) -> dict:
    mode = ctx.mode
    ce, optax_ce, debkd, project = _functions()
    out = {"batch": mode.loss_batch, "rows": []}
    for k in mode.loss_ks:
        for case in ("realistic", "worst"):
            ctx.log(f"loss: k={k}, {case}")
            s, y, lo, hi = loss_inputs(mode.loss_batch, k, case)
            p = jax.nn.softmax(s / 4.0)
            fns = {
                "ce": functools.partial(call, ce, s, y),
                "optax_ce": functools.partial(call, optax_ce, s, y),
                "debkd": functools.partial(call, debkd, s, y, lo, hi),
                "box_projection": functools.partial(call, project, p, lo, hi),
            }
            samples = interleaved(fns, rounds=max(3, mode.rounds), calls=mode.loss_calls)
            out["rows"].append(
                {
                    "k": k,
                    "case": case,
                    "share_inside_region": float(jnp.mean(jnp.all((p >= lo) & (p <= hi), axis=-1))),
                    "newton_iterations": newton_iterations(p, lo, hi),
                    "samples_s": samples,
                    "us": {name: 1e6 * float(np.median(v)) for name, v in samples.items()},
                    "debkd_over_ce": paired_ratio(samples["debkd"], samples["ce"]),
                    "debkd_over_optax_ce": paired_ratio(samples["debkd"], samples["optax_ce"]),
                }
            )
    return out


def render(r: dict) -> list[str]:
    lines = [f"## g. DeBKD loss with its gradient vs softmax cross entropy (batch {r['batch']})", ""]
    lines += table(
        [
            "k",
            "case",
            "inside region",
            "Newton steps",
            "CE us",
            "optax CE us",
            "DeBKD us",
            "DeBKD / CE",
            "DeBKD / optax CE",
            "projection us",
        ],
        [
            [
                v["k"],
                v["case"],
                f"{100 * v['share_inside_region']:.0f}%",
                v["newton_iterations"],
                fmt(v["us"]["ce"]),
                fmt(v["us"]["optax_ce"]),
                fmt(v["us"]["debkd"]),
                ratio(v["debkd_over_ce"]),
                ratio(v["debkd_over_optax_ce"]),
                fmt(v["us"]["box_projection"]),
            ]
            for v in r["rows"]
        ],
    )
    return lines + [
        "",
        "CE: `losses.cross_entropy`; optax CE: `optax.softmax_cross_entropy_with_integer_labels`. realistic: "
        "student = teacher-like logits + noise; worst: student logits of scale 10 unrelated to the regions. "
        "Newton steps: those `losses.box_projection` ran on the batch.",
        "",
    ]
