"""The main job and its parts, which sweeps reuse.

job.py               train_and_evaluate: check, data record, teacher -> logits, students, results
teacher.py           Teacher and get_teacher: trained, given (variables), a logits file; out-of-fold
teacher_training.py  train_teacher (or reuse), logits cached on disk
folds.py             out-of-fold logits from K fold teachers (teacher.folds = K > 1)
student.py           train_student: claim, step spec, fit, evaluate, save
identity.py          the one definition of "the same run" (teachers, students, sweep points)
diagnostics.py       what the targets do to the teacher's logits; when and with what results were made
stream.py            the same job on streamed data (data.pipeline="stream", docs/scale.md)
stream_logits.py     its teacher pass to disk, knowledge infusion from the store
"""

from debkd_jax.pipeline.diagnostics import run_diagnostics, run_meta, target_diagnostics
from debkd_jax.pipeline.folds import check_folds, out_of_fold_logits, with_out_of_fold_logits
from debkd_jax.pipeline.identity import (
    fingerprint,
    identity_key,
    run_folder,
    student_identity,
    teacher_identity,
    training_fields,
)
from debkd_jax.pipeline.job import check_models, load_data, record_data, train_and_evaluate
from debkd_jax.pipeline.student import (
    claim_student,
    evaluate_student,
    save_student,
    student_step_spec,
    train_student,
)
from debkd_jax.pipeline.teacher import (
    Teacher,
    get_teacher,
    given_teacher,
    teacher_from_logits_file,
    teacher_from_variables,
)
from debkd_jax.pipeline.teacher_training import (
    cached_logits,
    placeholder_targets,
    teacher_logits,
    train_teacher,
)

__all__ = [
    "Teacher",
    "cached_logits",
    "check_folds",
    "check_models",
    "claim_student",
    "evaluate_student",
    "fingerprint",
    "get_teacher",
    "given_teacher",
    "identity_key",
    "load_data",
    "out_of_fold_logits",
    "placeholder_targets",
    "record_data",
    "run_diagnostics",
    "run_folder",
    "run_meta",
    "save_student",
    "student_identity",
    "student_step_spec",
    "target_diagnostics",
    "teacher_from_logits_file",
    "teacher_from_variables",
    "teacher_identity",
    "teacher_logits",
    "train_and_evaluate",
    "train_student",
    "train_teacher",
    "training_fields",
    "with_out_of_fold_logits",
]
