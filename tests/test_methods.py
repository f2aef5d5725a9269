"""Tests of the method matrix (`debkd_jax.methods`, configs/*.py): every preset against SPEC sections 1-3 and
6, its schedules, each method training a student on real photos, online targets, and k-class DeBKD end to end
(10-class digits and `tfds:cifar10`).

The training tests share one teacher (a module fixture trained once on a small slice of Dogs vs Cats) and one
tiny model shape, so most of their time is the compilation of each method's train step.
"""

import math
import pathlib
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from debkd_jax import config_lib, losses, methods, metrics, models, pipeline, report, sweep, training
from debkd_jax import data as data_lib
from debkd_jax import targets as targets_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"

# Jitted references: one compile each instead of op-by-op dispatch.
_kd = jax.jit(losses.kd_loss)
_debkd = jax.jit(losses.debkd_loss)
_btkd = jax.jit(losses.btkd_loss, static_argnames="rectify")
_dkd = jax.jit(losses.dkd_loss)
_ce = jax.jit(losses.cross_entropy)
_kl = jax.jit(losses.soft_kl)
_proj = jax.jit(losses.box_projection)

# The brief's method table (configs/methods.py adds CE, the student alone).
TABLE = (
    "KD",
    "KD+KI",
    "FKD",
    "FKD+KI",
    "DeBKD",
    "DeBKD-noKI",
    "BTKD-swap",
    "BTKD-released",
    "DeBKD+BTKD",
    "DeBKD-cos2",
    "DKD",
)


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    """Unoptimised XLA: these tests run a few steps of tiny models, where compile time is all that counts."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def _tiny(config, max_per_class=32):
    """Tiny models, a small data slice, batch 16 (2 devices' worth of 8), no cache, no bars."""
    config = config_lib.smoke(config)
    config.data.cache_dir = ""
    config.data.max_per_class = max_per_class
    config.teacher.num_epochs = 1
    config.student.num_epochs = 2
    config.teacher.batch_size = config.student.batch_size = 16
    return config


# ----------------------------------------------------------------------------------------------------------
# Presets and validation (no training)
# ----------------------------------------------------------------------------------------------------------


def test_every_method_of_the_table_is_a_preset_and_validates():
    for name in (*TABLE, "CE"):
        cfg = methods.preset(name)
        methods.validate(name, cfg)
        assert set(cfg.keys()) == set(methods.DEFAULTS)
    config = config_lib.load_config_file(str(CONFIGS / "methods.py")).get_config()
    assert [name for name, _ in methods.ordered(config.methods)] == ["CE", *TABLE]


def test_presets_match_the_spec():
    p = {name: methods.preset(name) for name in methods.PRESETS}
    ki = ("knowledge_infusion",)
    # KD (SPEC 2): alpha 0.9, T 4; KI is a switch.
    for name, transforms in (("KD", ()), ("KD+KI", ki)):
        assert (p[name].loss, p[name].alpha, p[name].temperature, p[name].hint_weight) == (
            "kd",
            0.9,
            4.0,
            0.0,
        )
        assert tuple(p[name].transforms) == transforms and p[name].weight_schedule == "constant"
    # FKD: KD plus hints, the teacher online; KI a switch.
    for name, transforms in (("FKD", ()), ("FKD+KI", ki)):
        assert p[name].loss == "kd" and p[name].hint_weight > 0 and tuple(p[name].transforms) == transforms
        obj = methods.objective(p[name], 10)
        assert obj.uses_hints and obj.needs_teacher_online
    # DeBKD (SPEC 1.3): KI, n = 12, beta 0.2, T 4, T^2 on; the ablation drops KI.
    for name, transforms in (("DeBKD", ki), ("DeBKD-noKI", ())):
        c = p[name]
        assert (c.loss, c.num_regions, c.beta, c.temperature, c.scale_by_t2) == ("debkd", 12, 0.2, 4.0, True)
        assert tuple(c.transforms) == transforms and c.ki_mode == "pooled"
        assert not methods.objective(c, 10).needs_teacher_online
    # BTKD (SPEC 3): rectified hard part, lam 0.5, T 4, b(e) = cos^2.
    for name, mode in (("BTKD-swap", "swap"), ("BTKD-released", "released")):
        c = p[name]
        assert (c.loss, c.rectify_mode, c.lam, c.temperature, c.weight_schedule) == (
            "btkd",
            mode,
            0.5,
            4.0,
            "cos2",
        )
        assert tuple(c.transforms) == ("rectify",)
    # The combinations: DeBKD regions on BTKD-rectified logits instead of KI; the cos^2 schedule on beta.
    assert p["DeBKD+BTKD"].loss == "debkd" and tuple(p["DeBKD+BTKD"].transforms) == ("rectify",)
    assert p["DeBKD-cos2"].loss == "debkd" and p["DeBKD-cos2"].weight_schedule == "cos2"
    assert tuple(p["DeBKD-cos2"].transforms) == ki
    # DKD: alpha 1, beta 8, T 4, 20 warm-up epochs, raw teacher logits.
    c = p["DKD"]
    assert (c.loss, c.alpha, c.beta, c.temperature, c.warmup_epochs) == ("dkd", 1.0, 8.0, 4.0, 20)
    assert tuple(c.transforms) == ()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(loss="kl"), "loss='kl' is not one of"),
        (dict(transforms=("rectify", "rectify")), "names a transform twice"),
        (dict(transforms=("mixup",)), "has 'mixup'"),
        (dict(online_targets=1), "online_targets=1 must be True or False"),
        (dict(temperature="4"), "temperature='4' must be a number"),
        (dict(num_regions=2.5), "num_regions=2.5 must be an integer"),
        (dict(alpha=1.5), "alpha=1.5 must lie in"),
        (dict(weight_schedule="linear"), "weight_schedule='linear'"),
    ],
)
def test_validate_names_the_method_and_the_field(overrides, message):
    cfg = methods.method(**{**methods.PRESETS["DeBKD"], **overrides})
    with pytest.raises(ValueError, match="method 'mine': .*" + re.escape(message)):
        methods.validate("mine", cfg)
    with pytest.raises(ValueError, match=r"unknown method field\(s\) \[.n_regions.\]"):
        methods.preset("DeBKD", n_regions=3)


