"""Deployable students: `debkd_jax.export` (jax.export, BatchNorm folded, uint8 in) and the `predict` CLI."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debkd_jax import data as data_lib
from debkd_jax import export, models, predict, processes, training, workdir_lib
from debkd_jax.errors import UserError

CLASS_NAMES = ["cat", "dog"]


def _student_run(run_dir, name="resnet_tiny", seed=0):
    """A trained-looking student in the workdir layout: `final/` (orbax) + `model.json`.

    The variables are `init`'s, perturbed so BatchNorm statistics, scales and biases are far from the identity
    (folding them must matter).
    """
    model = models.get_model(name, 2)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    noisy = lambda a: np.asarray(a) + 0.3 * rng.standard_normal(a.shape).astype(np.float32)
    variables = {
        "params": jax.tree.map(noisy, variables["params"]),
        "batch_stats": jax.tree.map(
            lambda a: np.abs(noisy(a)) + 0.2 if a.ndim else np.asarray(a), variables["batch_stats"]
        ),
    }
    workdir_lib.save_variables(os.path.join(run_dir, "final"), variables)
    workdir_lib.write_json(
        os.path.join(run_dir, "model.json"),
        {"model": name, "num_classes": 2, "class_names": CLASS_NAMES, "image_size": 32, "dtype": "float32"},
    )
    return model, variables


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run_dir = str(root / "students" / "DeBKD-seed0")
    model, variables = _student_run(run_dir)
    out = str(root / "student.jax")
    sidecar = export.export_run(run_dir, out)
    return {"model": model, "variables": variables, "path": out, "sidecar": sidecar, "run": run_dir}


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("batch", [1, 7])
def test_exported_outputs_equal_the_in_process_model(exported, batch):
    deployed = predict.load(exported["path"])
    images = _images(batch, seed=batch)
    logits, probs = deployed(images)
    predict_fn = training.make_predict_fn(exported["model"], jnp.float32)
    want, _ = predict_fn(exported["variables"], jnp.asarray(images))
    assert logits.shape == probs.shape == (batch, 2)
    np.testing.assert_allclose(logits, np.asarray(want), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(probs, np.asarray(jax.nn.softmax(want)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["test_flax_models:small_mobilenet", "test_flax_models:small_mlp"])
def test_a_student_built_from_a_factory_module_exports(name, tmp_path):
    """A factory student (models/external.py): the export computes what the bare module computes from its
    own variables. The MobileNet's three BatchNorms (after its stem and pointwise convs) are folded; the MLP
    has none (only `Adapted`'s placeholder statistic)."""
    import test_flax_models

    run_dir = str(tmp_path / "students" / "KD-seed0")
    _, variables = _student_run(run_dir, name=name)
    out = str(tmp_path / "student.jax")
    sidecar = export.export_run(run_dir, out)
    assert sidecar["model"] == name
    images = _images(5)
    bare = getattr(test_flax_models, name.partition(":")[2])(2, jnp.float32)
    own = {k: v for k, v in variables.items() if k != "batch_stats" or models.external.PLACEHOLDER not in v}
    want = bare.apply(own, data_lib.normalize(jnp.asarray(images)), train=False)
    want = want[0] if isinstance(want, tuple) else want
    np.testing.assert_allclose(predict.load(out)(images)[0], np.asarray(want), rtol=1e-4, atol=1e-4)
    model = models.get_model(name, 2)
    _, shifts = export.fold_batchnorm(model, variables, (32, 32, 3))
    assert len(shifts) == (3 if name.endswith("small_mobilenet") else 0)


def test_batchnorm_is_folded_into_every_conv(exported):
    model, variables = exported["model"], exported["variables"]
    folded, shifts = export.fold_batchnorm(model, variables, (32, 32, 3))
    bn_paths = {path[:-1] for path, _ in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]}
    bn_paths = {tuple(k.key for k in p) for p in bn_paths}
    assert set(shifts) == bn_paths  # every BatchNorm of the ResNet follows a conv
    assert jax.tree.leaves(folded["batch_stats"]) == []
    # The sidecar says so, and the exported file has a symbolic batch dimension.
    assert exported["sidecar"]["batchnorm"].startswith("folded")
    deployed = predict.load(exported["path"])
    assert str(deployed.exported.in_avals[0].shape[0]) == "batch"


def test_unfolded_export_matches_too(exported, tmp_path):
    out = str(tmp_path / "unfolded.jax")
    export.export_run(exported["run"], out, fold=False)
    deployed = predict.load(out)
    images = _images(3)
    np.testing.assert_allclose(
        deployed(images)[0], predict.load(exported["path"])(images)[0], rtol=1e-4, atol=1e-4
    )


def test_sidecar_holds_class_names_and_image_size(exported):
    with open(export.sidecar_path(exported["path"]), encoding="utf-8") as f:
        sidecar = json.load(f)
    assert sidecar["class_names"] == CLASS_NAMES
    assert sidecar["image_size"] == 32
    assert sidecar["input"]["dtype"] == "uint8"
    assert sidecar["outputs"] == ["logits", "probabilities"]
    assert sidecar["parameters"] == models.count_params(exported["variables"]["params"])


