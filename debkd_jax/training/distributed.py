"""The device mesh and the processes of a multi-host job."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from debkd_jax import models
from debkd_jax.errors import UserError


def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh ('data',) over all (global) devices."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), ("data",))


def resolve_conv_backward(setting: str, mesh: Mesh) -> str:
    """`config.conv_backward` for the models trained on `mesh`: "auto" is "materialized" when every device is
    a CPU (the conv VJP through a fusion barrier, 1.15-1.24x faster there) and "xla" otherwise (on GPU/TPU the
    barrier's `lax.cond` would cost a device-to-host sync). Gradients are the same either way."""
    if setting not in models.CONV_BACKWARD_SETTINGS:
        raise UserError(f"conv_backward={setting!r} is not one of {models.CONV_BACKWARD_SETTINGS}.")
    if setting != "auto":
        return setting
    on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    return "materialized" if on_cpu else "xla"


def initialize_distributed(config) -> None:
    """With `config.distributed`, `jax.distributed.initialize()` (once, before anything touches the devices):
    several processes (hosts) then form one job; each feeds its share of every batch, process 0 writes."""
    if not config.get("distributed", False) or jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize()
    except (RuntimeError, ValueError) as e:
        raise UserError(
            f"distributed=True but jax.distributed.initialize() failed: {str(e).splitlines()[0][:300]}. It "
            "needs a multi-process launch (a Cloud TPU pod slice, SLURM, or JAX_COORDINATOR_ADDRESS / "
            "JAX_NUM_PROCESSES / JAX_PROCESS_ID set for each process); on one machine leave distributed=False."
        ) from e


def process_local(order: np.ndarray) -> np.ndarray:
    """This process's share of each global batch: (steps, B) -> (steps, B / process_count)."""
    n = jax.process_count()
    if n == 1:
        return order
    per = order.shape[1] // n
    i = jax.process_index()
    return order[:, i * per : (i + 1) * per]


def sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