# ----------------------------------------------------------------------------------------------------------
# The objective: formulas and schedules
# ----------------------------------------------------------------------------------------------------------


def _batch(k=3, b=12, seed=0, all_correct=None):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(b, k)).astype(np.float32) * 3
    s = rng.normal(size=(b, k)).astype(np.float32)
    y = rng.integers(0, k, size=b).astype(np.int32)
    if all_correct is not None:
        pred = np.argmax(z, -1)
        y = pred if all_correct else (pred + 1) % k
    return jnp.asarray(s), jnp.asarray(z), jnp.asarray(y, jnp.int32)


def test_objective_formulas_and_schedules():
    s, z, y = _batch()
    E = 10
    cos2 = lambda e: math.cos(math.pi / 2 * e / E) ** 2
    for name in ("KD", "DeBKD", "DeBKD-cos2", "BTKD-swap", "DKD"):
        cfg = methods.preset(name)
        rows = methods.build_targets(cfg, z, y)
        loss_fn = jax.jit(methods.objective(cfg, E).loss_fn)
        for epoch in (0.0, 3.5, 9.99):
            e = math.floor(epoch)  # schedules act on the integer epoch
            got = float(loss_fn(s, y, rows, 0.0, jnp.float32(epoch)))
            if name == "KD":
                want = _kd(s, rows.logits, y, alpha=0.9, temperature=4.0)
            elif name == "DeBKD":
                want = _debkd(s, y, rows.lo, rows.hi, beta=0.2, temperature=4.0)
            elif name == "DeBKD-cos2":
                want = _debkd(s, y, rows.lo, rows.hi, beta=0.2 * cos2(e), temperature=4.0)
            elif name == "BTKD-swap":
                want = _btkd(s, z, y, easy_weight=cos2(e), lam=0.5, temperature=4.0, rectify="swap")
            else:  # mdistiller's min(epoch / 20, 1) with epochs counted from 1
                want = _dkd(s, z, y, alpha=1.0, beta=8.0, temperature=4.0, warmup=min((e + 1) / 20, 1))
            np.testing.assert_allclose(got, float(want), rtol=1e-5, err_msg=f"{name} at epoch {epoch}")
    # BTKD without the schedule splits easy/hard at b = 1/2; cos2 on KD multiplies alpha.
    cfg = methods.preset("BTKD-swap", weight_schedule="constant")
    got = methods.objective(cfg, E).loss_fn(s, y, methods.build_targets(cfg, z, y), 0.0, 4.0)
    np.testing.assert_allclose(got, _btkd(s, z, y, easy_weight=0.5, rectify="swap"), rtol=1e-5)
    cfg = methods.preset("KD", weight_schedule="cos2")
    got = methods.objective(cfg, E).loss_fn(s, y, methods.build_targets(cfg, z, y), 0.0, 4.0)
    np.testing.assert_allclose(got, _kd(s, z, y, alpha=0.9 * cos2(4)), rtol=1e-5)
    # Hints add gamma * hint loss.
    cfg = methods.preset("FKD")
    rows = methods.build_targets(cfg, z, y)
    obj = methods.objective(cfg, E)
    np.testing.assert_allclose(
        obj.loss_fn(s, y, rows, 2.0, 0.0), _kd(s, z, y) + cfg.hint_weight * 2.0, rtol=1e-5
    )


