"""Training one model: train state and optimizer, the train step (one factory for training, benchmarks and
tests), the mesh and multi-process helpers, the `fit` loop with checkpoints and resume, the per-epoch metric
writer (metrics.jsonl, TensorBoard), and the passes over streamed data (`streamed.py`)."""

from debkd_jax.training.distributed import (
    create_mesh,
    distributed_kwargs,
    initialize_distributed,
    process_local,
    resolve_conv_backward,
    sync_processes,
    wait_for_coordinator,
)
from debkd_jax.training.loop import FitResult, NonFiniteLoss, fit
from debkd_jax.training.metric_writer import MetricWriter
from debkd_jax.training.state import (
    TrainState,
    host_copy,
    init_state,
    jitted_init,
    make_optimizer,
    variables_of,
    zero_metrics,
)
from debkd_jax.training.step import (
    StepSpec,
    Student,
    build_step_spec,
    make_predict_fn,
    make_train_step,
    predict_logits,
)
from debkd_jax.training.streamed import (
    StreamTrainData,
    local_eval_batch,
    local_rows,
    pass_accuracy,
    predict_pass,
)

__all__ = [
    "FitResult",
    "MetricWriter",
    "NonFiniteLoss",
    "StepSpec",
    "StreamTrainData",
    "Student",
    "TrainState",
    "build_step_spec",
    "create_mesh",
    "distributed_kwargs",
    "fit",
    "host_copy",
    "init_state",
    "initialize_distributed",
    "jitted_init",
    "local_eval_batch",
    "local_rows",
    "pass_accuracy",
    "predict_pass",
    "make_optimizer",
    "make_predict_fn",
    "make_train_step",
    "predict_logits",
    "process_local",
    "resolve_conv_backward",
    "sync_processes",
    "variables_of",
    "wait_for_coordinator",
    "zero_metrics",
]
