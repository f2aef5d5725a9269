"""The training loop in-process, on the 8 fake CPU devices of conftest.py: configs load and validate, bad
values are refused with clear messages, one device and eight give the same training, runs are deterministic by
seed, evaluation keeps the order of the images, and the progress bar shows what runs.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from debkd_jax import config_lib, data, methods, pipeline, processes, training
from debkd_jax.data import logits_store
from debkd_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))


pytestmark = pytest.mark.usefixtures("fast_compiles")


def load_config_module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smoke_config() -> ml_collections.ConfigDict:
    return config_lib.smoke(config_lib.base_config(("KD", "DeBKD")))


def synthetic_dataset(n_train=64, n_val=16, n_test=16, k=2, seed=0) -> data.Dataset:
    rng = np.random.default_rng(seed)

    def split(n):
        labels = np.arange(n, dtype=np.int32) % k
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        images[..., 0] = np.where(labels[:, None, None] == 1, images[..., 0] // 2 + 128, images[..., 0] // 2)
        return images, labels

    (tri, trl), (vai, val), (tei, tel) = split(n_train), split(n_val), split(n_test)
    return data.Dataset(
        tri, trl, vai, val, tei, tel, class_names=tuple(f"c{i}" for i in range(k)), source="mock"
    )


def teacher_spec(dataset, epochs=2, batch_size=16, model="resnet_tiny", conv_backward="xla"):
    cfg = config_lib.train_config(model, num_epochs=epochs, batch_size=batch_size)
    objective = methods.objective(methods.preset("CE"), epochs)
    steps = len(dataset.train_labels) // batch_size
    spec = training.build_step_spec(
        cfg, dataset.num_classes, "float32", objective, steps, augment=True, conv_backward=conv_backward
    )
    return cfg, spec


# ----------------------------------------------------------------------------------------------------------
# Configs.


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_and_validates(path):
    module = load_config_module(path)
    for arg in (None, "smoke"):
        config = module.get_config(arg) if arg else module.get_config()
        config_lib.validate_config(config)
        assert config.methods and config.teacher.model and config.student.model
    smoke = module.get_config("smoke")
    assert smoke.teacher.num_epochs <= 2 and smoke.data.max_per_class and not smoke.progress


def documented_commands(path: pathlib.Path) -> list[list[str]]:
    """The `--config...` arguments of each `python -m debkd_jax.main|sweep` command in a config's docstring
    (lines continued with a backslash joined); commands with shell variables (`$d`) are left out."""
    commands = []
    docstring = (load_config_module(path).__doc__ or "").replace("\\\n", " ")  # join continued lines
    for line in docstring.splitlines():
        match = re.search(r"python -m debkd_jax\.(?:main|sweep) (.*)", line)
        if match and "$" not in match.group(1):
            commands.append([a for a in match.group(1).split() if a.startswith("--config")])
    return commands


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_the_commands_a_config_documents_parse_and_validate(path, monkeypatch):
    """Each command a config's docstring gives parses with the CLI's flag definition (config file, argument
    and `--config.FIELD=VALUE` overrides) and yields a valid config: a renamed argument or field fails
    here."""
    monkeypatch.chdir(REPO)  # the commands name configs/ relative to the repository root
    for argv in documented_commands(path):
        argv = ["debkd_jax.main", *argv]
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True, sys_argv=argv)
        flag_values(argv)
        config = flag_values.config
        config_lib.validate_config(config)
        for arg in argv[1:]:
            if arg.startswith("--config."):
                field, value = arg[len("--config.") :].split("=", 1)
                node = config
                for part in field.split("."):
                    node = node[part]
                assert str(node) == value or node == type(node)(value), (arg, node)


def _set(path: str, value):
    def change(config):
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        with node.ignore_type():
            node[leaf] = value

    return change


def _clear_methods(config):
    config.methods = ml_collections.ConfigDict()


@pytest.mark.parametrize(
    "change, needles",
    [
        (_set("methods.DeBKD.num_regions", 0), ["'DeBKD'", "num_regions=0", ">= 1"]),
        (_set("methods.DeBKD.num_regions", 2.5), ["num_regions=2.5", "integer"]),
        (_set("methods.DeBKD.temperature", 0.0), ["temperature=0.0", "> 0"]),
        (_set("methods.KD.temperature", -1.0), ["'KD'", "temperature=-1.0"]),
        (_set("methods.DeBKD.beta", -0.1), ["beta=-0.1", ">= 0"]),
        (_set("methods.KD.alpha", 1.5), ["alpha=1.5", "[0, 1]"]),
        (_set("methods.KD.loss", "nosuch"), ["loss='nosuch'", "debkd"]),
        (_set("student.batch_size", 12), ["student.batch_size=12", "8 devices", "multiple of 8"]),
        (_set("teacher.num_epochs", 0), ["teacher.num_epochs=0", ">= 1"]),
        (_set("teacher.num_epochs", 1.5), ["teacher.num_epochs=1.5", "integer"]),
        (_set("student.learning_rate", 0.0), ["student.learning_rate=0.0", "> 0"]),
        (_set("student.learning_rate", float("nan")), ["student.learning_rate=nan", "finite"]),
        (_set("student.momentum", 1.0), ["momentum=1.0", "[0, 1)"]),
        (_set("teacher.model", "resnet9"), ["teacher.model='resnet9'", "resnet8"]),
        (_set("data.max_per_class", 2), ["max_per_class=2", ">= 3"]),
        (_set("seeds", 0), ["seeds=0", ">= 1"]),
        (_set("seed", -1), ["seed=-1", ">= 0"]),
        (_set("dtype", "int8"), ["dtype='int8'", "bfloat16"]),
        (_set("conv_backward", "fast"), ["conv_backward='fast'", "'auto', 'xla', 'materialized', 'onednn'"]),
        (_clear_methods, ["methods is empty"]),
    ],
)
def test_validate_config_refuses_bad_values(change, needles):
    config = smoke_config()
    change(config)
    with pytest.raises(UserError) as info:
        config_lib.validate_config(config)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_distributed_without_a_cluster_is_a_clear_error(monkeypatch):
    config = smoke_config()
    config.distributed = True

    def no_cluster(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    with pytest.raises(UserError, match="distributed=True but jax.distributed.initialize"):
        training.initialize_distributed(config)


# ----------------------------------------------------------------------------------------------------------
# Devices, determinism, evaluation.


def _train_steps(mesh, dataset, n_steps=3, seed=0, conv_backward="xla"):
    cfg, spec = teacher_spec(dataset, conv_backward=conv_backward)
    tx = training.make_optimizer(cfg, 4)
    state = training.init_state(jax.random.key(seed), spec.model, tx, (32, 32, 3))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = jax.device_put(state, replicated)
    acc = jax.device_put(training.zero_metrics(), replicated)
    step = training.make_train_step(spec, mesh)
    order = data.batch_indices(len(dataset.train_labels), cfg.batch_size, seed=seed, epoch=0)
    for idx in order[:n_steps]:
        local = data.views.view_batch(
            lambda r: dataset.train_images[r],
            idx,
            np.zeros(len(idx), np.int32),
            seed=seed,
            pad=data.PAD,
            mixup=0.0,
            num_rows=len(dataset.train_labels),
        )
        batch = data.make_global_batch({**local, "label": dataset.train_labels[idx]}, batch_sharding)
        state, acc = step(state, acc, batch, None, None)
    return jax.device_get(state.params), jax.device_get(state.batch_stats), jax.device_get(acc)


def test_train_step_is_the_same_on_one_and_on_eight_devices():
    """The batch split over 8 devices (BatchNorm statistics and gradients reduced across them) trains exactly
    as on one device, up to float reassociation; with augmentation on, so the random crops agree too."""
    assert jax.device_count() == 8
    dataset = synthetic_dataset()
    one = _train_steps(training.create_mesh(jax.devices()[:1]), dataset)
    eight = _train_steps(training.create_mesh(), dataset)
    flat_one, flat_eight = jax.tree.leaves(one[:2]), jax.tree.leaves(eight[:2])
    for a, b in zip(flat_one, flat_eight, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    assert int(one[2]["count"]) == int(eight[2]["count"]) == 48
    np.testing.assert_allclose(one[2]["loss_sum"], eight[2]["loss_sum"], rtol=1e-5)
    # The steps did change the parameters (the comparison is not between two untouched inits).
    init = training.init_state(
        jax.random.key(0),
        teacher_spec(dataset)[1].model,
        training.make_optimizer(teacher_spec(dataset)[0], 4),
        (32, 32, 3),
    )
    params_one = jax.tree.leaves(one[0])
    assert not all(np.allclose(x, y) for x, y in zip(jax.tree.leaves(init.params), params_one, strict=True))


def test_materialized_conv_backward_trains_as_the_plain_one_on_eight_devices():
    """The conv VJP through a fusion barrier (the default on CPU) gives the plain conv's training, with the
    batch sharded over 8 devices."""
    dataset = synthetic_dataset()
    plain = _train_steps(training.create_mesh(), dataset)
    materialized = _train_steps(training.create_mesh(), dataset, conv_backward="materialized")
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(materialized), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_conv_backward_auto_is_materialized_on_cpu_only():
    import types

    mesh = training.create_mesh()
    assert {d.platform for d in mesh.devices.flat} == {"cpu"}
    assert config_lib.base_config().conv_backward == "auto"
    assert training.resolve_conv_backward("auto", mesh) == "materialized"
    fake_gpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="gpu")] * 2))
    assert training.resolve_conv_backward("auto", fake_gpu) == "xla"
    for setting in ("xla", "materialized", "onednn"):
        on_cpu = training.resolve_conv_backward(setting, mesh)
        assert on_cpu == training.resolve_conv_backward(setting, fake_gpu)
        assert training.resolve_conv_backward(setting, mesh) == setting
    with pytest.raises(UserError, match="conv_backward='lax'"):
        training.resolve_conv_backward("lax", mesh)


def test_conv_backward_reaches_the_trained_models_but_not_the_run_settings(tmp_path, monkeypatch):
    """train_teacher / train_student build their models with the resolved conv_backward; the setting is not in
    run.json, so changing it resumes and reuses runs instead of refusing them."""
    source = data.memory_source(synthetic_dataset(k=2))
    mesh = training.create_mesh()
    specs = []

    class Stop(Exception):
        pass

    def fake_fit(*, spec, **kw):
        specs.append(spec)
        raise Stop

    monkeypatch.setattr(training, "fit", fake_fit)
    config = smoke_config()
    for setting, want in (("auto", "materialized"), ("xla", "xla")):
        config.conv_backward = setting
        with pytest.raises(Stop):
            pipeline.train_teacher(
                config=config, source=source, run_dir=str(tmp_path / setting / "teacher"), mesh=mesh
            )
        assert specs[-1].model.backbone.conv_backward == want
        rng = np.random.default_rng(0)
        t_logits = {
            s: logits_store.ArrayLogits(rng.normal(size=(16 if s != "train" else 64, 2)).astype(np.float32))
            for s in ("train", "val", "test")
        }
        with pytest.raises(Stop):
            pipeline.train_student(
                config=config,
                method_name="KD",
                method_cfg=config.methods.KD,
                seed=0,
                source=source,
                teacher=pipeline.Teacher(None, {"model": "resnet_tiny"}, t_logits, "key"),
                mesh=mesh,
                run_dir=str(tmp_path / setting / "student"),
            )
        assert specs[-1].model.backbone.conv_backward == want
    # Same run settings whatever conv_backward says.
    other = smoke_config()
    other.conv_backward = "xla"
    meta = {"data": "x", "class_names": ["a", "b"], "image_size": 32}
    assert pipeline.teacher_identity(smoke_config(), meta) == pipeline.teacher_identity(other, meta)
    teacher = pipeline.Teacher(None, {"model": "resnet_tiny"}, None, "key")
    same = dict(method_cfg=config.methods.KD, seed=0, source=source, teacher=teacher)
    assert pipeline.student_identity(config=smoke_config(), **same) == (
        pipeline.student_identity(config=other, **same)
    )


def test_student_hint_regressors_follow_the_backbones_conv_backward():
    from debkd_jax import models

    x = jnp.zeros((2, 8, 8, 3))
    for setting in ("xla", "materialized"):
        student = training.Student(
            models.get_model("resnet_tiny", 2, conv_backward=setting),
            taps=(0, 1),
            hint_shapes=((8, 8, 6), (4, 4, 6)),
        )
        variables = jax.jit(lambda x, s=student: s.init(jax.random.key(0), x, train=False))(x)

        def loss(params, student=student, variables=variables):
            (logits, hints), _ = student.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(logits) + sum(jnp.sum(h) for h in hints)

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
        kernels = [
            jax.tree_util.keystr(p)
            for p, _ in jax.tree_util.tree_leaves_with_path(variables["params"])
            if p[-1].key == "kernel" and "conv" in jax.tree_util.keystr(p)
        ]
        assert any("hint_1" in k for k in kernels)
        assert jaxpr.count("cond[") == (len(kernels) if setting == "materialized" else 0)


def _fit(dataset, run_dir, seed, show_progress=False):
    cfg, spec = teacher_spec(dataset)
    mesh = training.create_mesh()
    return training.fit(
        name="teacher",
        spec=spec,
        train_cfg=cfg,
        source=data.memory_source(dataset, augment=spec.augment),
        run_dir=str(run_dir),
        mesh=mesh,
        seed=seed,
        show_progress=show_progress,
    )


def test_fit_is_deterministic_and_the_seed_changes_order_and_init(tmp_path, capsys):
    dataset = synthetic_dataset()
    a = _fit(dataset, tmp_path / "a", seed=0)
    b = _fit(dataset, tmp_path / "b", seed=0, show_progress=True)
    assert a.history == b.history
    for x, y in zip(jax.tree.leaves(a.best_variables), jax.tree.leaves(b.best_variables), strict=True):
        np.testing.assert_array_equal(x, y)
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == (tmp_path / "b" / "metrics.jsonl").read_bytes()
    # Another seed: another data order and another initialisation.
    assert not np.array_equal(
        data.batch_indices(64, 16, seed=0, epoch=0), data.batch_indices(64, 16, seed=1, epoch=0)
    )
    assert not np.array_equal(
        data.batch_indices(64, 16, seed=0, epoch=0), data.batch_indices(64, 16, seed=0, epoch=1)
    )
    cfg, spec = teacher_spec(dataset)
    tx = training.make_optimizer(cfg, 4)
    inits = [training.init_state(jax.random.key(s), spec.model, tx, (32, 32, 3)).params for s in (0, 1)]
    assert not all(
        np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(inits[0]), jax.tree.leaves(inits[1]), strict=True)
    )
    # The progress bar of the second fit: one bar per model, epochs counted, loss and val accuracy shown.
    err = capsys.readouterr().err
    assert "teacher: 100%" in err and "2/2" in err and "val_acc=" in err and "epoch" in err


def test_predict_logits_keeps_order_with_padding_on_eight_devices():
    """37 images in batches of 16 over 8 devices (the last batch padded) give the logits of one unpadded batch
    on one device, in order; every batch has the one shape, so `predict` compiles once per batch size."""
    dataset = synthetic_dataset(n_train=37)
    _, spec = teacher_spec(dataset)
    variables = training.jitted_init(spec.model)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    predict = training.make_predict_fn(spec.model, jnp.float32)
    got = training.predict_logits(predict, variables, dataset.train_images, 16, training.create_mesh())
    assert predict._cache_size() == 1  # 16, 16 and 5 images padded to 16
    want = training.predict_logits(
        predict, variables, dataset.train_images, 64, training.create_mesh(jax.devices()[:1])
    )
    assert got.shape == want.shape == (37, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_tiny_teacher_learns_the_generated_image_folder(shapes_dir, tmp_path):
    """conftest's generated folder is what the CLI, resume and method tests train on: 3 epochs of the tiny
    teacher must take it clearly above chance (50%; 60 test images, one standard error 6.5 points), and its 8%
    mislabeled images must leave it mistakes on the training split (what KI and rectification act on).
    Measured at batch 16, seeds 0, 1, 2: test 91.7, 90.0, 86.7%; val 93.3, 100, 96.7%; train 91.4, 88.1,
    90.0%. The bounds sit one test image (1.7 points), one val image (3.3) and 3 points below the lowest; the
    test runs seed 0."""
    config = config_lib.smoke(config_lib.base_config(("KD",)))
    config.data.source = f"folder:{shapes_dir}"
    config.data.cache_dir = ""
    config.data.max_per_class = 150
    config.teacher.num_epochs = 3
    config.teacher.batch_size = 16
    config.teacher.learning_rate = 0.2
    source = pipeline.load_source(config, "memory")
    assert source.class_names == ("bar", "disc")
    assert tuple(len(source.splits[s]) for s in ("train", "val", "test")) == (210, 30, 60)
    mesh = training.create_mesh()
    logits = pipeline.get_teacher(config=config, source=source, teacher_dir=str(tmp_path), mesh=mesh).logits
    accuracy = {
        split: float(np.mean(np.argmax(logits[split].all(), -1) == source.splits[split].labels))
        for split in ("train", "val", "test")
    }
    print("tiny teacher on the generated folder:", accuracy)
    assert accuracy["test"] >= 0.85 and accuracy["val"] >= 0.9, accuracy
    assert 0.85 <= accuracy["train"] < 1.0, accuracy


def test_metric_writer_writes_jsonl_and_tensorboard_events_without_importing_torch(tmp_path):
    """One line per epoch (a re-run epoch replaces its line and drops later ones), the scalars in
    TensorBoard's event file; in a fresh process tensorboardX does not pull in torch (seconds of every run's
    start) and torch still imports afterwards where installed."""
    script = f"""
import importlib.util, json, sys
from debkd_jax.training.metric_writer import MetricWriter
writer = MetricWriter({str(tmp_path)!r})
for epoch in (1, 2, 3, 2):
    writer.write({{"epoch": epoch, "step": 10 * epoch, "val_accuracy": epoch / 10}}, {{"seconds": 1.5}})
writer.close()
print(json.dumps({{"torch_imported": "torch" in sys.modules}}))
if importlib.util.find_spec("torch") is not None:
    import torch
    assert torch.ones(2).sum().item() == 2.0
"""
    proc = processes.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"torch_imported": False}
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"epoch": 1, "step": 10, "val_accuracy": 0.1},
        {"epoch": 2, "step": 20, "val_accuracy": 0.2},
    ]
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    assert b"val_accuracy" in events.read_bytes() and b"seconds" in events.read_bytes()
