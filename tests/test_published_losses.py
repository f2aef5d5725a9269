"""debkd_jax's losses against published implementations, on the fixed inputs and outputs that
`python -m third_party.published_losses` computed once with torchdistill (tests/fixtures/published_losses.npz;
the script says which versions). Neither torch nor torchdistill is needed here."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debkd_jax import losses

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "published_losses.npz"


def _cases(kind: str) -> list[dict]:
    with np.load(FIXTURE) as z:
        meta = json.loads(str(z["meta"]))
        arrays = {name: z[name] for name in z.files}
    return [
        {**case, **{k.removeprefix(p): v for k, v in arrays.items() if k.startswith(p := case["prefix"])}}
        for case in meta["cases"][kind]
    ]


@jax.jit
def _kd_value_and_grad(student, teacher, labels, alpha, temperature):
    """One compile per shape: the weights are traced."""

    def loss(s):
        return losses.kd_loss(s, teacher, labels, alpha=alpha, temperature=temperature)

    return jax.value_and_grad(loss)(student)


def test_the_fixture_names_its_source():
    with np.load(FIXTURE) as z:
        meta = json.loads(str(z["meta"]))
    assert meta["made_by"] == "python -m third_party.published_losses"
    assert meta["torchdistill"] and len(meta["cases"]["kd"]) == 6 and len(meta["cases"]["hint"]) == 2


@pytest.mark.parametrize("case", _cases("kd"), ids=lambda c: f"a{c['alpha']}-T{c['temperature']}")
def test_kd_loss_and_gradient_equal_torchdistill_kdloss(case):
    """torchdistill's `KDLoss(alpha=1 - alpha)`: `(1 - alpha) * CE + alpha * T^2 * KL`, batch mean."""

    student, teacher = (jnp.asarray(case[name], jnp.float32) for name in ("student", "teacher"))
    value, grad = _kd_value_and_grad(student, teacher, case["labels"], case["alpha"], case["temperature"])
    # float32 against float64: relative rounding of a few 1e-7 per term.
    np.testing.assert_allclose(float(value), case["loss"], rtol=2e-6)
    atol = 1e-7 * np.abs(case["grad"]).max()
    np.testing.assert_allclose(np.asarray(grad), case["grad"], rtol=1e-4, atol=atol)


@pytest.mark.parametrize("case", _cases("hint"), ids=lambda c: f"{c['layers']}-layers")
def test_hint_loss_and_gradient_equal_torchdistill_fitnets_terms(case):
    """torchdistill's FitNets terms: `WeightedSumLoss` of one `MSELoss` (mean) per tapped block, weight 1."""
    n = case["layers"]
    teacher = [jnp.asarray(case[f"teacher{i}"], jnp.float32) for i in range(n)]
    student = [jnp.asarray(case[f"student{i}"], jnp.float32) for i in range(n)]
    value, grads = jax.jit(jax.value_and_grad(losses.hint_loss))(student, teacher)
    np.testing.assert_allclose(float(value), case["loss"], rtol=2e-6)
    for i, grad in enumerate(grads):
        np.testing.assert_allclose(np.asarray(grad), case[f"grad{i}"], rtol=1e-5, atol=1e-9)
