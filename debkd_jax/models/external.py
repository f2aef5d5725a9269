"""Any Flax module as student or teacher: `model="package.module:factory"`.

The factory is called as `factory(num_classes=k, dtype=dtype)` and returns an `nn.Module` whose
`__call__(x, train)` maps normalized NHWC images (B, H, W, 3) to logits (B, k), or to `(logits, features)`
where `features` is a sequence of (B, h, w, c) arrays that FKD may tap. `Adapted` wraps it so it looks like a
built-in model: it returns `(float32 logits, tuple of features)` and its variables are the factory module's
own (shared scope: a checkpoint of the bare module loads as is). A module without BatchNorm gets one
placeholder statistic, `batch_stats/no_batch_stats`, so every model has both collections.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from debkd_jax.errors import UserError

PLACEHOLDER = "no_batch_stats"
"""The `batch_stats` entry `Adapted` adds to a module that has no batch statistics of its own."""


def is_factory_spec(name: str) -> bool:
    """True for 'package.module:factory', the form that names a factory instead of a built-in model."""
    return isinstance(name, str) and ":" in name


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable named by 'package.module:factory'; `UserError` naming the module or attribute when it
    cannot be imported or found, or is not callable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"model {spec!r} must be 'package.module:factory' (a module path, a colon, a name).")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import-time failure of the user's module
        raise UserError(
            f"model {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {first_line(e)}); check "
            "the name "
            "and put its folder on PYTHONPATH (or run from the folder that holds it)."
        ) from e
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise UserError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}.")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UserError(f"model {spec!r}: {attr!r} is a {type(factory).__name__}, not a callable factory.")
    return factory


class Adapted(nn.Module):
    """A factory's module with the built-in models' interface: x -> (float32 logits (B, k), features)."""

    inner: nn.Module
    num_classes: int
    spec: str
    dtype: Any = jnp.float32
    conv: Any = nn.Conv  # builds FKD's hint regressors for this student (the module's own convs are its own)

    def setup(self):
        nn.share_scope(self, self.inner)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        out = self.inner(x, train=train)
        logits, features = split_outputs(out, self.spec)
        if logits.ndim != 2 or logits.shape != (x.shape[0], self.num_classes):
            raise UserError(
                f"model {self.spec!r} returned logits of shape {tuple(logits.shape)} for {x.shape[0]} "
                "images; "
                f"they must be ({x.shape[0]}, {self.num_classes}), one per class: build its head with the "
                "num_classes the factory is given."
            )
        if self.is_initializing() and "batch_stats" not in self.variables:
            self.variable("batch_stats", PLACEHOLDER, lambda: jnp.zeros((), jnp.float32))
        return jnp.asarray(logits, jnp.float32), features


def first_line(error: Exception) -> str:
    """The first line of an error's message, at most 200 characters."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else ""


def split_outputs(out, spec: str) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """A module's output -> (logits, features): an array is logits alone; a pair is (logits, features)."""
    if hasattr(out, "shape"):
        return out, ()
    if isinstance(out, (tuple, list)) and len(out) == 2 and hasattr(out[0], "shape"):
        features = out[1]
        features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
        if not all(hasattr(f, "shape") for f in features):
            raise UserError(f"model {spec!r}: the features it returns must be arrays.")
        return out[0], features
    raise UserError(
        f"model {spec!r} returned a {type(out).__name__}; __call__(x, train) must return logits (B, k) or "
        "(logits, features)."
    )


def build(spec: str, num_classes: int, dtype) -> Adapted:
    """`Adapted(factory(num_classes=num_classes, dtype=dtype))`; `UserError` when the factory fails or returns
    something other than a Flax module."""
    factory = load_factory(spec)
    try:
        module = factory(num_classes=num_classes, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - the user's factory
        raise UserError(
            f"model {spec!r}: calling {spec.partition(':')[2]}(num_classes={num_classes}, "
            f"dtype={jnp.dtype(dtype)}) failed ({type(e).__name__}: {first_line(e)}); the factory must "
            "take (num_classes, dtype) and return a flax.linen Module."
        ) from e
    if not isinstance(module, nn.Module):
        raise UserError(
            f"model {spec!r}: the factory returned a {type(module).__name__}, not a flax.linen Module."
        )
    return Adapted(module, num_classes=num_classes, spec=spec, dtype=jnp.dtype(dtype))


def check_features_for_hints(spec: str, features) -> None:
    """FKD's hint regressors need (B, h, w, c) features: `UserError` otherwise."""
    shapes = [tuple(f.shape) for f in features]
    if not shapes or any(len(s) != 4 for s in shapes):
        raise UserError(
            f"model {spec!r} offers FKD the features {shapes or 'none'}; FKD taps (B, h, w, c) arrays: "
            "return "
            "(logits, (block outputs...)) from __call__, or drop the FKD methods."
        )
