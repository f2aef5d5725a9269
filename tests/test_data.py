"""Tests for debkd_jax.data: sources, odd files, cache, split, batches and the jitted transforms."""

import io
import logging
import os
import signal
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image, JpegImagePlugin

from debkd_jax import data, processes
from debkd_jax.data import batching, sources
from debkd_jax.data import split as data_split

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def solid(color, size=(40, 24), mode="RGB"):
    return Image.new(mode, size, color)


def save(img, path, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **kwargs)
    return str(path)


def halves(left, right, size=(64, 32), mode="RGB"):
    """An image whose left half is `left` and right half `right`."""
    img = Image.new(mode, size, right)
    img.paste(Image.new(mode, (size[0] // 2, size[1]), left), (0, 0))
    return img


def decode(path, size=32):
    image, reason = data.decode_file(str(path), size)
    assert reason is None, reason
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    return image


def make_class_folders(root, counts, colors=None, ext="png"):
    """One folder per class, `n` solid images each; class i has colour `colors[i]`."""
    colors = colors or [RED, BLUE, GREEN]
    for (name, n), color in zip(counts.items(), colors, strict=False):
        for j in range(n):
            shade = tuple(max(0, c - 3 * j) for c in color)
            save(solid(shade), root / name / f"{name}_{j}.{ext}")
    return root


def all_split(ds):
    images = np.concatenate([ds.train_images, ds.val_images, ds.test_images])
    labels = np.concatenate([ds.train_labels, ds.val_labels, ds.test_labels])
    return images, labels


def split_counts(ds):
    k = ds.num_classes
    return [np.bincount(y, minlength=k).tolist() for y in (ds.train_labels, ds.val_labels, ds.test_labels)]


# ----------------------------------------------------------------------------- real Dogs vs Cats


def test_the_source_is_recorded_as_given(shapes_dir, tmp_path, monkeypatch):
    """A relative folder stays relative in `Dataset.source` (and so in results and reports); the images are
    those of the absolute form."""
    monkeypatch.chdir(shapes_dir.parent)
    given = data.load_dataset(
        f"folder:{shapes_dir.name}", cache_dir=str(tmp_path), max_per_class=10, progress=False
    )
    assert given.source == f"folder:{shapes_dir.name}"
    absolute = data.load_dataset(
        f"folder:{shapes_dir}", cache_dir=str(tmp_path), max_per_class=10, progress=False
    )
    assert absolute.source == f"folder:{shapes_dir}"
    np.testing.assert_array_equal(given.train_images, absolute.train_images)


def test_dogs_vs_cats_slice(dogs_vs_cats_dir, tmp_path):
    ds = data.load_dataset(
        f"folder:{dogs_vs_cats_dir}", cache_dir=str(tmp_path), max_per_class=40, progress=False
    )
    assert ds.class_names == ("cat", "dog") and ds.num_classes == 2 and ds.skipped == ()
    assert ds.source == f"folder:{dogs_vs_cats_dir}"
    assert split_counts(ds) == [[28, 28], [4, 4], [8, 8]]
    for x, y in (
        (ds.train_images, ds.train_labels),
        (ds.val_images, ds.val_labels),
        (ds.test_images, ds.test_labels),
    ):
        assert x.dtype == np.uint8 and x.shape == (len(y), 32, 32, 3) and y.dtype == np.int32

    # Labels follow the folders: every image equals a decode of one chosen file of its class.
    listing = sources.folder_listing(str(dogs_vs_cats_dir))
    chosen = data_split.subset_per_class(listing.labels, 40)
    expected = {}
    for i in chosen:
        rel = listing.paths[i]
        assert rel.split(os.sep)[0] == ("cat", "dog")[listing.labels[i]]
        pixels = np.asarray(Image.open(dogs_vs_cats_dir / rel).convert("RGB").resize((32, 32)))
        expected.setdefault(pixels.tobytes(), set()).add(int(listing.labels[i]))
    images, labels = all_split(ds)
    for image, label in zip(images, labels, strict=True):
        assert expected[image.tobytes()] == {int(label)}


def test_split_is_seeded_and_stratified():
    a = data.load_dataset("digits", cache_dir=None, seed=3, digits_classes=10, progress=False)
    b = data.load_dataset("digits", cache_dir=None, seed=3, digits_classes=10, progress=False)
    c = data.load_dataset("digits", cache_dir=None, seed=4, digits_classes=10, progress=False)
    for name in ("train_images", "train_labels", "val_images", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.test_images, c.test_images)
    train, val, test = (np.array(x) for x in split_counts(a))
    totals = train + val + test
    assert (val >= 1).all() and (test >= 1).all()
    np.testing.assert_allclose(test / totals, 0.2, atol=0.02)
    np.testing.assert_allclose(val / totals, 0.1, atol=0.02)
    # The three splits partition the data: no image in two splits, none lost.
    images, _ = all_split(a)
    assert len(images) == 1797
    keys = {x.tobytes() for x in a.test_images}
    assert not keys & {x.tobytes() for x in a.train_images}


def test_split_counts_keep_one_per_split():
    for n in range(3, 40):
        for fractions in ((0.7, 0.1, 0.2), (0.1, 0.8, 0.1), (0.1, 0.1, 0.8), (0.98, 0.01, 0.01)):
            n_val, n_test = data_split.split_counts(n, fractions[1], fractions[2])
            assert n_val >= 1 and n_test >= 1 and n - n_val - n_test >= 1
    assert data_split.split_counts(100, 0.1, 0.2) == (10, 20)
    assert data_split.split_counts(2, 0.125, 0.0) == (1, 0)


# ----------------------------------------------------------------------------- cache


def counting_decoder(monkeypatch):
    calls = []
    original = sources.decode_file

    def counted(path, image_size):
        calls.append(path)
        return original(path, image_size)

    monkeypatch.setattr(sources, "decode_file", counted)
    return calls


def test_cache_is_used_and_keyed(tmp_path, monkeypatch):
    root = make_class_folders(tmp_path / "imgs", {"a": 4, "b": 5})
    cache = tmp_path / "cache"
    calls = counting_decoder(monkeypatch)
    first = data.load_dataset(f"folder:{root}", cache_dir=str(cache), progress=False)
    assert len(calls) == 9
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith("debkd-data-") and files[0].endswith(".npz")
    assert len(files[0]) == len("debkd-data-.npz") + 64
    second = data.load_dataset(f"folder:{root}", cache_dir=str(cache), progress=False)
    assert len(calls) == 9
    np.testing.assert_array_equal(first.train_images, second.train_images)
    np.testing.assert_array_equal(first.test_labels, second.test_labels)
    assert second.class_names == ("a", "b")

    data.load_dataset(f"folder:{root}", cache_dir=str(cache), image_size=16, progress=False)
    assert len(calls) == 18
    st = os.stat(root / "a" / "a_0.png")
    os.utime(root / "a" / "a_0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    data.load_dataset(f"folder:{root}", cache_dir=str(cache), progress=False)
    assert len(calls) == 27
    assert len(os.listdir(cache)) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_cache_is_ignored_and_rewritten(tmp_path, monkeypatch, damage):
    root = make_class_folders(tmp_path / "imgs", {"a": 3, "b": 3})
    cache = tmp_path / "cache"
    reference = data.load_dataset(f"folder:{root}", cache_dir=str(cache), progress=False)
    (path,) = cache.iterdir()
    content = path.read_bytes()
    path.write_bytes(
        {"garbage": b"not a zip file" * 10, "truncated": content[: len(content) // 2], "empty": b""}[damage]
    )
    calls = counting_decoder(monkeypatch)
    again = data.load_dataset(f"folder:{root}", cache_dir=str(cache), progress=False)
    assert len(calls) == 6
    np.testing.assert_array_equal(reference.train_images, again.train_images)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
    data.load_dataset(f"folder:{root}", cache_dir=str(cache), progress=False)
    assert len(calls) == 6


KILLED_WRITER = """
import os, signal, sys
from debkd_jax import data

def killed_before_rename(fd):
    os.kill(os.getpid(), signal.SIGKILL)

os.fsync = killed_before_rename  # the whole file is written, not yet renamed into place
data.load_dataset("folder:" + sys.argv[1], cache_dir=sys.argv[2], progress=False)
"""


def test_cache_write_killed_midway_leaves_no_cache(tmp_path, monkeypatch):
    root = make_class_folders(tmp_path / "imgs", {"a": 3, "b": 3})
    cache = tmp_path / "cache"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_WRITER)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"}
    run = processes.run(
        [sys.executable, str(script), str(root), str(cache)], env=env, text=False, timeout=120
    )
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    assert not [f for f in os.listdir(cache) if f.startswith("debkd-data-")]
    calls = counting_decoder(monkeypatch)
    ds = data.load_dataset(f"folder:{root}", cache_dir=str(cache), progress=False)
    assert len(calls) == 6 and len(all_split(ds)[1]) == 6
    data.load_dataset(f"folder:{root}", cache_dir=str(cache), progress=False)
    assert len(calls) == 6


# ----------------------------------------------------------------------------- odd files


def test_formats_and_modes(tmp_path):
    d = tmp_path
    np.testing.assert_allclose(decode(save(solid(RED), d / "x.jpg", quality=95))[4, 4], RED, atol=8)
    np.testing.assert_array_equal(decode(save(solid(RED), d / "x.png")), np.full((32, 32, 3), RED))
    np.testing.assert_array_equal(decode(save(solid(BLUE), d / "x.bmp"))[0, 0], BLUE)
    np.testing.assert_array_equal(decode(save(solid(GREEN), d / "x.webp", lossless=True))[0, 0], GREEN)
    np.testing.assert_array_equal(decode(save(solid(RED), d / "UPPER.PNG"))[0, 0], RED)
    np.testing.assert_array_equal(decode(save(solid(RED), d / "x.tif"))[0, 0], RED)

    frames = [solid(RED).convert("P"), solid(GREEN).convert("P")]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    assert Image.open(d / "anim.gif").n_frames == 2
    np.testing.assert_array_equal(decode(d / "anim.gif")[5, 5], RED)

    grey = decode(save(solid(77, mode="L"), d / "grey.jpg"))
    assert np.all(grey[..., 0] == grey[..., 1]) and np.all(grey[..., 1] == grey[..., 2])
    assert abs(int(grey[3, 3, 0]) - 77) <= 2

    rgba = decode(save(halves((255, 0, 0, 0), (0, 0, 255, 255), mode="RGBA"), d / "rgba.png"))
    np.testing.assert_array_equal(rgba[:, :14], np.full((32, 14, 3), WHITE))
    np.testing.assert_array_equal(rgba[:, 18:], np.full((32, 14, 3), BLUE))
    la = decode(save(halves((0, 0), (40, 255), mode="LA"), d / "la.png"))
    assert la[0, 0].tolist() == [255] * 3 and la[0, 31].tolist() == [40] * 3

    palette = halves(RED, BLUE).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    np.testing.assert_array_equal(decode(save(palette, d / "palette.png"))[0, 0], RED)
    transparent = halves(RED, BLUE).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    transparent.info["transparency"] = transparent.getpixel((0, 0))
    save(transparent, d / "palette_t.png", transparency=transparent.getpixel((0, 0)))
    pt = decode(d / "palette_t.png")
    np.testing.assert_array_equal(pt[0, 0], WHITE)
    np.testing.assert_array_equal(pt[0, 31], BLUE)

    cmyk = decode(save(solid((0, 255, 255, 0), mode="CMYK"), d / "cmyk.jpg", quality=95))
    np.testing.assert_allclose(cmyk[8, 8], RED, atol=10)

    deep = np.full((32, 64), 25700, np.uint16)
    deep[:, 32:] = 65535
    path = save(Image.fromarray(deep), d / "deep.png")
    assert Image.open(path).mode.startswith("I")
    sixteen = decode(path)
    assert sixteen[0, 0].tolist() == [100] * 3 and sixteen[0, 31].tolist() == [255] * 3

    tiny = decode(save(solid(GREEN, size=(1, 1)), d / "one_pixel.png"))
    np.testing.assert_array_equal(tiny, np.full((32, 32, 3), GREEN))


def test_exif_rotation_is_applied(tmp_path):
    img = solid(BLUE, size=(60, 30))
    img.paste(solid(RED, size=(15, 15)), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
    path = save(img, tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    out = decode(path).astype(int)
    assert np.abs(out[1, 30] - RED).max() < 40, "the red corner should move to the top right"
    assert np.abs(out[1, 1] - BLUE).max() < 40
    plain = decode(save(img, tmp_path / "plain.jpg", quality=95)).astype(int)
    assert np.abs(plain[1, 1] - RED).max() < 40


def test_wide_image_resized_whole(tmp_path):
    path = save(halves(RED, BLUE, size=(3000, 200)), tmp_path / "wide.jpg", quality=95)
    out = decode(path).astype(int)
    assert np.abs(out[:, :14] - RED).max() < 30 and np.abs(out[:, 18:] - BLUE).max() < 30


def test_big_jpeg_decoded_at_reduced_scale(tmp_path, monkeypatch):
    path = save(halves(RED, BLUE, size=(3000, 2000)), tmp_path / "big.jpg", quality=90)
    decoded_sizes = []
    original = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        result = original(self)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    out = decode(path).astype(int)
    assert decoded_sizes and max(decoded_sizes) == (375, 250), "decoded at 1/8 scale by draft"
    assert np.abs(out[:, :14] - RED).max() < 30 and np.abs(out[:, 18:] - BLUE).max() < 30


def test_decompression_bomb_is_a_skip(tmp_path, monkeypatch):
    path = save(solid(RED, size=(3000, 200)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    image, reason = data.decode_file(path, 32)
    assert image is None and "decompression bomb" in reason


def write_odd_folder(root):
    """Class 'a' of odd but readable files plus unreadable ones; class 'b' plain."""
    a, b = root / "a", root / "b"
    save(solid(RED), a / "plain.jpg")
    save(solid(RED), a / "chat noir é 猫.png")
    save(solid(RED, size=(1, 1)), a / "one.png")
    save(solid(RED), a / "UPPER.JPG")
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(good, "JPEG")
    (a / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (a / "zero.jpg").write_bytes(b"")
    (a / "text.jpg").write_text("this is not an image\n")
    os.symlink(root / "missing.png", a / "broken.png")
    save(solid(GREEN), a / ".hidden.png")
    (a / "notes.txt").write_text("ignored")
    os.symlink(root, a / "loop")
    for j in range(3):
        save(solid(BLUE), b / f"b{j}.bmp")
    os.symlink(b, b / "self")
    save(solid(GREEN), root / ".git" / "obj.png")
    return root


def test_odd_folder_skips_unreadable_and_reports(tmp_path, caplog):
    root = write_odd_folder(tmp_path / "odd")
    with caplog.at_level(logging.WARNING):
        ds = data.load_dataset(f"folder:{root}", cache_dir=str(tmp_path / "c"), progress=False)
    assert ds.class_names == ("a", "b")
    images, labels = all_split(ds)
    assert np.bincount(labels).tolist() == [4, 3]
    assert (np.abs(images[labels == 0].astype(int) - RED).max(axis=(1, 2, 3)) < 10).all()
    assert (images[labels == 1] == np.array(BLUE, np.uint8)).all()
    skipped = dict(ds.skipped)
    names = {os.path.basename(p) for p in skipped}
    assert names == {"truncated.jpg", "zero.jpg", "text.jpg", "broken.png"}
    assert all(os.path.isabs(p) and os.path.dirname(p) == str(root / "a") for p in skipped)
    assert all(reason for reason in skipped.values())
    assert "Skipped 4 unreadable" in caplog.text

    again = data.load_dataset(f"folder:{root}", cache_dir=str(tmp_path / "c"), progress=False)
    assert again.skipped == ds.skipped


def test_kaggle_flat_layout(tmp_path):
    for j in range(4):
        save(solid(RED), tmp_path / "train" / f"cat.{j}.jpg")
        save(solid(BLUE), tmp_path / "train" / f"dog.{j}.jpg")
    save(solid(BLUE), tmp_path / "train" / f"dog.{9}.png")
    (tmp_path / "train" / "sampleSubmission.csv").write_text("id,label\n")
    ds = data.load_dataset(f"folder:{tmp_path / 'train'}", cache_dir=None, progress=False)
    assert ds.class_names == ("cat", "dog")
    images, labels = all_split(ds)
    assert np.bincount(labels).tolist() == [4, 5]
    red = images[..., 0].mean(axis=(1, 2)) > 128
    np.testing.assert_array_equal(red, labels == 0)


def test_max_per_class_subset(tmp_path):
    root = make_class_folders(tmp_path / "imgs", {"a": 10, "b": 6})
    a = data.load_dataset(f"folder:{root}", cache_dir=None, max_per_class=5, seed=0, progress=False)
    b = data.load_dataset(f"folder:{root}", cache_dir=None, max_per_class=5, seed=1, progress=False)
    assert np.bincount(all_split(a)[1]).tolist() == [5, 5]
    assert {x.tobytes() for x in all_split(a)[0]} == {x.tobytes() for x in all_split(b)[0]}


# ----------------------------------------------------------------------------- errors


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.load_dataset(f"folder:{tmp_path / 'nope'}", cache_dir=None)
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a directory"):
        data.load_dataset(f"folder:{tmp_path / 'file.jpg'}", cache_dir=None)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found.*sub-folder per class"):
        data.load_dataset(f"folder:{tmp_path / 'empty'}", cache_dir=None)
    one = make_class_folders(tmp_path / "one", {"cat": 5})
    with pytest.raises(ValueError, match="only one class.*'cat'"):
        data.load_dataset(f"folder:{one}", cache_dir=None, progress=False)
    few = make_class_folders(tmp_path / "few", {"cat": 5, "dog": 2})
    with pytest.raises(ValueError, match=r"\('dog', 2\).*fewer than 3"):
        data.load_dataset(f"folder:{few}", cache_dir=None, progress=False)
    broken = make_class_folders(tmp_path / "broken", {"cat": 5, "dog": 3})
    (broken / "dog" / "dog_0.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\('dog', 2\).*1 file\(s\) skipped"):
        data.load_dataset(f"folder:{broken}", cache_dir=None, progress=False)


def test_argument_errors(tmp_path):
    for bad in ("foo", "folder:", "tfds:", "digits:2", "Folder:/x"):
        with pytest.raises(ValueError, match="valid forms.*digits.*folder:PATH.*tfds:NAME"):
            data.load_dataset(bad, cache_dir=None)
    for split in ((0.8, 0.2), (0.7, 0.0, 0.3), (0.7, 0.2, 0.2)):
        with pytest.raises(ValueError, match="split"):
            data.load_dataset("digits", cache_dir=None, split=split)
    with pytest.raises(ValueError, match="digits_classes"):
        data.load_dataset("digits", cache_dir=None, digits_classes=3)
    with pytest.raises(ValueError, match="use_dataset_test_split"):
        data.load_dataset("digits", cache_dir=None, use_dataset_test_split=True)
    with pytest.raises(ValueError, match="max_per_class"):
        data.load_dataset("digits", cache_dir=None, max_per_class=2)


# ----------------------------------------------------------------------------- digits


def test_digits_binary_and_ten_class():
    from sklearn.datasets import load_digits

    target = load_digits().target
    binary = data.load_dataset("digits", cache_dir=None, progress=False)
    assert binary.class_names == ("0-4", "5-9") and binary.source == "digits"
    images, labels = all_split(binary)
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [int((target < 5).sum()), int((target >= 5).sum())]
    assert images.min() == 0 and images.max() == 255
    assert (images[..., 0] == images[..., 2]).all()

    ten = data.load_dataset("digits", cache_dir=None, digits_classes=10, progress=False)
    assert ten.num_classes == 10 and ten.class_names[3] == "3"
    assert np.bincount(all_split(ten)[1]).tolist() == np.bincount(target).tolist()
    assert all(min(c) >= 1 for c in split_counts(ten))


def test_digits_images_are_the_upscaled_digits():
    from sklearn.datasets import load_digits

    decoded = sources.decode_digits(10, 32, None)
    original = load_digits().images * (255 / 16)
    pooled = decoded.images[..., 0].reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4))
    corr = [np.corrcoef(p.ravel(), o.ravel())[0, 1] for p, o in zip(pooled, original, strict=True)]
    assert min(corr) > 0.9
    np.testing.assert_array_equal(decoded.labels, load_digits().target)


# ----------------------------------------------------------------------------- tfds


def test_tfds_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        ds = data.load_dataset("tfds:cats_vs_dogs", cache_dir=None, progress=False)
        raw = tfds.data_source("cats_vs_dogs", split="train")
        expected = {}
        for i in range(len(raw)):
            example = raw[i]
            assert example["image"].shape != (32, 32, 3)
            pixels = np.asarray(Image.fromarray(example["image"]).resize((32, 32), Image.Resampling.BILINEAR))
            expected[pixels.tobytes()] = int(example["label"])
    assert ds.class_names == ("cat", "dog") and ds.source == "tfds:cats_vs_dogs"
    images, labels = all_split(ds)
    assert images.shape == (24, 32, 32, 3)
    assert [expected[x.tobytes()] for x in images] == labels.tolist()


TFDS_COUNTS = {"train": 20, "test": 8}


def tfds_value(split, i):
    return (i * 7 + (100 if split == "test" else 0)) % 256


def prepare_tiny_tfds(tfds, data_dir, class_name, counts):
    """Prepares a real array_record TFDS dataset (cat/dog) named after `class_name` in snake case.

    Each image is grey with a value that identifies (split, index); labels alternate.
    """

    def info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["cat", "dog"]),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def generate(self, split):
        for i in range(counts[split]):
            img = Image.new("RGB", (20 + i, 12), (tfds_value(split, i),) * 3)
            yield i, {"image": img, "label": i % 2}

    with tfds.core.registered.skip_registration():
        builder_cls = type(
            class_name,
            (tfds.core.GeneratorBasedBuilder,),
            {
                "VERSION": tfds.core.Version("1.0.0"),
                "_info": info,
                "_split_generators": lambda self, dl: {s: generate(self, s) for s in counts},
                "_generate_examples": generate,
            },
        )
    builder_cls(data_dir=data_dir, file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A data_dir holding 'tiny_pets' (train 20, test 8) and 'tiny_pets_train_only' (train 20)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    prepare_tiny_tfds(tfds, data_dir, "TinyPets", TFDS_COUNTS)
    prepare_tiny_tfds(tfds, data_dir, "TinyPetsTrainOnly", {"train": 20})
    return data_dir


def test_tfds_real_array_record(tiny_tfds, tmp_path, monkeypatch):
    ds = data.load_dataset("tfds:tiny_pets", cache_dir=str(tmp_path), tfds_data_dir=tiny_tfds, progress=False)
    assert ds.class_names == ("cat", "dog")
    images, labels = all_split(ds)
    assert len(labels) == 28 and split_counts(ds) == [[10, 10], [1, 1], [3, 3]]
    assert (images == images[:, :1, :1, :1]).all()

    calls = []
    original = sources.read_tfds_example
    monkeypatch.setattr(sources, "read_tfds_example", lambda *a, **k: calls.append(1) or original(*a, **k))
    own = data.load_dataset(
        "tfds:tiny_pets",
        cache_dir=str(tmp_path),
        tfds_data_dir=tiny_tfds,
        use_dataset_test_split=True,
        progress=False,
    )
    assert calls == []
    test_values = sorted(int(x[0, 0, 0]) for x in own.test_images)
    assert test_values == sorted(tfds_value("test", i) for i in range(8))
    assert split_counts(own) == [[9, 9], [1, 1], [4, 4]]
    for x, y in zip(own.test_images, own.test_labels, strict=True):
        i = [j for j in range(8) if tfds_value("test", j) == x[0, 0, 0]][0]
        assert y == i % 2

    small = data.load_dataset(
        "tfds:tiny_pets",
        cache_dir=None,
        tfds_data_dir=tiny_tfds,
        max_per_class=3,
        use_dataset_test_split=True,
        progress=False,
    )
    assert split_counts(small) == [[2, 2], [1, 1], [3, 3]]

    train_only = data.load_dataset(
        "tfds:tiny_pets_train_only", cache_dir=None, tfds_data_dir=tiny_tfds, progress=False
    )
    assert len(all_split(train_only)[1]) == 20
    with pytest.raises(ValueError, match="no 'test' split"):
        data.load_dataset(
            "tfds:tiny_pets_train_only", cache_dir=None, tfds_data_dir=tiny_tfds, use_dataset_test_split=True
        )


@pytest.mark.parametrize(
    "kw", [{}, {"use_dataset_test_split": True}, {"use_dataset_test_split": True, "max_per_class": 3}]
)
def test_tfds_as_files_lists_the_split_the_memory_kind_decodes(tiny_tfds, tmp_path, kw):
    """The files kind reads a TFDS dataset's labels without decoding its images and splits it as
    `load_dataset` does: the same ids and labels in every split, with or without the dataset's own test split
    and a per-class subset; the labels are cached and read back."""
    from debkd_jax.data import stream

    memory = data.load_dataset(
        "tfds:tiny_pets", cache_dir=None, tfds_data_dir=tiny_tfds, progress=False, **kw
    )
    for _ in range(2):  # the second time from the label cache
        planned = stream.plan_stream(
            "tfds:tiny_pets", seed=0, tfds_data_dir=tiny_tfds, cache_dir=str(tmp_path), **kw
        )
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(planned.splits[split].ids, getattr(memory, f"{split}_ids"))
            np.testing.assert_array_equal(planned.splits[split].labels, getattr(memory, f"{split}_labels"))
    assert any(name.startswith("debkd-tfds-labels-") for name in os.listdir(tmp_path))
    records = planned.splits["test"]
    read = stream.ReadExample(records, 12, train=False, eval_crop=1.0)((0, -1, 0))
    assert read["valid"] and int(read["label"]) == records.labels[0]
    split, index = records.ids[0].split("/")
    import tensorflow_datasets as tfds

    raw = tfds.data_source("tiny_pets", split=split, data_dir=tiny_tfds, download=False)[int(index)]
    assert (read["image"] == raw["image"][0, 0, 0]).all() and int(raw["label"]) == records.labels[0]


def test_tfds_missing_dataset(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match="tfds build cifar10 --file_format=array_record"):
        data.load_dataset("tfds:cifar10", cache_dir=None, tfds_data_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="no_such_dataset_xyz.*tfds build"):
        data.load_dataset("tfds:no_such_dataset_xyz", cache_dir=None, tfds_data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- transforms


def test_normalize():
    x = np.array([[0, 51, 255]], np.uint8)
    np.testing.assert_allclose(data.normalize(x), [[-1.0, -0.6, 1.0]], rtol=1e-6)
    every = np.arange(256, dtype=np.uint8).reshape(4, 4, 4, 4)[..., :3]
    y = jax.jit(data.normalize)(every)
    assert y.dtype == jnp.float32 and y.shape == every.shape
    np.testing.assert_allclose(y, (every / 255.0 - 0.5) / 0.5, atol=1e-6)
    assert float(jax.jit(data.normalize)(np.uint8(255))) == 1.0
    assert float(jax.jit(data.normalize)(np.uint8(0))) == -1.0
    assert data.normalize(x, jnp.bfloat16).dtype == jnp.bfloat16


def numpy_crop_flip(image, dy, dx, flip, pad=4):
    h, w, _ = image.shape
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    out = padded[dy : dy + h, dx : dx + w]
    return out[:, ::-1] if flip else out


def test_augment_matches_numpy_reference():
    images = np.random.default_rng(0).integers(1, 256, (64, 8, 8, 3), dtype=np.uint8)
    rng = jax.random.key(0)
    out = np.asarray(jax.jit(data.augment)(rng, images))
    assert out.shape == images.shape and out.dtype == np.uint8
    seen = set()
    for image, result in zip(images, out, strict=True):
        matches = [
            (dy, dx, f)
            for dy in range(9)
            for dx in range(9)
            for f in (False, True)
            if np.array_equal(numpy_crop_flip(image, dy, dx, f), result)
        ]
        assert len(matches) == 1, "every output is one crop/flip of its input"
        seen.add(matches[0])
    assert {f for _, _, f in seen} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in seen}) > 20
    offsets, flips = batching.augment_params(rng, 64, 4)
    for image, result, (dy, dx), f in zip(images, out, np.asarray(offsets), np.asarray(flips), strict=True):
        np.testing.assert_array_equal(result, numpy_crop_flip(image, dy, dx, f))


def test_augment_properties():
    images = np.random.default_rng(1).normal(size=(512, 6, 6, 3)).astype(np.float32)
    a = data.augment(jax.random.key(1), images)
    assert a.dtype == jnp.float32 and a.shape == images.shape
    np.testing.assert_array_equal(a, data.augment(jax.random.key(1), images))
    assert not np.array_equal(a, data.augment(jax.random.key(2), images))
    offsets, _ = batching.augment_params(jax.random.key(1), 512, 4)
    assert int(offsets.min()) == 0 and int(offsets.max()) == 8
    centre = np.full((512, 2), 4)
    np.testing.assert_array_equal(batching.crop_flip(images, centre, np.zeros(512, bool), 4), images)
    twice = batching.crop_flip(
        batching.crop_flip(images, centre, np.ones(512, bool), 4), centre, np.ones(512, bool), 4
    )
    np.testing.assert_array_equal(twice, images)
    mirrored = data.augment(jax.random.key(3), images, pad=0)
    same = (np.asarray(mirrored) == images).all(axis=(1, 2, 3))
    flipped = (np.asarray(mirrored) == images[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (same | flipped).all() and same.any() and flipped.any()


# ----------------------------------------------------------------------------- batches


def test_batch_indices():
    a = data.batch_indices(103, 10, seed=0, epoch=2)
    assert a.shape == (10, 10) and a.dtype == np.int32
    assert len(set(a.ravel().tolist())) == 100 and a.min() >= 0 and a.max() < 103
    np.testing.assert_array_equal(a, data.batch_indices(103, 10, seed=0, epoch=2))
    assert not np.array_equal(a, data.batch_indices(103, 10, seed=0, epoch=3))
    assert not np.array_equal(a, data.batch_indices(103, 10, seed=1, epoch=2))
    full = data.batch_indices(103, 10, seed=0, epoch=2, drop_remainder=False)
    assert full.shape == (11, 10) and (full[-1] == -1).sum() == 7
    assert sorted(full[full >= 0].tolist()) == list(range(103))
    np.testing.assert_array_equal(full[:10], a)
    ordered = data.batch_indices(7, 3, seed=0, epoch=0, shuffle=False, drop_remainder=False)
    np.testing.assert_array_equal(ordered, [[0, 1, 2], [3, 4, 5], [6, -1, -1]])
    assert data.batch_indices(5, 8, seed=0, epoch=0).shape == (0, 8)
    with pytest.raises(ValueError):
        data.batch_indices(5, 0, seed=0, epoch=0)


def test_make_global_batch_shards_batch_axis():
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    images = np.arange(16 * 4 * 4 * 3, dtype=np.uint8).reshape(16, 4, 4, 3)
    labels = np.arange(16, dtype=np.int32)
    batch = data.make_global_batch({"image": images, "label": labels}, sharding)
    assert set(batch) == {"image", "label"}
    for key, ref in (("image", images), ("label", labels)):
        arr = batch[key]
        assert arr.shape == ref.shape and arr.dtype == ref.dtype and arr.sharding == sharding
        np.testing.assert_array_equal(np.asarray(arr), ref)
        shards = sorted(arr.addressable_shards, key=lambda s: s.index[0].start)
        assert len(shards) == 8
        for i, shard in enumerate(shards):
            assert shard.data.shape[0] == 2
            np.testing.assert_array_equal(np.asarray(shard.data), ref[2 * i : 2 * i + 2])


def test_gather_batch_takes_the_same_rows_of_images_labels_and_targets():
    from debkd_jax import targets as targets_lib

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    rng = np.random.default_rng(0)
    n, k = 40, 3
    dataset = types.SimpleNamespace(
        train_images=rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
        train_labels=rng.integers(0, k, n).astype(np.int32),
    )
    logits = rng.normal(size=(n, k)).astype(np.float32)
    rows = targets_lib.Targets(logits=logits, lo=logits * 0, hi=logits * 0 + 1, correct=np.arange(n) % 2 == 0)
    idx = rng.permutation(n)[:16]
    batch = data.gather_batch(dataset, rows, idx, sharding)
    np.testing.assert_array_equal(np.asarray(batch["image"]), dataset.train_images[idx])
    np.testing.assert_array_equal(np.asarray(batch["label"]), dataset.train_labels[idx])
    assert isinstance(batch["rows"], targets_lib.Targets)
    for got, full in zip(jax.tree.leaves(batch["rows"]), jax.tree.leaves(rows), strict=True):
        assert got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), full[idx])
