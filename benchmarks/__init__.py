"""Speed benchmarks of debkd_jax, side by side in one run on one machine: BENCHMARKS.md and benchmarks.json.

    python -m benchmarks --quick --only=train_step,fresh_pairs --out=.   # the committed BENCHMARKS.md
    python -m benchmarks --full --out=DIR        # more rounds and samples, DeBKD's XLA-conv row per model
    python -m benchmarks --smoke                 # seconds, tiny models: the plumbing (what the tests run)
    python -m benchmarks --accelerator --only=train_step   # GPU sizes: batch 512/2048, float32/bfloat16
    python -m benchmarks.render DIR/benchmarks.json      # the report again, from its JSON alone
    python -m benchmarks.data --source=digits    # the input pipeline alone (BENCHMARKS_DATA.md)
    python -m benchmarks.scale --out=DIR         # ImageNet scale, streamed input (BENCHMARKS_SCALE.md)
    python -m benchmarks.profile_step --out=DIR  # where a train step's time goes (a jax.profiler trace)
    benchmarks/accelerator_check.sh OUT DATA_FOLDER   # on a GPU machine: the train step and the study

Run from the repository root; not part of the installed package. One module per section of `python -m
benchmarks` (`modes.SECTIONS`: train_step, fresh_pairs, data), each with `measure(ctx) -> dict` and
`render(result) -> lines`; `timing` interleaves samples, `peer` runs the PyTorch peer in its own process,
`workers` gives every subprocess a deadline. The report holds only what its run measured. This package's
`__init__` imports nothing heavy: its workers start as `python -m benchmarks.X`.
"""
