"""Teachers from elsewhere: image ids in the data layer, logits files (read, checked, aligned) and the main
job distilling from one."""

import json
import os

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image
from test_cli import assert_clean_error, run_main

from debkd_jax import config_lib, data, pipeline, report, teachers
from debkd_jax.errors import UserError

SMALL = dict(max_per_class=10, digits_classes=2, image_size=16)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def digits(cache_dir):
    return data.load_dataset("digits", cache_dir=cache_dir, progress=False, **SMALL)


def teacher_rows(dataset, splits=("train", "val", "test"), seed=0):
    """(ids, logits): a mostly right teacher -- 3 on the label, noise elsewhere -- for `splits`."""
    rng = np.random.default_rng(seed)
    ids = np.concatenate([getattr(dataset, f"{s}_ids") for s in splits])
    labels = np.concatenate([getattr(dataset, f"{s}_labels") for s in splits])
    logits = rng.normal(size=(len(ids), dataset.num_classes)).astype(np.float32)
    logits[np.arange(len(ids)), labels] += 3.0
    return ids, logits


def write_file(path, ids, logits, **extra) -> str:
    np.savez(path, ids=np.asarray(ids, dtype=str), logits=np.asarray(logits), **extra)
    return str(path)


# ----------------------------------------------------------------------------- image ids


def test_digits_ids_name_the_sklearn_image_and_survive_the_cache(digits, cache_dir):
    from sklearn.datasets import load_digits

    every = np.concatenate([digits.train_ids, digits.val_ids, digits.test_ids])
    assert len(set(every)) == len(every) == 20
    assert all(i.startswith("digits/") for i in every)
    target = load_digits().target
    for split in ("train", "val", "test"):
        index = [int(i.split("/")[1]) for i in getattr(digits, f"{split}_ids")]
        np.testing.assert_array_equal(
            (target[index] >= 5).astype(np.int32), getattr(digits, f"{split}_labels")
        )
    again = data.load_dataset("digits", cache_dir=cache_dir, progress=False, **SMALL)  # from the cache
    assert any(name.startswith("debkd-data-") for name in os.listdir(cache_dir))
    np.testing.assert_array_equal(again.train_ids, digits.train_ids)


def test_folder_ids_are_paths_relative_to_the_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            value = 40 if cls == "cat" else 200
            pixels = np.full((8, 8, 3), value, np.uint8) + rng.integers(0, 5, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    d = data.load_dataset(f"folder:{tmp_path}", cache_dir=None, progress=False, image_size=8)
    for split in ("train", "val", "test"):
        for image_id, label, image in zip(
            getattr(d, f"{split}_ids"),
            getattr(d, f"{split}_labels"),
            getattr(d, f"{split}_images"),
            strict=True,
        ):
            assert image_id.split("/")[0] == d.class_names[label]
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / image_id).convert("RGB")), image)


# ----------------------------------------------------------------------------- reading and aligning a file


def test_aligned_logits_follow_the_dataset_order_whatever_the_file_order(digits, tmp_path):
    ids, logits = teacher_rows(digits)
    order = np.random.default_rng(1).permutation(len(ids))
    extra_ids = np.array(["digits/99999"])  # an image this subset lacks: ignored
    path = write_file(
        tmp_path / "t.npz",
        np.concatenate([ids[order], extra_ids]),
        np.concatenate([logits[order], logits[:1]]),
    )
    aligned = teachers.align_logits(teachers.read_logits_file(path), data.memory_source(digits))
    n_train, n_val = len(digits.train_ids), len(digits.val_ids)
    np.testing.assert_array_equal(aligned["train"], logits[:n_train])
    np.testing.assert_array_equal(aligned["val"], logits[n_train : n_train + n_val])
    np.testing.assert_array_equal(aligned["test"], logits[n_train + n_val :])


def test_per_split_arrays_are_joined_and_missing_splits_are_none(digits, tmp_path):
    ids, logits = teacher_rows(digits, ("train",))
    vids, vlogits = teacher_rows(digits, ("val",))
    path = tmp_path / "t.npz"
    np.savez(path, train_ids=ids, train_logits=logits, val_ids=vids, val_logits=vlogits)
    aligned = teachers.align_logits(teachers.read_logits_file(str(path)), data.memory_source(digits))
    np.testing.assert_array_equal(aligned["train"], logits)
    np.testing.assert_array_equal(aligned["val"], vlogits)
    assert aligned["test"] is None


