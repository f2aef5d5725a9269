"""PyTorch peer of `debkd_jax.models` for benchmarks and parity tests; never imported by `debkd_jax`."""

from .models import MODELS, BasicBlock, Bottleneck, ResNet, get_model, load_flax_params

__all__ = ["MODELS", "BasicBlock", "Bottleneck", "ResNet", "get_model", "load_flax_params"]