@pytest.mark.parametrize("all_correct", [True, False])
@pytest.mark.parametrize("name", ["BTKD-swap", "BTKD-released"])
def test_btkd_on_a_batch_with_one_empty_subset_is_finite(name, all_correct):
    s, z, y = _batch(k=2, b=16, seed=3, all_correct=all_correct)
    cfg = methods.preset(name)
    rows = methods.build_targets(cfg, z, y)
    assert bool(jnp.all(rows.correct)) == all_correct and not bool(jnp.any(rows.correct)) == (not all_correct)
    obj = methods.objective(cfg, 10)
    for epoch in (0.0, 5.0):
        loss, grad = jax.jit(jax.value_and_grad(obj.loss_fn))(s, y, rows, 0.0, epoch)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
        b = math.cos(math.pi / 2 * epoch / 10) ** 2
        ce = float(jnp.mean(_ce(s, y)))
        if all_correct:  # the hard part is empty: lam * CE + (1 - lam) * b * L_easy
            easy = 16.0 * float(jnp.mean(_kl(z, s)))
            np.testing.assert_allclose(float(loss), 0.5 * ce + 0.5 * b * easy, rtol=1e-5)
        else:  # the easy part is empty: lam * CE + (1 - lam) * (1 - b) * L_hard on the rectified logits
            hard = 16.0 * float(jnp.mean(_kl(rows.logits, s)))
            np.testing.assert_allclose(float(loss), 0.5 * ce + 0.5 * (1 - b) * hard, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# k classes
# ----------------------------------------------------------------------------------------------------------


def test_k_class_path_equals_the_binary_path_for_k_2():
    """The general box projection (tau root-finding), run on k = 2 data, equals the binary clip and its closed
    form: the k = 2 problem is embedded as k = 3 with a third class pinned to p = 0 in the region [0, 0]."""
    rng = np.random.default_rng(7)
    b, T, n, beta = 256, 4.0, 12, 0.2
    z = rng.normal(size=(b, 2)).astype(np.float32) * 4
    s = rng.normal(size=(b, 2)).astype(np.float32) * 4
    y = rng.integers(0, 2, size=b).astype(np.int32)
    lo, hi = (np.asarray(a) for a in jax.jit(targets_lib.debiased_regions)(z, T, n))
    # Closed form (SPEC 1.3): t_0 = clip(p_0, max(lo_0, 1 - hi_1), min(hi_0, 1 - lo_1)).
    p = np.asarray(jax.nn.softmax(s / T), np.float64)
    t0 = np.clip(p[:, 0], np.maximum(lo[:, 0], 1 - hi[:, 1]), np.minimum(hi[:, 0], 1 - lo[:, 1]))
    t = np.stack([t0, 1 - t0], -1)
    kl = np.sum(np.where(t > 0, t * (np.log(np.maximum(t, 1e-30)) - np.log(p)), 0.0), -1)
    ce = -np.log(np.asarray(jax.nn.softmax(s), np.float64)[np.arange(b), y])
    closed = np.mean(beta * T**2 * kl + ce)
    assert np.mean(kl > 1e-6) > 0.3, "the batch must have samples outside their regions"

    pad = lambda a, v: np.concatenate([a, np.full((b, 1), v, np.float32)], -1)
    s3, lo3, hi3 = pad(s, -1e4), pad(lo, 0.0), pad(hi, 0.0)
    p3 = jax.nn.softmax(s3 / T)
    assert float(jnp.max(p3[:, 2])) == 0.0
    t2 = np.asarray(_proj(jax.nn.softmax(s / T), lo, hi))
    t3 = np.asarray(_proj(p3, lo3, hi3))
    np.testing.assert_allclose(t3[:, :2], t2, atol=2e-6)
    np.testing.assert_allclose(t2, t, atol=2e-6)
    assert np.all(t3[:, 2] == 0)

    loss_and_grad = jax.jit(jax.value_and_grad(losses.debkd_loss))
    loss2, g2 = loss_and_grad(s, y, lo, hi, beta=beta, temperature=T)
    loss3, g3 = loss_and_grad(s3, y, lo3, hi3, beta=beta, temperature=T)
    np.testing.assert_allclose(float(loss2), closed, rtol=1e-5)
    np.testing.assert_allclose(float(loss3), float(loss2), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g3)[:, :2], np.asarray(g2), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Training on real photos: one teacher, every method
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dogs(dogs_vs_cats_dir, tmp_path_factory):
    """A teacher trained once (1 epoch of resnet_tiny) on 32 Dogs vs Cats photos per class, and its logits."""
    config = _tiny(config_lib.base_config(("DeBKD",)))
    config.data.source = f"folder:{dogs_vs_cats_dir}"
    dataset = pipeline.load_data(config)
    mesh = training.create_mesh()
    teacher_dir = str(tmp_path_factory.mktemp("teacher"))
    teacher = pipeline.train_teacher(config, dataset, teacher_dir, mesh)
    logits = pipeline.teacher_logits(config, *teacher, dataset, teacher_dir, mesh)
    correct = np.argmax(logits["train"], -1) == dataset.train_labels
    # Both of BTKD's subsets and KI's replaced rows are exercised.
    assert 0 < correct.mean() < 1
    return types.SimpleNamespace(
        config=config,
        dataset=dataset,
        mesh=mesh,
        teacher=teacher,
        logits=logits,
        root=tmp_path_factory.mktemp("students"),
    )


@pytest.mark.parametrize("name", TABLE)
def test_each_method_trains_a_student_on_real_photos(dogs, name):
    result = pipeline.train_student(
        dogs.config,
        name,
        methods.preset(name),
        0,
        dogs.dataset,
        dogs.teacher,
        dogs.logits,
        dogs.mesh,
        str(dogs.root / name),
    )
    history = [e["train_loss"] for e in result["history"]]
    assert len(history) == 2 and all(np.isfinite(history))
    assert history[1] < history[0], f"{name}: the training loss did not fall: {history}"
    test = result["test"]
    assert set(report.TABLE_METRICS) <= set(test)
    assert all(0.0 <= test[m] <= 1.0 for m in report.TABLE_METRICS)


@pytest.fixture(scope="module")
def one_step(dogs):
    """`run(cfg, rows, augment=False) -> (params after one step, the batch's loss)`: one train step from one
    fixed initial state on one fixed batch (16 photos). Steps are compiled once per (method, augment)."""
    k = dogs.dataset.num_classes
    teacher_vars, meta = dogs.teacher
    replicated = NamedSharding(dogs.mesh, P())
    batch_sharding = NamedSharding(dogs.mesh, P("data"))
    tx = training.make_optimizer(dogs.config.student, 2)
    student = training.Student(models.get_model("resnet_tiny", k))
    initial = jax.device_get(
        training.init_state(jax.random.key(0), student, tx, dogs.dataset.train_images.shape[1:])
    )
    idx = np.arange(16)
    images = {"image": dogs.dataset.train_images[idx], "label": dogs.dataset.train_labels[idx]}
    teacher_vars = jax.device_put(teacher_vars, replicated)
    steps = {}

    def run(cfg, rows, augment=False):
        objective = methods.objective(cfg, dogs.config.student.num_epochs)
        key = (cfg.to_json(), augment)
        if key not in steps:
            spec = training.StepSpec(
                model=student,
                objective=objective,
                steps_per_epoch=2,
                augment=augment,
                dtype=jnp.float32,
                teacher=models.get_model(meta["model"], k) if objective.needs_teacher_online else None,
                method_cfg=cfg,
            )
            steps[key] = training.make_train_step(spec, dogs.mesh, seed=0)
        batch = data_lib.make_global_batch(images, batch_sharding)
        batch["rows"] = jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(batch_sharding, np.asarray(a)[idx]), rows
        )
        infusion = None
        if "knowledge_infusion" in objective.transforms:
            table = targets_lib.infusion_table(dogs.logits["train"], dogs.dataset.train_labels, cfg.ki_mode)
            infusion = jax.device_put(table, replicated)
        state = jax.device_put(jax.tree.map(np.array, initial), replicated)  # the step donates it
        acc = jax.device_put(training.zero_metrics(), replicated)
        state, acc = steps[key](state, acc, batch, teacher_vars, infusion)
        params = jax.tree.map(np.asarray, jax.device_get(state.params))
        return params, float(acc["loss_sum"]) / float(acc["count"])

    return run


