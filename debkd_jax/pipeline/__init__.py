"""The main job and its parts, which sweeps reuse; one path for either kind of data source.

job.py               check (nothing written); train_and_evaluate: data record, teacher -> logits, students,
                     results
inputs.py            which kind of data (data.pipeline), the source of that kind, its record, the models
                     checked on it
teacher.py           Teacher and get_teacher: a logits file, given variables, a finished run or trained here;
                     out-of-fold; knowledge infusion's table read from the logits store
teacher_pass.py      a network's logits on splits, into the logits store of the source's kind
teacher_training.py  train_teacher (or reuse)
folds.py             out-of-fold logits from K fold teachers (teacher.folds = K > 1)
student.py           train_student: claim, step spec, fit, evaluate, save (model.json with its preprocessing)
identity.py          the one definition of "the same run" (teachers, students, sweep points)
diagnostics.py       what the targets do to the teacher's logits; when and with what results were made
plan.py              what a job would do, from what it builds (`python -m debkd_jax.main --plan`)
"""

from debkd_jax.pipeline.diagnostics import run_diagnostics, run_meta, target_diagnostics
from debkd_jax.pipeline.folds import check_folds, out_of_fold_logits
from debkd_jax.pipeline.identity import (
    fingerprint,
    identity_key,
    recorded_student,
    run_folder,
    student_identity,
    teacher_identity,
    training_fields,
)
from debkd_jax.pipeline.inputs import check_models, choose_kind, load_source, record_data, record_skipped
from debkd_jax.pipeline.job import Setup, check, train_and_evaluate
from debkd_jax.pipeline.plan import json_ready, plan
from debkd_jax.pipeline.student import (
    claim_run,
    evaluate_student,
    model_record,
    save_student,
    student_step_spec,
    train_student,
)
from debkd_jax.pipeline.teacher import (
    StudentTargets,
    Teacher,
    get_teacher,
    given_teacher,
    infusion_table,
    student_targets,
    teacher_from_logits_file,
    teacher_from_variables,
    unreadable_files,
)
from debkd_jax.pipeline.teacher_pass import logits_key, network_logits, view_logits
from debkd_jax.pipeline.teacher_training import check_checkpoint, teacher_meta, train_teacher

__all__ = [
    "Setup",
    "StudentTargets",
    "Teacher",
    "check",
    "check_checkpoint",
    "check_folds",
    "check_models",
    "choose_kind",
    "claim_run",
    "evaluate_student",
    "fingerprint",
    "get_teacher",
    "given_teacher",
    "identity_key",
    "infusion_table",
    "json_ready",
    "load_source",
    "logits_key",
    "model_record",
    "network_logits",
    "out_of_fold_logits",
    "plan",
    "record_data",
    "record_skipped",
    "run_diagnostics",
    "run_folder",
    "run_meta",
    "save_student",
    "recorded_student",
    "student_identity",
    "student_step_spec",
    "student_targets",
    "target_diagnostics",
    "teacher_from_logits_file",
    "teacher_from_variables",
    "teacher_identity",
    "train_and_evaluate",
    "train_student",
    "teacher_meta",
    "train_teacher",
    "training_fields",
    "unreadable_files",
    "view_logits",
]
