"""Speed benchmarks of debkd_jax, side by side in one run on one machine: BENCHMARKS.md and benchmarks.json.

    python -m benchmarks --quick                 # minutes; epochs extrapolated from a few steps
    python -m benchmarks --full --out=DIR        # more rounds and pairs, every model, the real main job
    python -m benchmarks --smoke                 # seconds, tiny models: the plumbing (what the tests run)
    python -m benchmarks --quick --only=train_step,levers
    python -m benchmarks --accelerator --only=train_step   # GPU sizes: batch 512/2048, float32/bfloat16
    python -m benchmarks.render DIR/benchmarks.json      # the report again, from its JSON alone
    python -m benchmarks.data --source=digits    # the input pipeline alone (BENCHMARKS_DATA.md)

Run from the repository root; not part of the installed package. One module per section (`modes.SECTIONS`),
each with `measure(ctx) -> dict` and `render(result) -> lines`; `timing` interleaves samples, `peer` runs the
PyTorch peer in its own process, `workers` gives every subprocess a deadline. The report holds only what its
run measured. This package's `__init__` imports nothing heavy: its workers start as `python -m benchmarks.X`.
"""