@pytest.mark.parametrize("name", ["DeBKD", "BTKD-swap"])
def test_online_targets_without_augmentation_equal_the_precomputed_rows(dogs, one_step, name):
    """With online targets the teacher runs inside the jitted step and the same pure transforms build the
    batch's rows (KI's table from the precompute pass). Without augmentation one step from the same state must
    equal the step on the precomputed rows: same loss, same updated parameters. The online step is fed
    meaningless rows, so it cannot pass by reading them."""
    offline = methods.preset(name)
    online = methods.preset(name, online_targets=True)
    labels = dogs.dataset.train_labels
    rows = methods.build_targets(offline, dogs.logits["train"], labels)
    n, k = rows.logits.shape
    junk = targets_lib.Targets(
        logits=np.zeros((n, k), np.float32),
        lo=np.zeros((n, k), np.float32),
        hi=np.ones((n, k), np.float32),
        correct=np.ones((n,), bool),
    )
    # The batch holds teacher-correct and teacher-wrong samples.
    assert 0 < np.mean(np.asarray(rows.correct)[:16]) < 1
    params_off, loss_off = one_step(offline, rows)
    params_on, loss_on = one_step(online, junk)
    np.testing.assert_allclose(loss_on, loss_off, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_on, params_off)
    _, loss_junk = one_step(offline, junk)  # the same compiled step: the rows do matter
    assert abs(loss_junk - loss_off) > 1e-3
    if name == "DeBKD":
        # With augmentation the teacher sees the augmented batch: targets (and the loss) differ, stay finite.
        _, loss_aug = one_step(online, junk, augment=True)
        assert np.isfinite(loss_aug) and abs(loss_aug - loss_off) > 1e-6


