"""FitNets hint regressors: a student block output mapped onto a teacher block's shape."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from debkd_jax.models.conv import ModuleDef
from debkd_jax.models.resnet import BatchNorm, conv1x1


class HintRegressor(nn.Module):
    """1x1 conv + BatchNorm to `features` channels, then bilinear resize to `target_hw`.

    (B, h, w, C) -> (B, *target_hw, features). `conv` builds the 1x1 conv (see `conv.CONV_BACKWARDS`).
    """

    features: int
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x: jax.Array, target_hw: tuple[int, int], train: bool) -> jax.Array:
        x = conv1x1(self.features, 1, self.dtype, "conv", self.conv)(x)
        x = BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn")(x)
        if tuple(x.shape[1:3]) != tuple(target_hw):
            x = jax.image.resize(x, (x.shape[0], *target_hw, x.shape[-1]), method="bilinear")
        return x