@pytest.mark.parametrize(
    "case, needles",
    [
        ("missing_train", ["misses 2 of the 14 training images", "digits/"]),
        ("classes", ["has 3 logits per image", "2 classes"]),
        ("duplicates", ["1 id(s) appear more than once", "keep one row"]),
        ("nan", ["2 row(s) hold NaN or Inf"]),
        ("keys", ["not 'ids' and 'logits'"]),
        ("not_npz", ["not a readable .npz"]),
        ("absent", ["no such file"]),
    ],
)
def test_a_file_that_does_not_fit_is_refused_with_counts_and_examples(digits, tmp_path, case, needles):
    ids, logits = teacher_rows(digits)
    path = str(tmp_path / "t.npz")
    if case == "missing_train":
        write_file(path, ids[2:], logits[2:])
        needles = [*needles, repr(str(ids[0]))]
    elif case == "classes":
        write_file(path, ids, np.concatenate([logits, logits[:, :1]], axis=1))
    elif case == "duplicates":
        write_file(path, np.concatenate([ids, ids[:1]]), np.concatenate([logits, logits[:1]]))
        needles = [*needles, repr(str(ids[0]))]
    elif case == "nan":
        logits[3, 0], logits[5, 1] = np.nan, np.inf
        write_file(path, ids, logits)
        needles = [*needles, repr(str(ids[3])), repr(str(ids[5]))]
    elif case == "keys":
        np.savez(path, names=ids, scores=logits)
    elif case == "not_npz":
        with open(path, "w") as f:
            f.write("id,logit\n")
    with pytest.raises(UserError) as e:
        teachers.align_logits(teachers.read_logits_file(path), data.memory_source(digits))
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_logits_teacher_refuses_feature_methods_and_a_second_teacher():
    config = config_lib.smoke(config_lib.base_config(("KD", "FKD")))
    config.teacher.logits = "t.npz"
    with pytest.raises(UserError, match="'FKD' needs the teacher's features"):
        config_lib.validate_config(config)
    config = config_lib.smoke(config_lib.base_config(("KD",)))
    config.teacher.logits, config.teacher.checkpoint = "t.npz", "runs/x/teacher"
    with pytest.raises(UserError, match="keep one of them"):
        config_lib.validate_config(config)


def test_the_file_is_part_of_the_students_identity(digits, tmp_path):
    config = config_lib.base_config(("KD",))
    first = write_file(tmp_path / "a.npz", *teacher_rows(digits, seed=0))
    second = write_file(tmp_path / "b.npz", *teacher_rows(digits, seed=1))
    identities = []
    source = data.memory_source(digits)
    for path in (first, second):
        config.teacher.logits = path
        teacher = pipeline.get_teacher(
            config=config,
            source=source,
            teacher_dir=str(tmp_path / "t"),
            mesh=None,
            given=pipeline.given_teacher(config, source),
        )
        identities.append(
            pipeline.student_identity(
                config=config, method_cfg=config.methods.KD, seed=0, source=source, teacher=teacher
            )
        )
    assert identities[0]["teacher_logits_file"] != identities[1]["teacher_logits_file"]
    assert identities[0]["teacher_logits"] != identities[1]["teacher_logits"]


# ----------------------------------------------------------------------------- the main job


def logits_config(cache_dir, path, method_names):
    config = config_lib.smoke(config_lib.base_config(method_names))
    config.data.cache_dir = cache_dir
    config.data.image_size = 16
    config.data.max_per_class = 40
    config.student.num_epochs = 1
    config.student.batch_size = 16
    config.teacher.logits = path
    return config


def test_every_logits_only_method_distils_from_a_file(cache_dir, tmp_path):
    methods = ("CE", "KD", "KD+KI", "DeBKD", "BTKD-swap", "DKD")
    dataset = data.load_dataset(
        "digits", cache_dir=cache_dir, progress=False, max_per_class=40, image_size=16
    )
    path = write_file(tmp_path / "t.npz", *teacher_rows(dataset))
    results = pipeline.train_and_evaluate(logits_config(cache_dir, path, methods), str(tmp_path / "w"))
    assert set(results["methods"]) == set(methods)
    assert results["teacher"]["model"] == "logits file t.npz"
    aligned = teachers.align_logits(teachers.read_logits_file(path), data.memory_source(dataset))
    expected = float(np.mean(np.argmax(aligned["test"], -1) == dataset.test_labels))
    assert results["teacher"]["test"]["accuracy"] == pytest.approx(expected)
    assert not os.path.exists(tmp_path / "w" / "teacher")
    # Deterministic (seed 0, CPU). Measured 0.5 for every method: one epoch on 28 images per class leaves each
    # student predicting one class, 8 of the 16 test images (seed 1 the same; seed 2, another data split:
    # 0.375 to 0.5).
    assert len(dataset.test_labels) == 16
    assert {name: results["methods"][name]["test"]["accuracy"]["mean"] for name in methods} == dict.fromkeys(
        methods, 0.5
    )


def test_a_train_only_file_gives_a_teacher_row_that_says_so(cache_dir, tmp_path):
    dataset = data.load_dataset(
        "digits", cache_dir=cache_dir, progress=False, max_per_class=40, image_size=16
    )
    path = write_file(tmp_path / "t.npz", *teacher_rows(dataset, ("train",)))
    workdir = tmp_path / "w"
    results = pipeline.train_and_evaluate(logits_config(cache_dir, path, ("KD",)), str(workdir))
    assert results["teacher"]["test"] is None
    assert results["teacher"]["accuracy"]["val"] is None
    markdown = (workdir / "results.md").read_text()
    assert report.NO_TEACHER_TEST in markdown and "test not in the logits file" in markdown


def test_cli_refuses_a_file_missing_training_images_before_writing(cache_dir, tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"earlier": true}')
    dataset = data.load_dataset(
        "digits", cache_dir=cache_dir, progress=False, max_per_class=40, image_size=16
    )
    ids, logits = teacher_rows(dataset)
    path = write_file(tmp_path / "t.npz", ids[5:], logits[5:])
    proc = run_main(
        [
            f"--config={REPO_ROOT / 'configs' / 'debkd.py'}:smoke",
            f"--workdir={workdir}",
            f"--config.teacher.logits={path}",
            f"--config.data.cache_dir={cache_dir}",
            "--config.data.image_size=16",
            "--config.data.max_per_class=40",
        ]
    )
    assert_clean_error(proc, "misses 5 of the")
    assert json.loads((workdir / "config.json").read_text()) == {"earlier": True}
    assert not (workdir / "students").exists()
