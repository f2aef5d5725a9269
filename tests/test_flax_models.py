"""Any Flax module as student or teacher ('package.module:factory'), and image sizes other than 32.

The students are defined here: `small_mlp` (no BatchNorm, logits only) and `small_mobilenet`
(depthwise-separable blocks with BatchNorm, returning (logits, features) for FKD). This file's folder is on
sys.path under pytest, so they are named 'test_flax_models:small_mlp'.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT
from flax import serialization
from test_cli import assert_clean_error, run_main

from debkd_jax import config_lib, data, models, pipeline, training, workdir_lib
from debkd_jax import methods as methods_lib
from debkd_jax.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))


class SmallMLP(nn.Module):
    num_classes: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class SmallMobileNet(nn.Module):
    """Stem conv, two depthwise-separable blocks (depthwise 3x3, pointwise 1x1, BatchNorm, ReLU), dense."""

    num_classes: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train):
        norm = lambda: nn.BatchNorm(use_running_average=not train, dtype=self.dtype)  # noqa: E731
        x = nn.relu(norm()(nn.Conv(8, (3, 3), use_bias=False, dtype=self.dtype)(x)))
        features = []
        for width, stride in ((16, 1), (16, 2)):
            x = nn.Conv(
                x.shape[-1],
                (3, 3),
                (stride, stride),
                feature_group_count=x.shape[-1],
                use_bias=False,
                dtype=self.dtype,
            )(x)
            x = nn.relu(norm()(nn.Conv(width, (1, 1), use_bias=False, dtype=self.dtype)(x)))
            features.append(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x.mean(axis=(1, 2))), tuple(features)


def small_mlp(num_classes, dtype):
    return SmallMLP(num_classes, dtype)


def small_mobilenet(num_classes, dtype):
    return SmallMobileNet(num_classes, dtype)


def wrong_head(num_classes, dtype):
    return SmallMLP(num_classes + 1, dtype)


def not_a_module(num_classes, dtype):
    return "resnet8"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def small_config(cache_dir, methods=("KD",), image_size=16):
    config = config_lib.smoke(config_lib.base_config(methods))
    config.data.cache_dir = cache_dir
    config.data.image_size = image_size
    config.data.max_per_class = 40
    config.student.num_epochs = 1
    config.student.batch_size = 16
    return config


def load(config):
    return pipeline.load_source(config, "memory")


def logits_file(dataset, path) -> str:
    rng = np.random.default_rng(0)
    ids = np.concatenate([dataset.splits[s].ids for s in ("train", "val", "test")])
    labels = np.concatenate([dataset.splits[s].labels for s in ("train", "val", "test")])
    logits = rng.normal(size=(len(ids), dataset.num_classes)).astype(np.float32)
    logits[np.arange(len(ids)), labels] += 3.0
    np.savez(path, ids=ids, logits=logits)
    return str(path)


def test_a_student_defined_here_distils_and_saves_its_own_variables(cache_dir, tmp_path):
    config = small_config(cache_dir)
    config.student.model = "test_flax_models:small_mlp"
    dataset = load(config)
    config.teacher.logits = logits_file(dataset, tmp_path / "t.npz")
    results = pipeline.train_and_evaluate(config, str(tmp_path / "w"))
    assert results["methods"]["KD"]["model"] == "test_flax_models:small_mlp"
    saved = workdir_lib.restore_variables(str(tmp_path / "w" / "students" / "KD-seed0" / "final"))
    # The saved variables are the bare module's: it applies them without the adapter.
    bare = small_mlp(dataset.num_classes, jnp.float32)
    logits = bare.apply(
        {"params": saved["params"]}, data.normalize(dataset.splits["test"].images), train=False
    )
    accuracy = float(np.mean(np.argmax(logits, -1) == dataset.splits["test"].labels))
    assert accuracy == pytest.approx(results["methods"]["KD"]["test"]["accuracy"]["mean"])


def test_fkd_from_a_teacher_given_as_variables_into_a_mobilenet_student(cache_dir, tmp_path):
    config = small_config(cache_dir, methods=("KD", "FKD"))
    config.student.model = "test_flax_models:small_mobilenet"
    dataset = load(config)
    teacher = models.get_model("resnet_tiny", dataset.num_classes)
    variables = teacher.init(jax.random.key(3), jnp.zeros((1, 16, 16, 3)), train=False)
    workdir_lib.save_variables(str(tmp_path / "teacher_vars"), variables)  # orbax
    config.teacher.variables = str(tmp_path / "teacher_vars")
    results = pipeline.train_and_evaluate(config, str(tmp_path / "w"))
    # The teacher row is the given network's: its test accuracy from the given variables.
    predict = training.make_predict_fn(teacher, jnp.float32)
    t_logits = np.asarray(predict(variables, dataset.splits["test"].images)[0])
    expected = float(np.mean(np.argmax(t_logits, -1) == dataset.splits["test"].labels))
    assert results["teacher"]["test"]["accuracy"] == pytest.approx(expected)
    assert set(results["methods"]) == {"KD", "FKD"}
    assert not os.path.exists(tmp_path / "w" / "teacher" / "final")  # nothing trained


def test_fkd_from_a_factory_teacher_given_as_variables(cache_dir, tmp_path):
    """A factory teacher's own (bare module's) variables, as msgpack: its logits are its own, and FKD taps its
    features (the hint regressors map the student's blocks to the teacher's feature shapes)."""
    config = small_config(cache_dir, methods=("FKD",))
    dataset = load(config)
    bare = small_mobilenet(dataset.num_classes, jnp.float32)
    variables = bare.init(jax.random.key(4), jnp.zeros((1, 16, 16, 3)), train=False)
    (tmp_path / "t.msgpack").write_bytes(serialization.to_bytes(variables))
    config.teacher.model = "test_flax_models:small_mobilenet"
    config.teacher.variables = str(tmp_path / "t.msgpack")

    given = pipeline.given_teacher(config, dataset)
    teacher = pipeline.get_teacher(
        config=config,
        source=dataset,
        teacher_dir=str(tmp_path / "t"),
        mesh=training.create_mesh(),
        given=given,
    )
    fkd = config.methods.FKD
    spec = pipeline.student_step_spec(
        config=config,
        method_cfg=fkd,
        objective=methods_lib.objective(fkd, config.student.num_epochs),
        source=dataset,
        teacher=teacher,
        mesh=training.create_mesh(),
    )
    _, features = bare.apply(variables, jnp.zeros((1, 16, 16, 3)), train=False)
    assert spec.model.hint_shapes == tuple(f.shape[1:] for f in features)  # both blocks, (16,16,16) (8,8,16)
    assert isinstance(spec.teacher, models.Adapted) and spec.teacher_taps == (0, 1)

    results = pipeline.train_and_evaluate(config, str(tmp_path / "w"))
    own = bare.apply(variables, data.normalize(dataset.splits["test"].images), train=False)[0]
    expected = float(np.mean(np.argmax(own, -1) == dataset.splits["test"].labels))
    assert results["teacher"]["test"]["accuracy"] == pytest.approx(expected)
    history = results["methods"]["FKD"]["val_accuracy"][0]
    assert len(history) == config.student.num_epochs
    run = workdir_lib.read_json(str(tmp_path / "w" / "students" / "FKD-seed0" / "result.json"))
    assert all(np.isfinite(e["train_loss"]) for e in run["history"])
    assert not os.path.exists(tmp_path / "w" / "teacher" / "final")  # nothing trained


def test_msgpack_variables_round_trip(tmp_path):
    variables = small_mobilenet(3, jnp.float32).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    path = tmp_path / "teacher.msgpack"
    path.write_bytes(serialization.to_bytes(variables))
    from debkd_jax import teachers

    restored = teachers.read_variables(str(path))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "student, methods, needles",
    [
        ("no_such_module_xyz:f", ("KD",), ["student.model 'no_such_module_xyz:f'", "cannot import"]),
        ("test_flax_models:missing", ("KD",), ["has no attribute 'missing'"]),
        ("test_flax_models:not_a_module", ("KD",), ["returned a str, not a flax.linen Module"]),
        ("test_flax_models:wrong_head", ("KD",), ["logits of shape (1, 3)", "must be (1, 2)"]),
        ("test_flax_models:small_mlp", ("KD", "FKD"), ["offers FKD the features none"]),
    ],
)
def test_a_student_that_does_not_fit_is_refused_before_training(cache_dir, student, methods, needles):
    config = small_config(cache_dir, methods=methods)
    config.student.model = student
    with pytest.raises(UserError) as e:
        config_lib.validate_config(config)
        pipeline.check_models(config, load(config), with_teacher=True)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_teacher_variables_of_another_model_are_refused(cache_dir, tmp_path):
    config = small_config(cache_dir)
    dataset = load(config)
    variables = small_mlp(dataset.num_classes, jnp.float32).init(
        jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False
    )
    (tmp_path / "t.msgpack").write_bytes(serialization.to_bytes(variables))
    config.teacher.model, config.teacher.variables = "resnet_tiny", str(tmp_path / "t.msgpack")
    with pytest.raises(UserError, match="do not fit teacher.model='resnet_tiny'"):
        pipeline.teacher_from_variables(config, dataset)
    (tmp_path / "junk").write_bytes(b"\x00not msgpack")
    config.teacher.variables = str(tmp_path / "junk")
    with pytest.raises(UserError, match="not a Flax msgpack file"):
        pipeline.teacher_from_variables(config, dataset)


def test_cli_names_a_module_that_does_not_import(tmp_path):
    proc = run_main(
        [
            f"--config={REPO_ROOT / 'configs' / 'debkd.py'}:smoke",
            f"--workdir={tmp_path}/w",
            "--config.student.model=no_such_module_xyz:net",
        ]
    )
    assert_clean_error(proc, "cannot import 'no_such_module_xyz'")
    assert not os.path.exists(tmp_path / "w" / "config.json")


# ----------------------------------------------------------------------------- image sizes


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("size", [32, 64])
def test_builtin_resnets_take_32_and_64_pixels(name, size):
    model = models.get_model(name, 10)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    (logits, blocks), variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False), x
    )
    assert logits.shape == (2, 10)
    # Same variables at any size (global average pool); the last block is size / total stride wide (the
    # ImageNet stem's conv and max-pool stride 4 more).
    stem_stride = 4 if model.stem == "imagenet" else 1
    assert blocks[-1].shape[1] == size // stem_stride // int(np.prod(model.strides))


def test_a_student_trains_on_64_pixel_images(cache_dir, tmp_path):
    config = small_config(cache_dir, image_size=64)
    dataset = load(config)
    assert dataset.splits["train"].images.shape[1:] == (64, 64, 3)
    config.teacher.logits = logits_file(dataset, tmp_path / "t.npz")
    results = pipeline.train_and_evaluate(config, str(tmp_path / "w"))
    saved = workdir_lib.read_json(str(tmp_path / "w" / "students" / "KD-seed0" / "model.json"))
    assert saved["image_size"] == 64
    # Deterministic (seed 0, CPU). Measured 0.5 for seeds 0, 1 and 2: one epoch on 28 images per class leaves
    # the student predicting one class, 8 of the 16 test images.
    assert len(dataset.splits["test"].labels) == 16
    assert results["methods"]["KD"]["test"]["accuracy"]["mean"] == 0.5
