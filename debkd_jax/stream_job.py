"""The main job on streamed data (`data.pipeline = "stream"`, docs/scale.md): the source listed, never decoded
whole; the teacher (given as variables, or trained here on the stream); one streamed teacher pass that writes
every split's logits to disk; each method's students trained on the stream with their targets computed in the
step from their batch's rows of the logits; results as the in-memory job writes them.

    workdir/teacher/            checkpoints, final, teacher.json (a teacher trained here)
    workdir/teacher/logits-<key>/<split>/   manifest.json, chunk-*.npy (logits), chunk-*.npz (valid, labels)
    workdir/students/<method>-seed<s>/      as the in-memory job
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from debkd_jax import config_lib, losses, methods, metrics, models, report, teachers, training, workdir_lib
from debkd_jax import targets as targets_lib
from debkd_jax.data import stream
from debkd_jax.errors import UserError

log = logging.getLogger("debkd_jax")

SPLITS = ("train", "val", "test")


class StreamSummary:
    """What `report.summarize` reads of a dataset, for a streamed source: names, labels of the readable rows
    of each split (from the teacher pass) and the unreadable files."""

    def __init__(self, source: stream.StreamSource, labels: dict, skipped: list):
        self.source = source.name
        self.class_names = source.class_names
        self.num_classes = source.num_classes
        self.skipped = tuple(skipped)
        for split in SPLITS:
            setattr(self, f"{split}_labels", labels[split])


def plan(config) -> stream.StreamSource:
    d = config.data
    try:
        return stream.plan_stream(d.source, seed=config.seed, max_per_class=d.max_per_class or None,
                                  tfds_data_dir=d.tfds_data_dir or None)
    except ValueError as e:
        raise UserError(f"data.source={d.source!r}: {e}") from e
    except OSError as e:
        raise UserError(f"data.source={d.source!r}: cannot read it ({e}).") from e


def check_teacher_variables(config, variables: dict, num_classes: int) -> None:
    model = models.get_model(config.teacher.model, num_classes, config.dtype)
    x = jax.ShapeDtypeStruct((1, config.data.image_size, config.data.image_size, 3), jnp.float32)
    try:
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    except Exception as e:  # noqa: BLE001 - flax's shape/missing-variable errors
        raise UserError(
            f"teacher.variables={config.teacher.variables!r} do not fit teacher.model={config.teacher.model!r} "
            f"with {num_classes} classes ({type(e).__name__}: {str(e).splitlines()[0][:200]}); give the "
            "variables of that model."
        ) from e


def stream_data(config, source, split_logits=None) -> training.StreamTrainData:
    d = config.data
    return training.StreamTrainData(train=source.splits["train"], val=source.splits["val"],
                                    image_size=d.image_size, augment=d.augment, eval_crop=d.eval_crop,
                                    workers=d.workers, logits=split_logits)


def teacher_network(config, source, teacher_dir: str, mesh) -> tuple[dict, dict]:
    """`teacher.variables`, or a teacher trained here with CE on the stream (reused when finished)."""
    meta = {"model": config.teacher.model, "num_classes": source.num_classes,
            "class_names": list(source.class_names), "image_size": config.data.image_size,
            "dtype": config.dtype}
    if config.teacher.get("variables", ""):
        path = workdir_lib.expand(config.teacher.variables)
        variables = teachers.read_variables(path)
        check_teacher_variables(config, variables, source.num_classes)
        log.info("teacher: %s from %s", config.teacher.model, path)
        return variables, {**meta, "variables": path}
    identity = {"teacher": {k: v for k, v in config.teacher.to_dict().items() if k != "eval_batch_size"},
                "seed": config.seed, "dtype": config.dtype, "data": source.fingerprint,
                "stream": stream_settings(config)}
    writer = jax.process_index() == 0
    workdir_lib.claim_run_dir(teacher_dir, identity, "a teacher", writer, config.overwrite)
    training.sync_processes("claim " + teacher_dir)
    saved = workdir_lib.read_json(os.path.join(teacher_dir, "teacher.json"))
    if saved is not None:
        log.info("teacher: reusing %s", teacher_dir)
        return workdir_lib.restore_variables(os.path.join(teacher_dir, "final")), saved
    started = time.perf_counter()
    result = fit_on_stream(config, config.teacher, methods.preset("CE"), source, None, teacher_dir, mesh,
                           config.seed, "teacher")
    variables = {k: v["backbone"] for k, v in result.best_variables.items()}
    meta.update(best_epoch=result.best_epoch, history=result.history, wall_seconds=time.perf_counter() - started)
    workdir_lib.save_variables(os.path.join(teacher_dir, "final"), variables)
    if writer:
        workdir_lib.write_json(os.path.join(teacher_dir, "teacher.json"), meta)
    return variables, meta


def stream_settings(config) -> dict:
    d = config.data
    return {"image_size": d.image_size, "eval_crop": d.eval_crop, "augment": d.augment}


def fit_on_stream(config, train_cfg, method_cfg, source, store, run_dir, mesh, seed, name, teacher_vars=None):
    objective = methods.objective(method_cfg, train_cfg.num_epochs)
    conv_backward = training.resolve_conv_backward(config.get("conv_backward", "auto"), mesh)
    kw = {"method_cfg": method_cfg}
    if objective.uses_hints:
        raise UserError(f"{name}: feature hints (hint_weight) are not available with data.pipeline='stream'; "
                        "use a method without hints or data.pipeline='memory'")
    if objective.needs_teacher_online:
        kw["teacher"] = models.get_model(config.teacher.model, source.num_classes, config.dtype, conv_backward)
    data = stream_data(config, source, store)
    steps = len(data.train) // train_cfg.batch_size
    # Augmentation runs in the loader (random-resized crop + flip), not in the step.
    spec = training.build_step_spec(train_cfg, source.num_classes, config.dtype, objective, steps, False,
                                    conv_backward, **kw)
    infusion = None
    if "knowledge_infusion" in objective.transforms:
        infusion = streamed_infusion_table(store, method_cfg.ki_mode)
    return training.fit(name=name, spec=spec, train_cfg=train_cfg, dataset=None, train_targets=None,
                        run_dir=run_dir, mesh=mesh, seed=seed, stream=data, show_progress=config.progress,
                        teacher_vars=teacher_vars if objective.needs_teacher_online else None, infusion=infusion)


def streamed_infusion_table(store: stream.LogitsStore, mode: str) -> np.ndarray:
    """`targets.infusion_table` of the whole training split, read chunk by chunk: each chunk's table weighted
    by its teacher-correct rows (per row c by its correct rows of label c), which is the whole split's table
    since each entry is a mean over the correct rows."""
    valid, labels, _ = store.meta()
    k = store.num_classes
    total = np.zeros((k, k))
    weight = np.zeros((k, 1))
    for c, rows in enumerate(stream.chunks_of(store.num_rows, store.chunk_rows)):
        z = stream.decode_logits(np.load(os.path.join(store.path, f"chunk-{c:06d}.npy")), store.dtype)
        ok = valid[rows]
        z, y = z[ok], labels[rows][ok]
        correct = np.argmax(z, -1) == y
        if not correct.any():
            continue
        table = np.asarray(targets_lib.infusion_table(z, y, mode), np.float64)
        w = np.full((k, 1), correct.sum(), np.float64) if mode == "pooled" else \
            np.bincount(y[correct], minlength=k)[:, None].astype(np.float64)
        total += w * table
        weight += w
    if not weight.any():
        raise UserError("knowledge infusion needs at least one training image the teacher classifies correctly, "
                        "found none; train the teacher longer or drop 'knowledge_infusion'")
    return np.where(weight > 0, total / np.maximum(weight, 1e-12), _pooled_fallback(total, weight, k)).astype(
        np.float32)


def _pooled_fallback(total: np.ndarray, weight: np.ndarray, k: int) -> np.ndarray:
    """For `per_class` rows of labels without a correct row: the pooled table (zF everywhere, zC at c), from
    the per-class rows that exist, weighted by their counts."""
    have = weight[:, 0] > 0
    rows = total[have] / weight[have]
    w = weight[have, 0]
    idx = np.flatnonzero(have)
    z_c = np.sum(w * rows[np.arange(len(idx)), idx]) / w.sum()
    z_f = np.sum(w * (rows.sum(1) - rows[np.arange(len(idx)), idx]) / (k - 1)) / w.sum()
    return z_f + (z_c - z_f) * np.eye(k)


def teacher_pass(config, variables, source, root: str, mesh) -> dict[str, stream.LogitsStore]:
    """Every split's teacher logits in `root/<split>` (`stream.LogitsStore`), written chunk by chunk by the
    processes in turn; chunks already there are kept (a killed pass resumes)."""
    d = config.data
    model = models.get_model(config.teacher.model, source.num_classes, config.dtype)
    predict = training.make_predict_fn(model, jnp.dtype(config.dtype))
    local = training.local_eval_batch(config.teacher.eval_batch_size, mesh)
    chunk_rows = max(local, d.logits_chunk_rows - d.logits_chunk_rows % local)
    writer = jax.process_index() == 0
    key = _key(variables, source, config)
    stores = {}
    for split in SPLITS:
        records = source.splits[split]
        path = os.path.join(root, split)
        try:
            store = stream.LogitsStore.create(path, len(records), source.num_classes, config.teacher.logits_dtype,
                                              chunk_rows, key, writer)
        except ValueError as e:
            raise UserError(str(e)) from e
        training.sync_processes("logits store " + path)
        todo = store.missing_chunks()
        training.sync_processes("logits todo " + path)  # every process listed the chunks before any writes
        if todo:
            all_chunks = stream.chunks_of(len(records), chunk_rows)

            def write(i, chunk, store=store, todo=todo, records=records):
                skipped = [(str(records.ids[r]), str(reason))
                           for r, reason, ok in zip(chunk["row"], chunk["reason"], chunk["valid"], strict=True)
                           if not ok]
                store.write_chunk(todo[i], chunk["logits"], chunk["valid"], chunk["label"], skipped)

            training.predict_pass(predict, variables, records, image_size=d.image_size, eval_crop=d.eval_crop,
                                  mesh=mesh, chunks=[all_chunks[c] for c in todo], chunk_rows=chunk_rows,
                                  workers=d.workers, on_chunk=write,
                                  progress=f"teacher pass ({split})" if config.progress else None)
        training.sync_processes("logits done " + path)
        stores[split] = stream.LogitsStore.open(path, len(records), source.num_classes)
    return stores


def _key(variables, source, config) -> str:
    import hashlib

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.tree.map(np.asarray, variables)):
        h.update(np.ascontiguousarray(leaf).tobytes())
    h.update(repr((source.fingerprint, stream_settings(config), config.teacher.model, config.dtype)).encode())
    return h.hexdigest()[:16]


def all_rows(store: stream.LogitsStore) -> np.ndarray:
    """A (small) split's logits whole: (N, k) float32."""
    return np.concatenate([stream.decode_logits(np.load(os.path.join(store.path, f"chunk-{c:06d}.npy")), store.dtype)
                           for c in range(store.num_chunks)])


