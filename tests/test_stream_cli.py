"""The streamed job through the real CLI (configs/imagenet.py:smoke on a generated folder, KD only): two
processes (jax.distributed over Gloo) train like one process with two devices; a SIGKILL and a restart give
the results of an uninterrupted run; bad input is one line."""

from __future__ import annotations

import json
import pathlib
import textwrap

import numpy as np
import pytest
from conftest import write_shape_folder
from test_cli import (
    assert_clean_error,
    cli_args,
    cli_env,
    kill_when,
    read_jsonl,
    run_cli,
    run_main,
    shared_cache_dir,
)
from test_multihost import JOB_SECONDS, LOSS_RTOL, launch

CONFIG = textwrap.dedent(
    """
    from debkd_jax import config_lib


    def get_config():
        config = config_lib.load_config("configs/imagenet.py:smoke")
        config.methods = {{"KD": config.methods["KD"]}}
        config.data.source = "folder:{folder}"
        config.data.workers = 0
        for part in (config.teacher, config.student):
            part.batch_size = 16
            part.eval_batch_size = 32
        config.data.logits_chunk_rows = 32
        return config
    """
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return shared_cache_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    base = tmp_path_factory.mktemp("stream_cli")
    folder = write_shape_folder(base / "shapes", per_class=40, seed=5)
    path = base / "stream_smoke.py"
    path.write_text(CONFIG.format(folder=folder))
    return path


@pytest.fixture(scope="module")
def one_process_two_devices(cache_dir, config_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stream_one") / "run"
    proc = run_cli(
        cli_args(workdir, cache_dir / "data", config=str(config_file)),
        cli_env(cache_dir, devices=2),
        timeout=JOB_SECONDS,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "data: files (data.pipeline='stream')" in proc.stderr
    return workdir


def histories(workdir: pathlib.Path) -> dict[str, list[dict]]:
    teacher = json.loads((workdir / "teacher" / "teacher.json").read_text())["history"]
    return {"teacher": teacher, "KD": read_jsonl(workdir / "students" / "KD-seed0" / "metrics.jsonl")}


def assert_same_run(ours: pathlib.Path, reference: pathlib.Path) -> None:
    a, b = histories(ours), histories(reference)
    for name in a:
        assert len(a[name]) == len(b[name]) == 2
        for x, y in zip(a[name], b[name], strict=True):
            assert x["train_loss"] == pytest.approx(y["train_loss"], rel=LOSS_RTOL), name
            assert x["val_accuracy"] == y["val_accuracy"], name
    ra = json.loads((ours / "results.json").read_text())["methods"]["KD"]["test"]["accuracy"]["mean"]
    rb = json.loads((reference / "results.json").read_text())["methods"]["KD"]["test"]["accuracy"]["mean"]
    assert ra == rb


@pytest.mark.slow
@pytest.mark.timeout(3 * JOB_SECONDS)
def test_two_streaming_processes_train_like_one_process_with_two_devices(
    one_process_two_devices, cache_dir, config_file, tmp_path
):
    job = launch(tmp_path / "run", cache_dir, config_file, tmp_path / "logs")
    assert job.wait(timeout=JOB_SECONDS) == [0, 0], job.tails()
    for i in (0, 1):
        err = job.output(i)[1]
        assert f"process {i} of 2 reads its 8 of every global batch of 16" in err, err[-3000:]
    assert_same_run(tmp_path / "run", one_process_two_devices)


@pytest.mark.slow
@pytest.mark.timeout(3 * JOB_SECONDS)
def test_stored_targets_on_the_views_train_the_student_online_targets_train(
    one_process_two_devices, cache_dir, config_file, tmp_path
):
    """configs/imagenet.py stores the teacher's logits on every view (`targets="stored"`): over two devices,
    as over two processes (above), its student is the one the teacher run in every step (`"online"`)
    trains."""
    workdir = tmp_path / "online"
    args = cli_args(workdir, cache_dir / "data", "--config.targets=online", config=str(config_file))
    proc = run_cli(args, cli_env(cache_dir, devices=2), timeout=JOB_SECONDS)
    assert proc.returncode == 0, proc.stderr[-5000:]
    stored = json.loads((one_process_two_devices / "results.json").read_text())
    online = json.loads((workdir / "results.json").read_text())
    assert (stored["targets"]["mode"], online["targets"]["mode"]) == ("stored", "online")
    a = read_jsonl(one_process_two_devices / "students" / "KD-seed0" / "metrics.jsonl")
    b = read_jsonl(workdir / "students" / "KD-seed0" / "metrics.jsonl")
    for x, y in zip(a, b, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["val_accuracy"] == y["val_accuracy"]
    # online: the teacher runs in the step, nothing is stored.
    assert not (workdir / "teacher" / "views").exists()
    assert (one_process_two_devices / "teacher" / "views" / "manifest.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(3 * JOB_SECONDS)
def test_a_killed_streamed_run_restarts_to_the_uninterrupted_result(
    one_process_two_devices, cache_dir, config_file, tmp_path
):
    workdir = tmp_path / "run"
    args = cli_args(workdir, cache_dir / "data", config=str(config_file))
    env = cli_env(cache_dir, devices=2)
    # Killed once the student's first epoch is checkpointed (its grain iterator position with it).
    status, err = kill_when(
        args, env, workdir / "students" / "KD-seed0" / "checkpoints" / "1", timeout=JOB_SECONDS
    )
    assert status == -9, err[-3000:]
    proc = run_cli(args, env, timeout=JOB_SECONDS)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "KD (seed 0): resumed from the checkpoint of epoch 1" in proc.stderr
    assert_same_run(workdir, one_process_two_devices)


def test_a_missing_tfds_split_and_an_empty_folder_are_one_line_errors(cache_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    base = ["--config.data.pipeline=stream"]
    proc = run_main(
        cli_args(
            tmp_path / "w1", cache_dir / "data", *base, f"--config.data.source=folder:{tmp_path / 'empty'}"
        )
    )
    assert_clean_error(proc, "no images found")
    proc = run_main(
        cli_args(
            tmp_path / "w2",
            cache_dir / "data",
            *base,
            "--config.data.source=tfds:no_such_ds_xyz",
            f"--config.data.tfds_data_dir={tmp_path}",
        )
    )
    assert_clean_error(proc, "no_such_ds_xyz")


MIXED_CONFIG = textwrap.dedent(
    """
    from debkd_jax import config_lib


    def get_config():
        config = config_lib.load_config("configs/imagenet.py:smoke")
        config.methods = {{"CE": config.methods["CE"]}}
        config.data.source = "folder:{folder}"
        config.data.workers = 0
        for part in (config.teacher, config.student):
            part.batch_size = 16
            part.eval_batch_size = 32
        return config
    """
)


def write_mixed_size_folder(root: pathlib.Path, per_class: int = 40, seed: int = 11) -> pathlib.Path:
    """conftest's shapes at sizes from 20x45 to 90x50 (portrait, landscape, square), JPEG and PNG."""
    from conftest import SHAPE_CLASSES, draw_shape_image
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(20, 45), (90, 50), (33, 33), (64, 40), (41, 77), (120, 120)]
    for label, name in enumerate(SHAPE_CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = Image.fromarray(draw_shape_image(SHAPE_CLASSES[label], rng)).resize(sizes[i % len(sizes)])
            image.save(root / name / (f"{name}_{i}.jpg" if i % 2 else f"{name}_{i}.png"))
    return root


@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_SECONDS)
def test_an_exported_streamed_student_predicts_its_test_images_as_its_run_did(cache_dir, tmp_path):
    """A run on image files of mixed sizes and aspect ratios (evaluated with the shorter side resized to
    S / 0.875 and the central S x S): its exported student, fed the test split's files (splits.csv) through
    `predict`, gets the run's test accuracy to the image."""
    from debkd_jax import export, predict

    folder = write_mixed_size_folder(tmp_path / "mixed")
    config = tmp_path / "mixed.py"
    config.write_text(MIXED_CONFIG.format(folder=folder))
    workdir = tmp_path / "run"
    proc = run_cli(
        cli_args(workdir, cache_dir / "data", config=str(config)), cli_env(cache_dir), timeout=JOB_SECONDS
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    run_dir = workdir / "students" / "CE-seed0"
    record = json.loads((run_dir / "model.json").read_text())
    assert record["preprocessing"] == {
        "resize": "resize_crop",
        "crop": 0.875,
        "image_size": 32,
        "normalize": {"offset": 127.5, "scale": 127.5},
    }
    out = tmp_path / "student.jax"
    sidecar = export.export_run(str(run_dir), str(out))
    assert sidecar["preprocessing"] == record["preprocessing"]

    rows = [line.split(",") for line in (workdir / "splits.csv").read_text().splitlines()[1:]]
    assert {split for _, split, _ in rows} == {"train", "val", "test"} and len(rows) == 80
    test = [(folder / image_id, int(label)) for image_id, split, label in rows if split == "test"]
    predicted, failed = predict.predict_files(predict.load(str(out)), [str(p) for p, _ in test])
    assert not failed and len(predicted) == len(test)
    correct = sum(int(np.argmax(p)) == label for (_, p), (_, label) in zip(predicted, test, strict=True))
    results = json.loads((workdir / "results.json").read_text())
    assert correct / len(test) == results["methods"]["CE"]["test"]["accuracy"]["mean"]
