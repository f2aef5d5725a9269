"""The device mesh and the processes of a multi-host job."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from debkd_jax import config_checks, models, native, supervisor
from debkd_jax.errors import UserError

log = logging.getLogger("debkd_jax")


def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh ('data',) over all (global) devices."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), ("data",))


def resolve_conv_backward(setting: str, mesh: Mesh, dtype: Any = "float32") -> str:
    """`config.conv_backward` for the models trained on `mesh` in compute `dtype`. "auto" is, on a CPU:

        "onednn"        float32 on one device, and the native conv builds and loads here (`native.status()`):
                        oneDNN's conv and gradients behind XLA FFI calls, faster there (docs/performance.md)
        "materialized"  otherwise (several devices: XLA would gather the whole batch for each opaque call;
                        another dtype; or no native conv): the conv VJP through a fusion barrier

    and "xla" on GPU/TPU (where the barrier's `lax.cond` would cost a device-to-host sync). Gradients are the
    same either way."""
    if setting not in models.CONV_BACKWARD_SETTINGS:
        raise UserError(f"conv_backward={setting!r} is not one of {models.CONV_BACKWARD_SETTINGS}.")
    if setting != "auto":
        return setting
    if not all(d.platform == "cpu" for d in mesh.devices.flat):
        return "xla"
    if mesh.devices.size == 1 and np.dtype(dtype) == np.float32 and native.status().ok:
        return "onednn"
    return "materialized"


def initialize_distributed(config) -> None:
    """With `config.distributed`, `jax.distributed.initialize()` (once, before anything touches the devices):
    several processes (hosts) then form one job; each feeds its share of every batch, process 0 writes.

    `config.cluster` names the coordinator, the process count and this process's id where JAX does not detect
    them, and the timeouts. On CPU the processes' collectives run over Gloo (TCP).
    """
    config_checks.validate_cluster(config)
    if not config.get("distributed", False) or jax.distributed.is_initialized():
        return
    kwargs = distributed_kwargs(config)
    timeout = kwargs["initialization_timeout"]
    supervisor.tell_parent(
        "connecting",
        address=kwargs.get("coordinator_address"),
        process_id=kwargs.get("process_id"),
        num_processes=kwargs.get("num_processes"),
        timeout=timeout,
        heartbeat_timeout=kwargs["heartbeat_timeout_seconds"],
    )
    started = time.monotonic()
    if kwargs.get("process_id", 0) != 0:  # process 0 serves the coordinator itself
        wait_for_coordinator(kwargs.get("coordinator_address"), timeout)
    # What is left of the timeout: the wait above is part of it.
    kwargs["initialization_timeout"] = max(1, round(timeout - (time.monotonic() - started)))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects CPU devices only
    try:
        jax.distributed.initialize(**kwargs)
        supervisor.tell_parent("joined", process_id=jax.process_index(), num_processes=jax.process_count())
        log.info(
            "distributed: process %d of %d, %d of the job's %d devices",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(
            f"distributed=True but jax.distributed.initialize() failed: {str(e).splitlines()[0][:300]}. It "
            "needs a multi-process launch (a Cloud TPU pod slice, SLURM, Open MPI, or every process given "
            "--config.cluster.coordinator_address / num_processes / process_id); on one machine and one "
            "process leave distributed=False."
        ) from e


def distributed_kwargs(config) -> dict:
    """The arguments of `jax.distributed.initialize` that `config.cluster` sets; unset ones are detected."""
    cluster = config.get("cluster") or {}
    kwargs = {
        "initialization_timeout": int(cluster.get("initialization_timeout", 300)),
        "heartbeat_timeout_seconds": int(cluster.get("heartbeat_timeout", 30)),
        "shutdown_timeout_seconds": int(cluster.get("heartbeat_timeout", 30)),
    }
    if cluster.get("coordinator_address", ""):
        kwargs["coordinator_address"] = cluster["coordinator_address"]
    if cluster.get("num_processes", 0) > 0:
        kwargs["num_processes"] = int(cluster["num_processes"])
    if cluster.get("process_id", -1) >= 0:
        kwargs["process_id"] = int(cluster["process_id"])
    return kwargs


def wait_for_coordinator(address: str | None, timeout: float) -> None:
    """Waits until the coordinator at `address` ("host:port") accepts TCP connections, for `timeout` seconds.

    JAX aborts the process with a stack trace when it cannot reach the coordinator: this check turns the usual
    cases (a wrong address, a coordinator not started, a firewall) into one clear error first.
    """
    if not address:
        return
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(1.0, min(5.0, timeout))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"cannot reach the coordinator at {address} within cluster.initialization_timeout="
                    f"{timeout:g} s ({e.strerror or e}). Start process 0 first, check the address and port "
                    "(process 0's host, a free port, the same on every process) and the firewall, or raise "
                    "--config.cluster.initialization_timeout."
                ) from None
            time.sleep(0.5)


def sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