def _run_cli(module, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    return processes.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_export_and_predict_cli_on_real_images(exported, dogs_vs_cats_dir, tmp_path):
    out = str(tmp_path / "cli.jax")
    done = _run_cli("debkd_jax.export", f"--run={exported['run']}", f"--out={out}")
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and os.path.exists(out) and os.path.exists(out + ".json")

    cats = sorted((dogs_vs_cats_dir / "cat").iterdir())[:2]
    dogs = sorted((dogs_vs_cats_dir / "dog").iterdir())[:1]
    paths = [str(p) for p in cats + dogs]
    done = _run_cli("debkd_jax.predict", f"--model={out}", *paths)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split("\t") == ["image", "label", "p(label)", "p(cat)", "p(dog)"]
    assert len(lines) == 1 + len(paths)
    deployed = predict.load(out)
    _, images, _ = predict.read_images(paths, deployed.preprocessing)
    want = deployed.probabilities(images)
    for line, path, p in zip(lines[1:], paths, want, strict=True):
        image, label, p_label, p_cat, p_dog = line.split("\t")
        assert image == path
        assert label == CLASS_NAMES[int(np.argmax(p))]
        assert float(p_label) == pytest.approx(float(np.max(p)), abs=1e-4)
        assert float(p_cat) + float(p_dog) == pytest.approx(1.0, abs=2e-4)
        assert float(p_cat) == pytest.approx(float(p[0]), abs=1e-4)

    done = _run_cli("debkd_jax.predict", f"--model={out}", "--json", paths[0])
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert set(row) == {"image", "label", "probability", "probabilities"}
    assert set(row["probabilities"]) == set(CLASS_NAMES)


def test_predict_resizes_like_the_data_pipeline_the_run_used(exported, tmp_path):
    """The sidecar carries the run's preprocessing ("squash" for a memory-kind run); a "resize_crop" one (a
    run on image files) is applied as the files kind evaluates."""
    from PIL import Image

    big = tmp_path / "big.png"
    Image.fromarray(_images(1)[0]).resize((97, 61)).save(big)
    deployed = predict.load(exported["path"])
    ok, images, failed = predict.read_images([str(big)], deployed.preprocessing)
    assert ok == [str(big)] and not failed and images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
    from debkd_jax import data

    assert deployed.preprocessing["resize"] == "squash"
    np.testing.assert_array_equal(images[0], data.decode_file(str(big), 32)[0])
    assert deployed.probabilities(images).shape == (1, 2)
    crop = {"resize": "resize_crop", "crop": 0.875, "image_size": 32}
    _, cropped, _ = predict.read_images([str(big)], crop)
    want = data.stream.eval_transform(data.sources.open_rgb(str(big), 37), 32, 0.875)
    np.testing.assert_array_equal(cropped[0], want)
    assert not np.array_equal(cropped[0], images[0])


def test_unreadable_image_is_reported_and_others_still_predicted(exported, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    good = tmp_path / "good.png"
    from PIL import Image

    Image.fromarray(_images(1)[0]).save(good)
    code = predict.main([f"--model={exported['path']}", str(good), str(bad), str(tmp_path / "missing.png")])
    out, err = capsys.readouterr()
    assert code == 1
    assert len(out.strip().splitlines()) == 2  # header + the good image
    assert f"cannot read image {bad}" in err
    assert "missing.png" in err


def test_bad_model_file_is_a_clear_error(exported, tmp_path, capsys):
    junk = tmp_path / "junk.jax"
    junk.write_bytes(b"\x00garbage" * 10)
    with open(export.sidecar_path(exported["path"]), encoding="utf-8") as f:
        (tmp_path / "junk.jax.json").write_text(f.read())
    with pytest.raises(UserError, match="not a model written by"):
        predict.load(str(junk))
    with pytest.raises(SystemExit) as exit_:
        predict.main([f"--model={junk}", "x.png"])
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err

    lonely = tmp_path / "lonely.jax"
    lonely.write_bytes(open(exported["path"], "rb").read())
    with pytest.raises(UserError, match="sidecar.*missing|missing.*sidecar|is missing"):
        predict.load(str(lonely))
    with pytest.raises(UserError, match="does not exist"):
        predict.load(str(tmp_path / "nowhere.jax"))


def test_export_of_a_folder_without_a_student_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export.main([f"--run={tmp_path}", f"--out={tmp_path / 'x.jax'}"])
    assert exit_.value.code == 2
    assert "no trained student" in capsys.readouterr().err


def test_export_for_several_platforms(exported, tmp_path):
    out = str(tmp_path / "multi.jax")
    sidecar = export.export_run(exported["run"], out, platforms=("cpu", "cuda"))
    assert sidecar["platforms"] == ["cpu", "cuda"]
    deployed = predict.load(out)
    assert deployed.probabilities(_images(2)).shape == (2, 2)
