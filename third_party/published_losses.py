"""Writes tests/fixtures/published_losses.npz: losses and their gradients computed once by published code.

    pip install --no-deps torchdistill==1.1.5   # its losses need only torch (>= 2.12); --no-deps keeps the
                                                # installed torch instead of pulling a newer one
                                                # with torchvision
    python -m third_party.published_losses      # from the repository root

Published implementations installable from the registry, run on fixed inputs (seeded NumPy draws, float64):
- KD (Hinton et al. 2015): torchdistill's `KDLoss` (`torchdistill.losses.mid_level`), which computes
  `a * CE + (1 - a) * T^2 * KL` with `reduction='batchmean'`; debkd_jax's `kd_loss(alpha=...)` weights the KL
  term by `alpha`, so `a = 1 - alpha`. (With `a = 0` torchdistill returns the bare KL, without `T^2`; the
  cases keep `a > 0`.)
- FitNets hints: torchdistill's `WeightedSumLoss` over one `SimpleLossWrapper(MSELoss)` term per tapped block
  (student output vs teacher output, weight 1), as torchdistill's FitNets configs build it.

The file holds every input and, per case, the loss and its gradient with respect to the student's logits or
features. tests/test_published_losses.py compares debkd_jax against it without needing torch or torchdistill.
DKD's published code (mdistiller) is not on the registry; DKD is checked against tests/reference.py only.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
import torchdistill
from torchdistill.losses.high_level import WeightedSumLoss
from torchdistill.losses.mid_level import KDLoss

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "published_losses.npz"

# (classes, batch, logit scale, debkd_jax alpha, temperature): two and ten classes, mild and confident (large)
# logits, the default (0.9, 4) and the ends of the range.
KD_CASES = (
    (2, 16, 3.0, 0.9, 4.0),
    (2, 16, 12.0, 0.9, 4.0),
    (10, 16, 3.0, 0.9, 4.0),
    (10, 8, 8.0, 0.5, 1.0),
    (10, 8, 2.0, 0.1, 8.0),
    (5, 4, 30.0, 0.99, 2.0),
)
# Per case: the (batch, height, width, channels) shapes of the tapped blocks (NHWC, as debkd_jax's models).
HINT_CASES = (
    ((4, 8, 8, 6),),
    ((4, 8, 8, 6), (4, 4, 4, 12), (4, 2, 2, 24)),
)


def kd_case(rng: np.random.Generator, k: int, batch: int, scale: float, alpha: float, temperature: float):
    student = rng.normal(size=(batch, k)) * scale
    teacher = rng.normal(size=(batch, k)) * scale
    labels = rng.integers(0, k, size=batch)
    s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    loss_fn = KDLoss(
        student_module_path=".", student_module_io="output", teacher_module_path=".",
        teacher_module_io="output", temperature=temperature, alpha=1.0 - alpha, reduction="batchmean",
    )
    loss = loss_fn(
        {".": {"output": s}},
        {".": {"output": torch.tensor(teacher, dtype=torch.float64)}},
        torch.tensor(labels, dtype=torch.long),
    )
    (grad,) = torch.autograd.grad(loss, s)
    return {
        "student": student, "teacher": teacher, "labels": labels,
        "loss": np.float64(loss.item()), "grad": grad.numpy(),
    }


def hint_case(rng: np.random.Generator, shapes):
    student = [rng.normal(size=shape) for shape in shapes]
    teacher = [rng.normal(size=shape) + 0.5 for shape in shapes]
    terms = {
        f"hint{i}": {
            "criterion": {"key": "MSELoss", "kwargs": {"reduction": "mean"}},
            "criterion_wrapper": {
                "key": "SimpleLossWrapper",
                "kwargs": {
                    "input": {"is_from_teacher": False, "module_path": f"block{i}", "io": "output"},
                    "target": {"is_from_teacher": True, "module_path": f"block{i}", "io": "output"},
                },
            },
            "weight": 1.0,
        }
        for i in range(len(shapes))
    }
    loss_fn = WeightedSumLoss(sub_terms=terms)
    s = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in student]
    io_dict = {
        "student": {f"block{i}": {"output": x} for i, x in enumerate(s)},
        "teacher": {
            f"block{i}": {"output": torch.tensor(x, dtype=torch.float64)} for i, x in enumerate(teacher)
        },
    }
    loss = loss_fn(io_dict, {}, None)
    grads = torch.autograd.grad(loss, s)
    return {
        **{f"student{i}": x for i, x in enumerate(student)},
        **{f"teacher{i}": x for i, x in enumerate(teacher)},
        **{f"grad{i}": g.numpy() for i, g in enumerate(grads)},
        "loss": np.float64(loss.item()),
    }


def main() -> None:
    rng = np.random.default_rng(20261204)
    arrays, cases = {}, {"kd": [], "hint": []}
    for i, (k, batch, scale, alpha, temperature) in enumerate(KD_CASES):
        for name, value in kd_case(rng, k, batch, scale, alpha, temperature).items():
            arrays[f"kd{i}_{name}"] = value
        cases["kd"].append({"prefix": f"kd{i}_", "alpha": alpha, "temperature": temperature})
    for i, shapes in enumerate(HINT_CASES):
        for name, value in hint_case(rng, shapes).items():
            arrays[f"hint{i}_{name}"] = value
        cases["hint"].append({"prefix": f"hint{i}_", "layers": len(shapes)})
    meta = {
        "cases": cases,
        "made_by": "python -m third_party.published_losses",
        "torchdistill": torchdistill.__version__,
        "torch": torch.__version__,
    }
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(
        f"wrote {OUT.relative_to(OUT.parents[2])}: {len(cases['kd'])} KD and {len(cases['hint'])} hint cases"
    )


if __name__ == "__main__":
    main()
