"""One lever sample in a fresh process: build one workload under this process's XLA settings, time it.

    python -m benchmarks.lever_worker '{"kind": "train_step", "model": "resnet8", "batch": 128, "calls": 3}'

kind: "train_step" (CE step of `model`, `conv_backward` as in the config, default "auto") or "teacher_pass"
(eval-mode logits of one batch). Prints one JSON line: the seconds of `calls` samples of one call each (after
the compiling call), their median, images/s, the compile time, the conv backward and the XLA_FLAGS the process
ran with.
"""

from __future__ import annotations

import json
import os
import sys


def measure(kind: str, model: str, batch: int, calls: int, conv_backward: str = "auto") -> dict:
    from benchmarks import steps, timing

    if kind == "train_step":
        fn = steps.JaxStep(model, "CE", batch=batch, conv_backward=conv_backward)
    else:
        fn = steps.TeacherPass(model, batch)
    samples = timing.interleaved({"fn": fn}, rounds=calls, calls=1, warmup=0, settle=0.0)["fn"]
    return {
        "compile_s": fn.compile_s,
        "conv_backward": getattr(fn, "conv_backward", ""),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **timing.summary(samples, batch),
    }


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
