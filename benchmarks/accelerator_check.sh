#!/usr/bin/env bash
# The accelerator check, one command from the repository root on a GPU machine (docs/performance.md, "GPU"):
#   1. the devices JAX and PyTorch see, nvidia-smi and the versions;
#   2. the train-step benchmark against the PyTorch peer on the same GPU (`--accelerator --only=train_step`);
#   3. the smoke study on Dogs vs Cats in bfloat16 (the whole job end to end);
#   4. the 1-seed CPU-scale study in bfloat16, stopped by `timeout` when the remaining seconds run out.
# Every result lands flat in OUT (8 files at most): log.txt, BENCHMARKS.md, benchmarks.json, smoke_results.{json,md},
# study_results.{json,md}.
#
#   benchmarks/accelerator_check.sh OUT DATA_FOLDER [TOTAL_SECONDS] [BENCH_SECONDS] [SMOKE_SECONDS]
#
# DATA_FOLDER: the Dogs vs Cats folder (../shared/data/dogs_vs_cats_32 in a checkout). TOTAL_SECONDS: when the
# study must have ended, counted from the start of this script (default 480). ACCELERATOR_BENCH_ARGS (optional)
# is added to the benchmark's arguments, e.g. "--train-models=resnet_tiny --train-batches=8" to try it on a CPU.
set -u
out=$1
data=$2
total_s=${3:-480}
bench_s=${4:-330}
smoke_s=${5:-150}
start=$(date +%s)
export PYTHONUNBUFFERED=1
mkdir -p "$out"
log="$out/log.txt"
say() { echo "=== [$(($(date +%s) - start)) s] $*" | tee -a "$log"; }

say "devices and versions"
{
  date -u
  nvidia-smi
  python3 -c "import jax; print(jax.devices())"
  python3 -c "
import platform, jax, jaxlib, flax, optax, orbax.checkpoint as ocp, numpy, torch
print('python', platform.python_version(), '| jax', jax.__version__, '| jaxlib', jaxlib.__version__,
      '| flax', flax.__version__, '| optax', optax.__version__, '| orbax-checkpoint', ocp.__version__,
      '| numpy', numpy.__version__, '| torch', torch.__version__, '(CUDA', torch.version.cuda, ')')
print('torch sees', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')
print('jax backend', jax.default_backend(), [d.device_kind for d in jax.devices()])"
} >>"$log" 2>&1

say "train-step benchmark (limit ${bench_s} s)"
# JAX takes half the GPU's memory, so the peer's process has room beside it.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout "$bench_s" \
  python3 -m benchmarks --accelerator --only=train_step --out="$out" ${ACCELERATOR_BENCH_ARGS:-} >>"$log" 2>&1
say "benchmark exit status $?"

study() {  # name seconds config-args...
  local name=$1 seconds=$2
  shift 2
  say "$name: python -m debkd_jax.main $* (limit ${seconds} s)"
  timeout "$seconds" python3 -m debkd_jax.main "$@" --config.data.source="folder:$data" \
    --config.dtype=bfloat16 --workdir="/tmp/accelerator_check/$name" >>"$log" 2>&1
  say "$name exit status $?"
  for f in results.json results.md; do
    [ -f "/tmp/accelerator_check/$name/$f" ] && cp "/tmp/accelerator_check/$name/$f" "$out/${name}_$f"
  done
}

study smoke "$smoke_s" --config=configs/study.py:dogs_vs_cats,smoke
left=$((total_s - ($(date +%s) - start)))
if [ "$left" -gt 60 ]; then
  study study "$left" --config=configs/study.py:dogs_vs_cats --config.seeds=1
else
  say "no time left for the 1-seed study (${left} s)"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>"$log" 2>&1
say "done"
