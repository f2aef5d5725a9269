"""Class probabilities from an exported student: `python -m debkd_jax.predict --model=FILE IMAGE...`.

FILE is what `python -m debkd_jax.export` wrote (with its sidecar FILE.json beside it). No model code is
needed: the file is StableHLO, run with `jax.export.deserialize`. Each image file is made into the model's
input exactly as its run evaluated images (the sidecar's `preprocessing`, `data.read_image_file`): decoded
(EXIF orientation, RGB), then squashed to S x S, or its shorter side resized to S / crop and the central S x S
kept.

Output, one tab-separated row per image after a header (or JSON lines with --json):

    image            label  p(label)  p(cat)  p(dog)
    photos/cat1.jpg  cat    0.9124    0.9124  0.0876

An unreadable image is reported on stderr and skipped; the exit status is then 1. A missing or foreign model
file is an error (status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence

import jax
import numpy as np

from debkd_jax import cli, export, xla_cpu
from debkd_jax import data as data_lib
from debkd_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Deployed:
    """A loaded exported student: `probabilities(images uint8 (B, S, S, 3)) -> (B, k)`."""

    exported: jax.export.Exported
    class_names: tuple[str, ...]
    image_size: int
    meta: dict
    preprocessing: dict = dataclasses.field(default_factory=dict)
    run: Callable = dataclasses.field(repr=False, default=None)  # jit(exported.call): compiled once per shape

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, S, S, 3) -> (logits, probabilities), NumPy float32 (B, k)."""
        images = np.asarray(images)
        want = (self.image_size, self.image_size, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want:
            raise ValueError(
                f"images must be uint8 (B, {want[0]}, {want[1]}, 3), got {images.dtype} {images.shape}"
            )
        try:
            logits, probs = (self.run or self.exported.call)(images)
        except ValueError as e:
            if "platform" in str(e).lower():
                raise UserError(
                    f"the model was exported for {list(self.exported.platforms)}, this machine runs JAX on "
                    f"{jax.default_backend()!r}; export it again with --platforms including it."
                ) from e
            raise
        return np.asarray(logits), np.asarray(probs)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self(images)[1]


def load(model_path: str) -> Deployed:
    """Reads an exported student and its sidecar; raises UserError with the reason when it cannot."""
    path = os.path.abspath(os.path.expanduser(model_path))
    if not os.path.isfile(path):
        raise UserError(
            f"model file {model_path} does not exist; write one with `python -m debkd_jax.export`."
        )
    side = export.sidecar_path(path)
    try:
        with open(side, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(
            f"{side} is missing: `python -m debkd_jax.export` writes it beside the model file, keep the two "
            "together."
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the sidecar {side}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != export.FORMAT:
        raise UserError(f"{side} is not a debkd_jax export sidecar (format {export.FORMAT!r} expected).")
    try:
        with open(path, "rb") as f:
            blob = f.read()
        exported = jax.export.deserialize(bytearray(blob))
    except Exception as e:  # noqa: BLE001 - any decoding failure means the file is not an export.
        raise UserError(
            f"{model_path} is not a model written by `python -m debkd_jax.export` "
            "(jax.export could not read it: "
            f"{type(e).__name__}: {str(e)[:200]})."
        ) from e
    class_names = tuple(str(c) for c in meta.get("class_names", ()))
    image_size = int(meta.get("image_size", 0))
    (in_aval,) = exported.in_avals
    if (
        len(exported.out_avals) != 2
        or in_aval.dtype != np.uint8
        or tuple(in_aval.shape[1:]) != (image_size, image_size, 3)
        or exported.out_avals[1].shape[-1] != len(class_names)
    ):
        raise UserError(
            f"{model_path} and its sidecar do not match "
            f"(model input {in_aval.dtype} {in_aval.shape}, sidecar: "
            f"{len(class_names)} classes, image size {image_size}); export the model again."
        )
    preprocessing = export.preprocessing_of(meta)
    return Deployed(
        exported=exported,
        class_names=class_names,
        image_size=image_size,
        meta=meta,
        preprocessing=preprocessing,
        run=jax.jit(exported.call),
    )


def read_images(
    paths: Sequence[str], preprocessing: dict
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """(readable paths, uint8 (n, S, S, 3) made as `preprocessing` says, [(unreadable path, reason)])."""
    ok, arrays, failed = [], [], []
    size = int(preprocessing["image_size"])
    for p in paths:
        if os.path.isdir(p):
            failed.append((p, "is a directory; pass image files"))
            continue
        try:
            arrays.append(data_lib.read_image_file(p, preprocessing))
            ok.append(p)
        except ValueError as e:
            failed.append((p, str(e) or "unreadable"))
    images = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return ok, images, failed


def predict_files(
    model: Deployed, paths: Sequence[str], batch_size: int = 256
) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, str]]]:
    """([(path, probabilities (k,))], [(unreadable path, reason)])."""
    ok, images, failed = read_images(paths, model.preprocessing)
    probs = [model.probabilities(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    probs = np.concatenate(probs) if probs else np.zeros((0, len(model.class_names)), np.float32)
    return list(zip(ok, probs, strict=True)), failed


def format_rows(model: Deployed, results: Sequence[tuple[str, np.ndarray]], as_json: bool) -> list[str]:
    names = model.class_names
    lines = []
    if not as_json:
        lines.append("\t".join(["image", "label", "p(label)", *(f"p({c})" for c in names)]))
    for path, p in results:
        top = int(np.argmax(p))
        if as_json:
            lines.append(
                json.dumps(
                    {
                        "image": path,
                        "label": names[top],
                        "probability": round(float(p[top]), 6),
                        "probabilities": {c: round(float(v), 6) for c, v in zip(names, p, strict=True)},
                    }
                )
            )
        else:
            lines.append("\t".join([path, names[top], f"{p[top]:.4f}", *(f"{v:.4f}" for v in p)]))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m debkd_jax.predict",
        description="Class probabilities per image from a student exported by `python -m debkd_jax.export`.",
    )
    parser.add_argument(
        "--model", required=True, help="the exported model file (its sidecar FILE.json beside it)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON lines instead of a tab-separated table"
    )
    parser.add_argument("--batch_size", type=int, default=256, help="images per call of the model")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    with cli.user_errors():
        model = load(args.model)
        results, failed = predict_files(model, args.images, args.batch_size)
    for line in format_rows(model, results, args.json):
        print(line)
    for path, reason in failed:
        print(f"error: cannot read image {path}: {reason}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    xla_cpu.apply_defaults()
    sys.exit(main())
