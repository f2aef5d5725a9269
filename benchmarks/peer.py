"""The PyTorch peer (third_party/torch_peer), run in its own process with explicit thread settings.

JAX samples run in the benchmark's process and peer samples in the worker, one after the other as
`timing.interleaved` orders them, so the two runtimes never share a thread pool and the ratios stay side by
side. The worker gets `torch.set_num_threads(threads)` and an OpenMP wait policy that sleeps instead of
spinning (`PEER_THREAD_ENV`), both set before torch is imported.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys

from benchmarks import workers

PEER_THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0", "GOMP_SPINCOUNT": "0"}


def unavailable() -> str | None:
    """Why the peer cannot run here, or None."""
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed (pip install -e .[peer])"
    if not os.path.isdir(os.path.join(workers.REPO_ROOT, "third_party", "torch_peer")):
        return "third_party/torch_peer is not in this checkout"
    return None


class Peer:
    """Parent side of the peer worker. `timeout` bounds every request, `start_timeout` the first one."""

    def __init__(
        self, threads: int, timeout: float, start_timeout: float = 600.0, command=None, device: str = "cpu"
    ):
        self.timeout = timeout
        env = workers.child_env(OMP_NUM_THREADS=str(threads), **PEER_THREAD_ENV)
        cmd = command or [
            sys.executable,
            "-m",
            "benchmarks.peer_worker",
            f"--threads={threads}",
            f"--device={device}",
        ]
        self.worker = workers.LineWorker(cmd, env=env, name="the PyTorch peer worker")
        self._keys = itertools.count()
        self.info = self.worker.request("hello", timeout=start_timeout, section="peer start")

    def train_step(
        self, section: str, model: str, batch: int, dtype: str = "float32", image_size: int = 32
    ) -> RemoteSampler:
        """The peer's CE step of `model` on one fixed batch, built in the worker; time it with `.sample`."""
        suffix = f", {dtype}" if dtype != "float32" else ""
        key = f"train_step {model}, batch {batch}{suffix} (#{next(self._keys)})"
        self.worker.request(
            "train_step",
            timeout=self.timeout,
            section=section,
            key=key,
            model=model,
            batch=batch,
            num_classes=2,
            dtype=dtype,
            image_size=image_size,
        )
        return RemoteSampler(self, key, section)

    def close(self) -> None:
        self.worker.close()


class RemoteSampler:
    """A peer function for `timing.interleaved`: `.sample(calls)` times `calls` calls in the worker."""

    def __init__(self, peer: Peer, key: str, section: str):
        self.peer, self.key, self.section = peer, key, section

    def sample(self, calls: int) -> float:
        answer = self.peer.worker.request(
            "time", timeout=self.peer.timeout, section=self.section, key=self.key, calls=calls
        )
        return answer["seconds_per_call"]
