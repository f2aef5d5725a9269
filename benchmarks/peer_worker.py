"""The PyTorch peer's own process: builds steps and times them on request (one JSON line in, one out).

Started by `benchmarks.peer` as `python -m benchmarks.peer_worker --threads=N [--device=cuda]`, with the
OpenMP wait policy already in its environment (set before torch loads its OpenMP runtime). Models and batches
live on `--device`; on CUDA, cuDNN picks its convolution algorithms by timing them (`cudnn.benchmark`, as XLA
autotunes), and every step still ends in `loss.item()`, a device sync, as the JAX side blocks on each step.
Requests:

    {"op": "hello"}                           -> torch version, threads, thread settings, pid, device
    {"op": "train_step", "key": K, "model": M, "batch": B, "num_classes": C,
     "dtype": "float32" | "bfloat16", "image_size": S (default 32)}
                                              a CE step; bfloat16: autocast (mixed precision)
    {"op": "time", "key": K, "calls": N}                         -> {"seconds_per_call": s}, timed here
    {"op": "quit"}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

THREAD_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")


def _batch(torch, batch: int, num_classes: int, device: str = "cpu", seed: int = 0, image_size: int = 32):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return images.to(device).contiguous(memory_format=torch.channels_last), labels.to(device)


class Peer:
    def __init__(self, threads: int, device: str = "cpu"):
        third_party = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "third_party")
        sys.path.insert(0, third_party)
        import torch
        from torch_peer import models, train

        torch.set_num_threads(threads)
        if device == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit("--device=cuda: this PyTorch sees no CUDA device; use --device=cpu")
            torch.backends.cudnn.benchmark = True
        self.torch, self.models, self.train, self.device = torch, models, train, device
        self.fns: dict = {}

    def hello(self, req: dict) -> dict:
        env = {k: os.environ.get(k, "") for k in THREAD_VARS}
        torch, threads = self.torch, self.torch.get_num_threads()
        info = {"torch": torch.__version__, "threads": threads, "env": env, "pid": os.getpid()}
        info["device"] = self.device
        if self.device == "cuda":
            info["device_name"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
            info["cudnn"] = torch.backends.cudnn.version()
            info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
            info["tf32_conv"] = torch.backends.cudnn.allow_tf32
            info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        return info

    def train_step(self, req: dict) -> dict:
        torch, k = self.torch, req.get("num_classes", 2)
        dtype = req.get("dtype", "float32")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype {dtype!r}: the peer runs float32, or bfloat16 autocast")
        torch.manual_seed(0)
        student = self.models.get_model(req["model"], k).to(self.device)
        autocast = torch.bfloat16 if dtype == "bfloat16" else None
        step = self.train.make_train_step(student, autocast_dtype=autocast)
        images, labels = _batch(torch, req["batch"], k, self.device, image_size=req.get("image_size", 32))
        self.fns[req["key"]] = lambda: step(images, labels)
        return {"key": req["key"]}

    def time(self, req: dict) -> dict:
        fn, calls = self.fns[req["key"]], req["calls"]
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return {"seconds_per_call": (time.perf_counter() - t0) / calls}


def serve(peer: Peer, requests, answers) -> None:
    for line in requests:
        req = json.loads(line)
        if req["op"] == "quit":
            return
        try:
            answer = getattr(peer, req["op"])(req)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
            answer = {"error": f"{type(e).__name__}: {e}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    answers, sys.stdout = sys.stdout, sys.stderr  # stdout carries the protocol only
    serve(Peer(args.threads, args.device), sys.stdin, answers)


if __name__ == "__main__":
    main()
