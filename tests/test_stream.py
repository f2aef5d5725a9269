"""The files kind of data source (debkd_jax/data/stream.py, data/source.py): the same split, images, order and
training as the memory kind on a small folder; the per-process split of every epoch; exact resume from the
checkpointed iterator of either kind; the three teacher-logits stores; bad input."""

from __future__ import annotations

import os
import pathlib
import time

import jax
import numpy as np
import pytest
from conftest import write_shape_folder

from debkd_jax import config_lib, methods, training
from debkd_jax import data as data_lib
from debkd_jax.data import stream

pytestmark = [pytest.mark.usefixtures("fast_compiles"), pytest.mark.timeout(300)]

SIZE = 32  # the folder's images are 32x32: with eval_crop=1 the streamed eval transform is the identity


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    return write_shape_folder(tmp_path_factory.mktemp("stream") / "shapes", per_class=48, seed=3)


@pytest.fixture(scope="module")
def source(folder) -> stream.StreamSource:
    return stream.plan_stream(f"folder:{folder}", seed=0)


def files(source: stream.StreamSource, size=SIZE, augment=False, crop=1.0, workers=0) -> data_lib.DataSource:
    return data_lib.files_source(
        source, name="folder", image_size=size, augment=augment, eval_crop=crop, workers=workers
    )


def memory(folder) -> data_lib.DataSource:
    dataset = data_lib.load_dataset(
        f"folder:{folder}", cache_dir=None, seed=0, image_size=SIZE, progress=False
    )
    return data_lib.memory_source(dataset)


def test_the_stream_lists_the_same_split_and_reads_the_same_images_as_memory(folder, source, tmp_path):
    dataset = data_lib.load_dataset(
        f"folder:{folder}", cache_dir=None, seed=0, image_size=SIZE, progress=False
    )
    for split in ("train", "val", "test"):
        records = source.splits[split]
        np.testing.assert_array_equal(records.ids, getattr(dataset, f"{split}_ids"))
        np.testing.assert_array_equal(records.labels, getattr(dataset, f"{split}_labels"))
    read = stream.ReadExample(source.splits["train"], SIZE, train=False, eval_crop=1.0)
    for row in (0, 5, len(source.splits["train"]) - 1):
        np.testing.assert_array_equal(read((row, -1, row))["image"], dataset.train_images[row])