def gathered_logits(config, variables, model_name: str, records, num_classes: int, mesh) -> np.ndarray:
    """Eval-mode logits of every row of `records` on every process: (N, k) float32 (for val/test-sized
    splits)."""
    d = config.data
    model = models.get_model(model_name, num_classes, config.dtype)
    predict = training.make_predict_fn(model, jnp.dtype(config.dtype))
    local = training.local_eval_batch(config.student.eval_batch_size, mesh)
    out = np.zeros((len(records), num_classes), np.float32)
    got = []

    def keep(_, chunk):
        got.append((chunk["row"], chunk["logits"]))

    training.predict_pass(predict, variables, records, image_size=d.image_size, eval_crop=d.eval_crop, mesh=mesh,
                          chunks=stream.chunks_of(len(records), local), chunk_rows=local, workers=d.workers,
                          on_chunk=keep)
    rows = np.concatenate([r for r, _ in got]) if got else np.zeros(0, np.int64)
    logits = np.concatenate([z for _, z in got]) if got else np.zeros((0, num_classes), np.float32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        pad = -(-len(records) // jax.process_count()) + local
        rows_p = np.full(pad, -1, np.int64)
        rows_p[: len(rows)] = rows
        logits_p = np.zeros((pad, num_classes), np.float32)
        logits_p[: len(rows)] = logits
        rows = np.asarray(multihost_utils.process_allgather(rows_p)).reshape(-1)
        logits = np.asarray(multihost_utils.process_allgather(logits_p)).reshape(-1, num_classes)
        logits, rows = logits[rows >= 0], rows[rows >= 0]
    out[rows] = logits
    return out


def choose(config) -> tuple[str, str]:
    """("memory" | "stream", why) for `data.pipeline` (`stream.choose_pipeline`); `UserError` for a bad value
    or an unreadable source."""
    d = config.data
    try:
        return stream.choose_pipeline(d.get("pipeline", "memory"), d.source, d.image_size, d.tfds_data_dir or None)
    except ValueError as e:
        raise UserError(f"data.source={d.source!r}: {e}") from e


def train_and_evaluate(config, workdir: str, command: str | None = None, reason: str = "") -> dict:
    """The streamed job (module docstring); writes what `pipeline.train_and_evaluate` writes."""
    training.initialize_distributed(config)
    config_lib.validate_config(config)
    workdir = workdir_lib.expand(workdir)
    writer = jax.process_index() == 0
    with workdir_lib.Workdir(workdir, writer=writer) as wd:
        mesh = training.create_mesh()
        source = plan(config)
        log.info("data: streamed (%s): %s, %d classes, train/val/test = %d/%d/%d rows; process %d of %d reads "
                 "its %d of every global batch of %d", reason or "data.pipeline='stream'", source.name,
                 source.num_classes, *(len(source.splits[s]) for s in SPLITS), jax.process_index(),
                 jax.process_count(), config.student.batch_size // jax.process_count(), config.student.batch_size)
        if config.teacher.get("logits", ""):
            raise UserError("teacher.logits (an .npz of logits) is for data.pipeline='memory'; with streamed data "
                            "give teacher.variables (the teacher pass writes its logits to disk)")
        wd.write_config(config)
        teacher_dir = os.path.join(workdir, "teacher")
        teacher_vars, teacher_meta = teacher_network(config, source, teacher_dir, mesh)
        key = _key(teacher_vars, source, config)
        stores = teacher_pass(config, teacher_vars, source, os.path.join(teacher_dir, f"logits-{key}"), mesh)
        labels, skipped, t_test = {}, [], None
        for split in SPLITS:
            valid, split_labels, split_skipped = stores[split].meta()
            labels[split] = split_labels[valid]
            if split != "val" or source.splits["val"] is not source.splits["test"]:
                skipped.extend(split_skipped)
        skipped = sorted(set(skipped))
        if skipped:
            skipped_csv = os.path.join(workdir, "skipped_files.csv")
            if writer:
                report.write_skipped_csv(skipped, skipped_csv)
            log.warning("data: skipped %d unreadable file(s), listed in %s", len(skipped), skipped_csv)
        test_valid = stores["test"].meta()[0]
        t_test_logits = all_rows(stores["test"])[test_valid]
        t_test = metrics.classification_metrics(t_test_logits, labels["test"], num_classes=source.num_classes)
        runs = []
        for method_name, method_cfg in methods.ordered(config.methods):
            for s in range(config.seeds):
                seed = config.seed + s
                run_dir = os.path.join(workdir, "students", f"{workdir_lib.safe_name(method_name)}-seed{seed}")
                runs.append(train_student(config, method_name, method_cfg, seed, source, stores, teacher_vars,
                                          t_test_logits, test_valid, labels["test"], mesh, run_dir, key))
        teacher_accuracy = {s: float(np.mean(np.argmax(all_rows(stores[s])[stores[s].meta()[0]], -1) == labels[s]))
                            for s in ("val", "test")}
        summary = StreamSummary(source, labels, skipped)
        results = report.summarize(config, summary, teacher_meta, t_test, runs,
                                   {"teacher_accuracy": {"train": None, **teacher_accuracy}, "methods": {}})
        results["meta"] = {"command": command, "pipeline": "stream", "why": reason,
                           "student_seconds": float(sum(r.get("wall_seconds", 0.0) for r in runs))}
        if writer:
            report.write_results(workdir, results)
        return results


def train_student(config, method_name, method_cfg, seed, source, stores, teacher_vars, t_test_logits, test_valid,
                  test_labels, mesh, run_dir, key) -> dict:
    writer = jax.process_index() == 0
    identity = {"method": method_cfg.to_dict(),
                "student": {k: v for k, v in config.student.to_dict().items() if k != "eval_batch_size"},
                "seed": seed, "dtype": config.dtype, "data": source.fingerprint, "stream": stream_settings(config),
                "teacher_logits": key}
    workdir_lib.claim_run_dir(run_dir, identity, f"a {method_name} student (seed {seed})", writer)
    training.sync_processes("claim " + run_dir)
    done = workdir_lib.read_json(os.path.join(run_dir, "result.json"))
    if done is not None:
        log.info("%s (seed %d): finished before, reusing %s", method_name, seed, run_dir)
        return done
    started = time.perf_counter()
    result = fit_on_stream(config, config.student, method_cfg, source,
                           None if method_cfg.loss == "ce" else stores["train"], run_dir, mesh, seed,
                           f"{method_name} (seed {seed})", teacher_vars)
    student_vars = {k: v["backbone"] for k, v in result.best_variables.items()}
    test_logits = gathered_logits(config, student_vars, config.student.model, source.splits["test"],
                                  source.num_classes, mesh)[test_valid]
    hits = None
    if method_cfg.loss == "debkd":
        built = methods.method_targets(method_cfg, t_test_logits, test_labels,
                                       infusion=streamed_infusion_table(stores["train"], method_cfg.ki_mode)
                                       if "knowledge_infusion" in methods.objective(method_cfg, 1).transforms
                                       else None)
        hits = np.asarray(losses.region_hits(test_logits, test_labels, built.lo, built.hi,
                                             temperature=method_cfg.temperature))
    test = metrics.classification_metrics(test_logits, test_labels, num_classes=source.num_classes,
                                          teacher_logits=t_test_logits, region_hits=hits)
    out = {"method": method_name, "seed": seed, "model": config.student.model, "config": method_cfg.to_dict(),
           "best_epoch": result.best_epoch, "wall_seconds": time.perf_counter() - started, "test": test,
           "history": result.history}
    workdir_lib.save_variables(os.path.join(run_dir, "final"), student_vars)
    if writer:
        workdir_lib.write_json(os.path.join(run_dir, "model.json"),
                               {"model": config.student.model, "num_classes": source.num_classes,
                                "class_names": list(source.class_names), "image_size": config.data.image_size,
                                "dtype": config.dtype})
        workdir_lib.write_json(os.path.join(run_dir, "result.json"), out)
    return out
