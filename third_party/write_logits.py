"""Runs a PyTorch model over the data as debkd_jax reads it; writes a teacher-logits file (docs/teachers.md).

    python -m third_party.write_logits --config=configs/debkd.py --model=resnet8x4 \
        --weights=teacher.pt --out=teacher_logits.npz [--config.data.source=folder:data/dogs] \
        [--batch_size=256]

then `python -m debkd_jax.main --config=configs/debkd.py --config.teacher.logits=teacher_logits.npz`, with the
same data settings (source, image_size, max_per_class, seed: the split is the config's).

`--model` is a PyTorch peer network (`third_party/torch_peer`: resnet8, resnet8x4, resnet18, resnet50,
resnet_tiny) or any `module:function` factory called as `function(num_classes=k)` and returning a
`torch.nn.Module`; `--weights` is a `state_dict` saved with `torch.save` (absent: the model as built). The
model sees what the JAX models see: RGB images of `data.image_size`, `(x / 255 - 0.5) / 0.5`, here NCHW
float32, in eval mode. It may return logits (B, k) or a tuple whose first item is the logits. Every image of
train, val and test gets a row, keyed by its id. Run it from the repository root.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from debkd_jax import cli, xla_cpu
from debkd_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The debkd_jax config whose data settings to read.")
flags.DEFINE_string(
    "model", None, "A torch_peer model name, or 'module:function' returning a torch.nn.Module."
)
flags.DEFINE_string("weights", "", "A state_dict file (torch.save) to load into the model; empty: as built.")
flags.DEFINE_string("out", None, "The .npz file to write (ids, logits).")
flags.DEFINE_integer("batch_size", 256, "Images per forward pass.")
flags.mark_flags_as_required(["config", "model", "out"])


def build_model(spec: str, num_classes: int):
    """A torch_peer model by name, or `function(num_classes=k)` for 'module:function'."""
    from third_party import torch_peer

    if spec in torch_peer.MODELS:
        return torch_peer.get_model(spec, num_classes)
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise UserError(f"--model={spec!r} is not one of {sorted(torch_peer.MODELS)} nor 'module:function'.")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any failure of the user's module
        raise UserError(
            f"--model={spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e}); put its folder on "
            "PYTHONPATH."
        ) from e
    if not callable(getattr(module, attr, None)):
        raise UserError(f"--model={spec!r}: {module_name!r} has no function {attr!r}.")
    return getattr(module, attr)(num_classes=num_classes)


def load_weights(model, path: str) -> None:
    import torch

    if not os.path.isfile(path):
        raise UserError(
            f"--weights={path!r}: no such file; save it with torch.save(model.state_dict(), PATH)."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - unpickling or key/shape mismatch
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise UserError(
            f"--weights={path!r} does not load into --model ({type(e).__name__}: {first}); give the "
            "state_dict of that model."
        ) from e


def torch_logits(model, images: np.ndarray, num_classes: int, batch_size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the model's eval-mode logits (N, k) float32, normalized as `data.normalize`."""
    import torch

    from debkd_jax import data

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = np.array(data.normalize(images[start : start + batch_size]), np.float32)  # writable for torch
            y = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
            y = y[0] if isinstance(y, (tuple, list)) else y
            if tuple(y.shape) != (len(x), num_classes):
                raise UserError(
                    f"--model returned logits of shape {tuple(y.shape)} for {len(x)} images; they must be "
                    f"({len(x)}, {num_classes}), one per class of the data."
                )
            out.append(y.float().numpy())
    return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


def write_logits(config, spec: str, weights: str, out: str, batch_size: int) -> dict:
    """Reads the config's data, runs the model over train/val/test and writes `out`; returns the logits."""
    from debkd_jax import pipeline, teachers

    if batch_size < 1:
        raise UserError(f"--batch_size={batch_size} must be >= 1.")
    source = pipeline.load_source(config, "memory")  # the images decoded as the memory pipeline decodes them
    model = build_model(spec, source.num_classes)
    if weights:
        load_weights(model, weights)
    logits = {
        split: torch_logits(model, source.splits[split].images, source.num_classes, batch_size)
        for split in ("train", "val", "test")
    }
    bad = [s for s, v in logits.items() if not np.all(np.isfinite(v))]
    if bad:
        raise UserError(
            f"--model gave NaN/Inf logits on the {', '.join(bad)} images; check the model and weights."
        )
    teachers.write_logits_file(out, source, logits)
    return logits


def main(argv) -> int:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}.")
    cli.quiet_libraries()
    with cli.user_errors():
        logits = write_logits(FLAGS.config, FLAGS.model, FLAGS.weights, FLAGS.out, FLAGS.batch_size)
    sizes = ", ".join(f"{s} {len(v)}" for s, v in logits.items())
    print(f"wrote {FLAGS.out}: logits of {sizes} images")
    return 0


if __name__ == "__main__":
    xla_cpu.apply_defaults()
    app.run(main, flags_parser=cli.parse_flags)