def test_processes_read_disjoint_parts_of_every_epoch_that_together_are_the_epoch():
    n, batch, epochs = 50, 8, 2
    one = stream.TrainOrder(n, batch, seed=1, num_epochs=epochs)
    parts = [
        stream.TrainOrder(n, batch, seed=1, num_epochs=epochs, process_index=p, process_count=2)
        for p in range(2)
    ]
    whole = np.asarray([one[i][0] for i in range(len(one))]).reshape(epochs, -1, batch)
    split = [np.asarray([o[i][0] for i in range(len(o))]).reshape(epochs, -1, batch // 2) for o in parts]
    # Each global batch is process 0's rows then process 1's; per epoch the parts are disjoint.
    np.testing.assert_array_equal(np.concatenate(split, axis=-1), whole)
    for e in range(epochs):
        assert not set(split[0][e].ravel()) & set(split[1][e].ravel())
        expected = data_lib.batch_indices(n, batch, seed=1, epoch=e)
        np.testing.assert_array_equal(whole[e], expected)


def test_the_train_transform_is_a_crop_of_the_image_and_a_function_of_seed_epoch_and_position():
    img = pytest.importorskip("PIL.Image").fromarray(
        np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    )
    a = stream.train_transform(img, 16, np.random.default_rng([0, 1, 2]))
    b = stream.train_transform(img, 16, np.random.default_rng([0, 1, 2]))
    c = stream.train_transform(img, 16, np.random.default_rng([0, 1, 3]))
    assert a.shape == (16, 16, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    for seed in range(50):
        left, top, w, h = stream.rrc_box(np.random.default_rng(seed), 60, 40)
        assert 0 <= left and left + w <= 60 and 0 <= top and top + h <= 40
        assert 0.08 * 2400 * 0.95 <= w * h <= 2400 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    assert stream.eval_transform(img, 16).shape == (16, 16, 3)


def _store(tmp_path, logits, labels, dtype="float32", chunk_rows=16):
    store = stream.LogitsStore.create(
        str(tmp_path / f"store-{dtype}"), len(logits), logits.shape[1], dtype, chunk_rows, "k", writer=True
    )
    for c, rows in enumerate(stream.chunks_of(len(logits), chunk_rows)):
        store.write_chunk(c, logits[rows], np.ones(len(rows), bool), labels[rows], [])
    return stream.LogitsStore.open(store.path, len(logits), logits.shape[1])


def test_the_logits_store_reads_rows_back_and_checks_the_data(tmp_path):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(40, 3)) * 4).astype(np.float32)
    labels = rng.integers(0, 3, 40).astype(np.int32)
    store = _store(tmp_path, logits, labels)
    np.testing.assert_array_equal(np.stack([store.row(r) for r in range(40)]), logits)
    for dtype, tol in (("float16", 2**-10), ("bfloat16", 2**-7)):
        half = _store(tmp_path, logits, labels, dtype)
        got = np.stack([half.row(r) for r in range(40)])
        assert 0 < np.max(np.abs(got - logits) / np.maximum(np.abs(logits), 1)) <= tol
    with pytest.raises(ValueError, match="rows"):
        stream.LogitsStore.open(store.path, 41, 3)
    with pytest.raises(ValueError, match="other data"):
        stream.LogitsStore.create(store.path, 40, 3, "float32", 16, "another teacher", writer=True)
    os.remove(os.path.join(store.path, "chunk-000001.npy"))
    with pytest.raises(ValueError, match="lack 1 chunk"):
        stream.LogitsStore.open(store.path, 40, 3)


def test_the_three_logits_stores_give_the_same_rows_chunks_and_whole(tmp_path):
    """Disk, memory and composed (rows dealt among parts, as out-of-fold logits are) stores of the same logits
    answer `row`, `rows`, `chunks` and `all` alike."""
    from debkd_jax.data import logits_store

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(45, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 45).astype(np.int32)
    part_of = rng.integers(0, 3, 45)
    position = np.zeros(45, np.int64)
    parts = []
    for k in range(3):
        rows = np.flatnonzero(part_of == k)
        position[rows] = np.arange(len(rows))
        parts.append(_store(tmp_path / f"part{k}", logits[rows], labels[rows], chunk_rows=4))
    stores = [
        _store(tmp_path, logits, labels, chunk_rows=16),
        logits_store.ArrayLogits(logits),
        logits_store.ComposedLogits(tuple(parts), part_of, position),
    ]
    idx = rng.permutation(45)[:20]
    for store in stores:
        np.testing.assert_array_equal(store.all(), logits)
        np.testing.assert_array_equal(store.rows(idx), logits[idx])
        np.testing.assert_array_equal(store.row(7), logits[7])
        whole = np.zeros_like(logits)
        seen = []
        for rows, z in store.chunks():
            whole[rows] = z
            seen.extend(rows.tolist())
        assert sorted(seen) == list(range(45))
        np.testing.assert_array_equal(whole, logits)
        assert store.valid.all() and store.num_rows == 45 and store.num_classes == 4


def _fit(source, logits, run_dir, num_epochs=2, on_epoch=None, method="KD"):
    cfg = config_lib.train_config("resnet_tiny", num_epochs=num_epochs, batch_size=16)
    method = methods.preset(method)
    objective = methods.objective(method, num_epochs)
    n = len(source.splits["train"])
    spec = training.build_step_spec(
        cfg, 2, "float32", objective, n // 16, source.augments_on_device, method_cfg=method
    )
    return training.fit(
        name="kd",
        spec=spec,
        train_cfg=cfg,
        source=source,
        logits=logits,
        run_dir=str(run_dir),
        mesh=training.create_mesh(),
        seed=0,
        show_progress=False,
        on_epoch=on_epoch,
    )


def test_training_on_files_equals_training_in_memory_on_the_same_images(folder, source, tmp_path):
    in_memory = memory(folder)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(in_memory.splits["train"]), 2)).astype(np.float32) * 3
    store = _store(tmp_path, logits, in_memory.splits["train"].labels)
    streamed = _fit(files(source), store, tmp_path / "s")
    from debkd_jax.data import logits_store

    kept = _fit(in_memory, logits_store.ArrayLogits(logits), tmp_path / "m")
    for a, b in zip(streamed.history, kept.history, strict=True):
        assert a["val_accuracy"] == b["val_accuracy"]
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        streamed.best_variables,
        kept.best_variables,
    )


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("kind", ["files", "memory"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(folder, source, tmp_path, kind):
    """Either kind's batch iterator position goes into every checkpoint (files: grain's, with worker
    processes and augmentation in them; memory: its step count, augmentation on device)."""
    data = files(source, size=24, augment=True, crop=0.875, workers=1) if kind == "files" else memory(folder)
    if kind == "memory":
        import dataclasses

        data = dataclasses.replace(data, augment=True)

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise Interrupt

    whole = _fit(data, None, tmp_path / "whole", num_epochs=2, method="CE")
    with pytest.raises(Interrupt):
        _fit(data, None, tmp_path / "cut", num_epochs=2, on_epoch=stop_after_first, method="CE")
    resumed = _fit(data, None, tmp_path / "cut", num_epochs=2, method="CE")
    assert resumed.history == whole.history
    jax.tree.map(np.testing.assert_array_equal, resumed.best_variables, whole.best_variables)


def test_an_unreadable_image_is_skipped_and_listed_and_a_training_batch_stays_whole(tmp_path):
    root = write_shape_folder(tmp_path / "bad", per_class=10, seed=1)
    bad = sorted((root / "disc").iterdir())[0]
    bad.write_bytes(b"not an image")
    source = stream.plan_stream(f"folder:{root}", seed=0, split=(0.6, 0.2, 0.2))
    split = next(s for s in ("train", "val", "test") if str(bad) in source.splits[s].paths)
    records = source.splits[split]
    row = int(np.flatnonzero(records.paths == str(bad))[0])
    got = stream.ReadExample(records, 16, train=False)((row, -1, 0))
    assert not got["valid"] and "cannot identify" in str(got["reason"])
    substituted = stream.ReadExample(records, 16, train=True)((row, 0, 0))
    assert substituted["valid"] and substituted["row"] != row and substituted["image"].any()


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p.mkdir(), "no images found"),
        (lambda p: None, "does not exist"),
    ],
)
def test_a_missing_or_empty_folder_is_one_clear_error(tmp_path, make, needle):
    make(tmp_path / "data")
    with pytest.raises(ValueError, match=needle):
        stream.plan_stream(f"folder:{tmp_path / 'data'}", seed=0)


class DieOnRow:
    """A reader whose worker process exits on row 3 (as a worker killed by the OOM killer)."""

    def __init__(self, read):
        self.read = read

    def __call__(self, item):
        if item[0] == 3:
            os._exit(1)
        return self.read(item)


def test_a_dying_worker_is_an_error_not_a_hang(source):
    records = source.splits["train"]
    order = stream.EvalOrder.build([np.arange(8)], 8)
    it = iter(stream.loader(order, DieOnRow(stream.ReadExample(records, 16, train=False)), 4, workers=1))
    started = time.monotonic()
    with pytest.raises(Exception, match="(?i)worker|terminated|exit"):
        for _ in range(2):
            next(it)
    assert time.monotonic() - started < 120


def test_auto_streams_when_the_decoded_images_would_not_fit(folder):
    n = len(list(folder.rglob("*.*")))
    choice, why = stream.choose_pipeline("auto", f"folder:{folder}", 224, memory_bytes=10**6)
    assert choice == "stream" and str(n) in why
    choice, _ = stream.choose_pipeline("auto", f"folder:{folder}", 32, memory_bytes=10**12)
    assert choice == "memory"
