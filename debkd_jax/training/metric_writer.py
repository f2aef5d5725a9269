"""The per-epoch metric record of a run: `metrics.jsonl` (one JSON line per epoch) and TensorBoard events."""

from __future__ import annotations

import contextlib
import json
import os
import sys

from debkd_jax import workdir_lib


class MetricWriter:
    """Appends one JSON line per record to `metrics.jsonl` and writes the same scalars as TensorBoard
    events."""

    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = os.path.join(run_dir, "metrics.jsonl")
        self._tb_dir = os.path.join(run_dir, "tensorboard")
        self._tb = None

    def write(self, record: dict, extra_scalars: dict | None = None) -> None:
        """`record` goes to metrics.jsonl and TensorBoard; `extra_scalars` (wall-clock times, which differ
        from run to run) to TensorBoard only, so that metrics.jsonl is identical for identical runs."""
        # Re-running an epoch after a resume replaces its line: rewrite the file without later epochs first.
        lines = []
        if os.path.exists(self._jsonl):
            with open(self._jsonl, encoding="utf-8") as f:
                for line in f:
                    try:
                        if json.loads(line).get("epoch", 0) < record["epoch"]:
                            lines.append(line.rstrip("\n"))
                    except ValueError:
                        continue
        lines.append(json.dumps(record))
        workdir_lib.atomic_write_bytes(self._jsonl, ("\n".join(lines) + "\n").encode())
        if self._tb is None:
            with _without_torch():
                from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self._tb_dir)
        for key, value in {**record, **(extra_scalars or {})}.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, record["epoch"])
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


@contextlib.contextmanager
def _without_torch():
    """tensorboardX imports torch, where installed, only to accept torch tensors, which these scalars never
    are; torch's import costs seconds at the start of every run. Inside the block `import torch` fails (a
    `None` entry in `sys.modules`) unless torch is already imported; the entry is removed afterwards."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None
    try:
        yield
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
