"""j. ImageNet scale: peak memory of the streamed job (teacher pass included) against the in-memory job as the
folder grows, images/s of the streamed input alone (decode, random-resized crop to 224, flip, batch) with 1
and 2 grain workers, and the ResNet-18 train step at 224 against the PyTorch peer.

    python -m benchmarks.scale --out=benchmarks/results/scale-<date> [--sizes=5000,20000,80000] [--smoke]

Standalone (not a section of `python -m benchmarks`: its jobs take minutes), it writes BENCHMARKS_SCALE.md and
benchmarks_scale.json into `--out`.

The folders are generated JPEGs (two classes; each file one of 256 distinct seeded noise images, so that
writing 80,000 files takes seconds); they live in the system's temporary folder, reused between runs.

    jobs.py    the generated folders and teacher file; the main job in a subprocess, its peak memory sampled
    parts.py   the in-process parts: streamed input throughput, the ResNet-18 step at 224, half-precision
               logits stores
    report.py  BENCHMARKS_SCALE.md and benchmarks_scale.json from the results
    run.py     the command line: the chosen parts, merged into an earlier benchmarks_scale.json
"""