# ----------------------------------------------------------------------------------------------------------
# k-class DeBKD end to end; the configs
# ----------------------------------------------------------------------------------------------------------


def _multiclass_config(arg):
    config = config_lib.load_config_file(str(CONFIGS / "multiclass.py")).get_config(arg)
    config = _tiny(config, max_per_class=10)
    config.methods = {"DeBKD": methods.preset("DeBKD")}
    config.student.num_epochs = 1
    return config


def _check_k_class_results(results, k):
    assert len(results["dataset"]["class_names"]) == k
    test = results["methods"]["DeBKD"]["test"]
    for m in report.TABLE_METRICS:
        assert 0.0 <= test[m]["mean"] <= 1.0
    assert np.isfinite(results["methods"]["DeBKD"]["val_accuracy"][0]).all()


def test_k_class_debkd_end_to_end_on_ten_class_digits(tmp_path):
    config = _multiclass_config("smoke")
    assert config.data.source == "digits" and config.data.digits_classes == 10
    results = pipeline.train_and_evaluate(config, str(tmp_path))
    _check_k_class_results(results, 10)
    run = tmp_path / "students" / "DeBKD-seed0" / "result.json"
    assert run.exists()


def test_tfds_cifar10_config_reads_ten_classes_with_mock_data():
    """configs/multiclass.py:cifar10 reads `tfds:cifar10` through the run's own loader (TFDS's mock data: no
    download); the k-class training path it then takes is the one the digits test above runs end to end."""
    tfds = pytest.importorskip("tensorflow_datasets")
    config = _multiclass_config("cifar10,smoke")
    assert config.data.source == "tfds:cifar10"
    config_lib.validate_config(config)
    with tfds.testing.mock_data(num_examples=100):
        dataset = pipeline.load_data(config)
    assert dataset.source == "tfds:cifar10" and dataset.num_classes == 10
    assert dataset.train_images.shape[1:] == (32, 32, 3) and dataset.train_images.dtype == np.uint8
    assert len(dataset.train_labels) >= config.student.batch_size
    # The method's targets for 10 classes: regions that hold the teacher's soft labels.
    rng = np.random.default_rng(0)
    z = rng.normal(size=(len(dataset.train_labels), 10)).astype(np.float32) * 3
    rows = methods.build_targets(methods.preset("DeBKD"), z, dataset.train_labels)
    q = np.asarray(jax.nn.softmax(rows.logits / 4.0))
    assert rows.lo.shape == (len(z), 10) and np.all((rows.lo <= q + 1e-6) & (q <= rows.hi + 1e-6))
    assert np.all(np.argmax(np.asarray(rows.logits), -1) == dataset.train_labels)  # after KI


