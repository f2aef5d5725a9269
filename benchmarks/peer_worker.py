"""The PyTorch peer's own process: builds steps and times them on request (one JSON line in, one out).

Started by `benchmarks.peer` as `python -m benchmarks.peer_worker --threads=N`, with the OpenMP wait policy
already in its environment (set before torch loads its OpenMP runtime). Requests:

    {"op": "hello"}                                  -> torch version, threads, thread settings, pid
    {"op": "train_step", "key": K, "model": M, "batch": B, "num_classes": C, "teacher": T or null,
     "image_size": S (default 32)}
    {"op": "eval", "key": K, "model": M, "batch": B, "num_classes": C}
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


def _batch(torch, batch: int, num_classes: int, seed: int = 0, image_size: int = 32):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen)
    images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, num_classes, (batch,), generator=gen)


class Peer:
    def __init__(self, threads: int):
        third_party = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "third_party")
        sys.path.insert(0, third_party)
        import torch
        from torch_peer import models, train

        torch.set_num_threads(threads)
        self.torch, self.models, self.train = torch, models, train
        self.fns: dict = {}

    def hello(self, req: dict) -> dict:
        env = {k: os.environ.get(k, "") for k in THREAD_VARS}
        threads = self.torch.get_num_threads()
        return {"torch": self.torch.__version__, "threads": threads, "env": env, "pid": os.getpid()}

    def train_step(self, req: dict) -> dict:
        torch, k = self.torch, req.get("num_classes", 2)
        torch.manual_seed(0)
        student = self.models.get_model(req["model"], k)
        if req.get("teacher"):
            step = self.train.make_kd_train_step(student, self.models.get_model(req["teacher"], k))
        else:
            step = self.train.make_train_step(student)
        images, labels = _batch(torch, req["batch"], k, image_size=req.get("image_size", 32))
        self.fns[req["key"]] = lambda: step(images, labels)
        return {"key": req["key"]}

    def eval(self, req: dict) -> dict:
        torch = self.torch
        net = self.models.get_model(req["model"], req.get("num_classes", 2)).eval()
        net = net.to(memory_format=torch.channels_last)
        images, _ = _batch(torch, req["batch"], req.get("num_classes", 2))

        def forward():
            with torch.inference_mode():
                return net(images)[0].sum().item()

        self.fns[req["key"]] = forward
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
    args = parser.parse_args()
    answers, sys.stdout = sys.stdout, sys.stderr  # stdout carries the protocol only
    serve(Peer(args.threads), sys.stdin, answers)


if __name__ == "__main__":
    main()
