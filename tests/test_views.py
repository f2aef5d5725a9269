"""Views keyed by image and view, and the three places targets come from (`config.targets`): a view is a pure
function of (data seed, image, view); the stored teacher gives the student the online teacher gives, on both
kinds of data; knowledge infusion per view against a float64 reference; top-k rows; a store of other settings
refused; a killed views pass resumed."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_shape_folder

from debkd_jax import config_lib, models, pipeline, training, workdir_lib
from debkd_jax import data as data_lib
from debkd_jax.data import logits_store, stream, views
from debkd_jax.errors import UserError

pytestmark = [pytest.mark.usefixtures("fast_compiles"), pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_shape_folder(tmp_path_factory.mktemp("views") / "shapes", per_class=24, seed=7)


def test_a_view_is_a_pure_function_of_the_seed_the_image_and_the_view():
    rows, v = np.arange(50), np.full(50, 3)
    keys = views.view_keys(0, rows, v)
    np.testing.assert_array_equal(keys, views.view_keys(0, rows, v))
    # One at a time (as a reader process asks) or in any batch: the same key.
    assert all(views.view_keys(0, [r], [3])[0] == keys[r] for r in (0, 17, 49))
    assert len(set(keys.tolist())) == 50
    for other in (views.view_keys(1, rows, v), views.view_keys(0, rows, v + 1)):
        assert not np.any(other == keys)
    offsets, flips = views.crop_params(views.view_keys(0, np.arange(4000), 0), 4)
    assert offsets.min() == 0 and offsets.max() == 8 and 0.45 < flips.mean() < 0.55
    partners, lam = views.mixup_params(keys, 1000, 0.4)
    assert lam.min() >= 0.5 and lam.max() <= 1 and partners.max() < 1000
    assert views.epoch_views(7, 4) == 3


def test_two_processes_draw_the_views_of_one(folder):
    """The memory kind's batches on each of two processes hold the views (crops, flips) one process draws for
    the same rows: a view depends on the image and the epoch, not on the process split."""
    dataset = data_lib.load_dataset(f"folder:{folder}", cache_dir=None, seed=0, progress=False)
    source = data_lib.memory_source(dataset, augment=True, views=2, view_seed=5)
    one = stream.TrainOrder(len(dataset.train_labels), 8, seed=1, num_epochs=3)
    whole = list(data_lib.source.ArrayBatches(source, one))
    parts = [
        list(
            data_lib.source.ArrayBatches(source, stream.TrainOrder(len(dataset.train_labels), 8, 1, 3, p, 2))
        )
        for p in range(2)
    ]
    for b, (p0, p1) in zip(whole, zip(*parts, strict=True), strict=True):
        for key in ("image", "offsets", "flips", "label"):
            np.testing.assert_array_equal(b[key], np.concatenate([p0[key], p1[key]]))


def test_knowledge_infusion_per_view_against_a_float64_reference():
    """Over the views, a view the teacher gets wrong receives its label's mean over the correct views
    (`ki_mode="per_class"`), or zC/zF of the pooled correct views (`"pooled"`)."""
    rng = np.random.default_rng(3)
    n, v, k = 30, 4, 3
    labels = rng.integers(0, k, n)
    z = rng.normal(size=(v * n, k)) * 2
    z[np.arange(0, v * n, 2), np.tile(labels, v)[::2]] += 4  # every other view right
    store = logits_store.ViewLogits(logits_store.ArrayLogits(z.astype(np.float32)), n)
    y = np.tile(labels, v)
    correct = np.argmax(z, -1) == y
    per_class = pipeline.infusion_table(store, labels, "per_class")
    for c in range(k):
        np.testing.assert_allclose(per_class[c], z[correct & (y == c)].mean(0), rtol=1e-5, atol=1e-5)
    pooled = pipeline.infusion_table(store, labels, "pooled")
    zc = np.mean(z[correct, y[correct]])
    zf = np.mean([np.mean(np.delete(row, t)) for row, t in zip(z[correct], y[correct], strict=True)])
    np.testing.assert_allclose(pooled, zf + (zc - zf) * np.eye(k), rtol=1e-5, atol=1e-5)
    # A chunked store of the same views (files) gives the same table.
    chunked = logits_store.ViewLogits(_ArrayChunks(z.astype(np.float32), size=7), n)
    np.testing.assert_allclose(pipeline.infusion_table(chunked, labels, "per_class"), per_class, atol=1e-5)


@dataclasses.dataclass(frozen=True)
class _ArrayChunks(logits_store.ArrayLogits):
    """An in-memory store read back in chunks of `size` rows, as a chunk store on disk is."""

    size: int = 1

    def chunks(self):
        for start in range(0, self.num_rows, self.size):
            rows = np.arange(start, min(start + self.size, self.num_rows))
            yield rows, self.logits[rows]


def test_top_k_rows_keep_the_top_probabilities_and_spread_the_rest():
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(64, 50)) * 3).astype(np.float32)
    rebuilt = logits_store.unpack_topk(logits_store.pack_topk(z, 5), 50, 5)
    p, q = jax.nn.softmax(z), jax.nn.softmax(rebuilt)
    top = np.argsort(-z, -1)[:, :5]
    # The top k exactly up to their float16 rounding (2^-11 of the logit).
    np.testing.assert_allclose(np.take_along_axis(q, top, -1), np.take_along_axis(p, top, -1), rtol=1e-2)
    rest = np.ones_like(z, bool)
    np.put_along_axis(rest, top, False, -1)
    others = np.asarray(q)[rest].reshape(64, 45)
    np.testing.assert_allclose(others, others[:, :1] * np.ones((1, 45)), rtol=1e-5)  # spread evenly
    np.testing.assert_allclose(np.asarray(q).sum(-1), 1, rtol=1e-5)
    # The others' total mass is kept where the top k hold nearly all of it too (1e-5 of the mass and less),
    # where the top k's float16 rounding alone is larger than what they leave.
    peaked = z * 2
    rebuilt = logits_store.unpack_topk(logits_store.pack_topk(peaked, 5), 50, 5)
    rest_mass = [
        np.where(rest, np.asarray(jax.nn.softmax(x.astype(np.float64))), 0).sum(-1) for x in (peaked, rebuilt)
    ]
    assert rest_mass[0].min() < 1e-4
    np.testing.assert_allclose(rest_mass[1], rest_mass[0], rtol=1e-2)


def _config(folder, kind: str, mode: str, workdir, teacher="", mixup=0.0):
    config = config_lib.smoke(config_lib.base_config(("KD", "DeBKD")))
    config.data.source = f"folder:{folder}"
    config.data.cache_dir = ""
    config.data.augment = True
    config.data.views = 2
    config.data.pipeline = {"memory": "memory", "files": "stream"}[kind]
    if kind == "files":
        config.data.workers = 0
    config.teacher.num_epochs = 1
    config.student.batch_size = config.teacher.batch_size = 16
    config.targets = mode
    config.data.mixup = mixup
    config.teacher.checkpoint = teacher
    return config


@pytest.mark.timeout(600)
# The memory kind without mixup is the memory-0.4 path with the partner left out.
@pytest.mark.parametrize("kind, mixup", [("files", 0.0), ("memory", 0.4)])
def test_stored_targets_train_the_student_online_targets_train(folder, tmp_path, kind, mixup):
    """With full float32 rows, the teacher's logits on every view, stored once, give the student that the
    teacher run in every step gives: the same losses and final parameters within 1e-5 (KD, and DeBKD with
    knowledge infusion over the views); with mixup too (the mixed image is part of the view)."""
    stored = tmp_path / "stored"
    pipeline.train_and_evaluate(_config(folder, kind, "stored", stored, mixup=mixup), str(stored))
    online = tmp_path / "online"
    pipeline.train_and_evaluate(
        _config(folder, kind, "online", online, str(stored / "teacher"), mixup=mixup), str(online)
    )
    for name in ("KD", "DeBKD"):
        a = [json.loads(line) for line in (stored / "students" / f"{name}-seed0" / "metrics.jsonl").open()]
        b = [json.loads(line) for line in (online / "students" / f"{name}-seed0" / "metrics.jsonl").open()]
        for x, y in zip(a, b, strict=True):
            assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5), name
            assert x["val_accuracy"] == y["val_accuracy"]
        va = workdir_lib.restore_variables(str(stored / "students" / f"{name}-seed0" / "final"))
        vb = workdir_lib.restore_variables(str(online / "students" / f"{name}-seed0" / "final"))
        jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, atol=1e-5, rtol=1e-5), va, vb)
    results = json.loads((stored / "results.json").read_text())
    assert results["targets"] == {
        "mode": "stored",
        "augment": True,
        "views": 2,
        "mixup": mixup,
        "logits_of_views": True,
    }
    run = json.loads((stored / "students" / "KD-seed0" / "run.json").read_text())
    assert run["targets"] == "stored" and run["views"] == 2


def _teacher_variables(source):
    model = models.get_model("resnet_tiny", source.num_classes)
    return jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(jnp.zeros((1, 32, 32, 3)))


def _files(folder, views_count=2, top_k=100):
    config = _config(folder, "files", "stored", "")
    config.data.views = views_count
    config.data.logits_chunk_rows = 16
    config.teacher.eval_batch_size = 16
    config.targets_top_k = top_k
    return config, pipeline.load_source(config, "files")


def test_a_views_store_of_other_settings_is_refused_naming_the_difference_and_a_killed_pass_resumes(
    folder, tmp_path
):
    config, source = _files(folder)
    variables = _teacher_variables(source)
    mesh = training.create_mesh()
    stem = str(tmp_path / "views")
    kw = dict(variables=variables, model_name="resnet_tiny", stem=stem, mesh=mesh, label="views")
    first, _ = pipeline.view_logits(config=config, source=source, **kw)
    whole = first.all()
    assert whole.shape == (2 * len(source.splits["train"]), 2)
    # A killed pass: one chunk missing; the pass writes only it again.
    chunks = sorted(f for f in os.listdir(stem) if f.endswith(".npy"))
    stamps = {f: os.stat(os.path.join(stem, f)).st_mtime_ns for f in chunks}
    os.remove(os.path.join(stem, chunks[1]))
    again, _ = pipeline.view_logits(config=config, source=source, **kw)
    np.testing.assert_array_equal(again.all(), whole)
    assert all(os.stat(os.path.join(stem, f)).st_mtime_ns == stamps[f] for f in chunks if f != chunks[1])
    # Other views: refused in one line that names the difference, the store untouched.
    other_config, other = _files(folder, views_count=3)
    with pytest.raises(UserError, match=r"settings \(.*views: 2 -> 3") as e:
        pipeline.view_logits(config=other_config, source=other, **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"top_k: 0 -> 1"):
        config.targets_top_k = 1
        pipeline.view_logits(config=config, source=source, **kw)
