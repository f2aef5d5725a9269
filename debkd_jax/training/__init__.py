"""Training one model: train state and optimizer, the train step (one factory for training, benchmarks and
tests), the mesh and multi-process helpers, the `fit` loop with checkpoints and resume, the per-epoch metric
writer (metrics.jsonl, TensorBoard), and the one evaluation pass over either kind of data (`evaluate.py`)."""

from debkd_jax.training.distributed import (
    create_mesh,
    distributed_kwargs,
    initialize_distributed,
    resolve_conv_backward,
    sync_processes,
    wait_for_coordinator,
)
from debkd_jax.training.evaluate import (
    eval_chunk_rows,
    local_eval_batch,
    local_rows,
    predict_pass,
    split_accuracy,
    split_logits,
)
from debkd_jax.training.loop import FitResult, NonFiniteLoss, fit, non_finite_loss
from debkd_jax.training.metric_writer import MetricWriter
from debkd_jax.training.state import (
    TrainState,
    host_copy,
    init_state,
    jitted_init,
    learning_rate_schedule,
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

__all__ = [
    "FitResult",
    "MetricWriter",
    "NonFiniteLoss",
    "StepSpec",
    "Student",
    "TrainState",
    "build_step_spec",
    "create_mesh",
    "distributed_kwargs",
    "fit",
    "non_finite_loss",
    "host_copy",
    "init_state",
    "initialize_distributed",
    "jitted_init",
    "local_eval_batch",
    "local_rows",
    "split_accuracy",
    "split_logits",
    "eval_chunk_rows",
    "predict_pass",
    "learning_rate_schedule",
    "make_optimizer",
    "make_predict_fn",
    "make_train_step",
    "predict_logits",
    "resolve_conv_backward",
    "sync_processes",
    "variables_of",
    "wait_for_coordinator",
    "zero_metrics",
]