@pytest.mark.parametrize(
    "path, arg",
    [
        ("methods.py", None),
        ("methods.py", "dogs_vs_cats,smoke"),
        ("multiclass.py", None),
        ("multiclass.py", "cifar100"),
        ("paper.py", "dogs_vs_cats"),
        ("paper.py", "car_bike,resnet8"),
        ("paper.py", "chihuahua_muffin,resnet18,smoke"),
        ("sweep_regions.py", "dogs_vs_cats,resnet8"),
        ("sweep_beta.py", "digits,resnet8,smoke"),
    ],
)
def test_configs_load_and_validate(path, arg):
    config = config_lib.load_config_file(str(CONFIGS / path)).get_config(arg)
    config_lib.validate_config(config)
    for name, cfg in config.methods.items():
        methods.validate(name, cfg)
    smoke = "smoke" in (arg or "")
    if path == "paper.py":
        assert config.seeds == (2 if smoke else 3) and not config.data.augment
        assert config.data.source.startswith("folder:")
        if not smoke:
            assert config.teacher.model == "resnet50"
            assert config.student.model == ("resnet8" if "resnet8" in arg else "resnet18")
        assert sorted(config.methods) == sorted(["KD", "KD+KI", "FKD", "FKD+KI", "DeBKD", "DeBKD-noKI"])
    if path.startswith("sweep_"):
        points = sweep.sweep_points(config)
        want = [8, 10, 12, 14, 16] if "regions" in path else [0.1, 0.2, 0.3, 0.4, 0.5]
        assert [list(p.values.values())[0] for p in points] == want


def test_paper_config_defaults_and_bad_arguments():
    paper = config_lib.load_config_file(str(CONFIGS / "paper.py"))
    config = paper.get_config("dogs_vs_cats,resnet8")
    assert config.data.source == "folder:../shared/data/dogs_vs_cats_32"
    assert (config.teacher.model, config.student.model, config.seeds) == ("resnet50", "resnet8", 3)
    with pytest.raises(ValueError, match="unknown config argument 'cifar'"):
        paper.get_config("cifar,resnet8")
