"""Teachers through a logits file: a JAX teacher's file gives the in-process student bit for bit, and a
PyTorch teacher written by third_party/write_logits.py trains a student end to end."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT

from debkd_jax import config_lib, models, pipeline, processes, teachers, training, workdir_lib

DATA_FLAGS = dict(image_size=16, max_per_class=40)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def small_config(cache_dir, methods=("KD",)):
    """configs/debkd.py:smoke with DATA_FLAGS, one-epoch students: what the command line below reads too."""
    config = config_lib.smoke(config_lib.base_config(methods))
    config.data.cache_dir = cache_dir
    for field, value in DATA_FLAGS.items():
        config.data[field] = value
    config.teacher.num_epochs = 1
    config.student.num_epochs = 1
    config.student.batch_size = 16
    return config


def test_a_jax_teachers_file_gives_the_in_process_student_bit_for_bit(cache_dir, tmp_path):
    methods = ("KD", "DeBKD")
    in_process = pipeline.train_and_evaluate(small_config(cache_dir, methods), str(tmp_path / "a"))
    config = small_config(cache_dir, methods)
    dataset = pipeline.load_source(config, "memory")
    cached = workdir_lib.read_npz(str(tmp_path / "a" / "teacher" / "logits.npz"))
    path = str(tmp_path / "teacher_logits.npz")
    teachers.write_logits_file(path, dataset, {s: cached[s] for s in ("train", "val", "test")})
    config.teacher.logits = path
    from_file = pipeline.train_and_evaluate(config, str(tmp_path / "b"))

    assert from_file["teacher"]["test"] == in_process["teacher"]["test"]
    for name in methods:
        assert from_file["methods"][name]["test"] == in_process["methods"][name]["test"]
        a = workdir_lib.restore_variables(str(tmp_path / "a" / "students" / f"{name}-seed0" / "final"))
        b = workdir_lib.restore_variables(str(tmp_path / "b" / "students" / f"{name}-seed0" / "final"))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)


def command(tmp_path, cache_dir, *flags):
    data = [f"--config.data.{k}={v}" for k, v in DATA_FLAGS.items()]
    return processes.run(
        [
            sys.executable,
            "-m",
            "third_party.write_logits",
            "--config=configs/debkd.py:smoke",
            f"--config.data.cache_dir={cache_dir}",
            *data,
            *flags,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.peer
def test_a_pytorch_teacher_through_the_file_trains_a_student(cache_dir, tmp_path):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(REPO_ROOT))
    from third_party import torch_peer

    config = small_config(cache_dir)
    dataset = pipeline.load_source(config, "memory")
    # The PyTorch teacher holds the weights of a Flax resnet_tiny, so the file can be checked against JAX.
    flax_model = models.get_model("resnet_tiny", dataset.num_classes)
    variables = flax_model.init(jax.random.key(7), jnp.zeros((1, 16, 16, 3)), train=False)
    variables = jax.tree.map(lambda v: v + 0.1 * jnp.sin(jnp.arange(v.size).reshape(v.shape)), variables)
    variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])
    peer = torch_peer.get_model("resnet_tiny", dataset.num_classes)
    torch_peer.load_flax_params(peer, variables["params"], variables["batch_stats"])
    torch.save(peer.state_dict(), tmp_path / "teacher.pt")

    out = tmp_path / "teacher_logits.npz"
    proc = command(
        tmp_path, cache_dir, "--model=resnet_tiny", f"--weights={tmp_path / 'teacher.pt'}", f"--out={out}"
    )
    assert proc.returncode == 0, proc.stderr
    file = teachers.read_logits_file(str(out))
    aligned = teachers.align_logits(file, dataset)
    predict = training.make_predict_fn(flax_model, jnp.float32)
    for split in ("train", "val", "test"):
        expected = np.asarray(predict(variables, dataset.splits[split].images)[0])
        np.testing.assert_allclose(aligned[split], expected, rtol=1e-4, atol=1e-4)

    config.teacher.logits = str(out)
    results = pipeline.train_and_evaluate(config, str(tmp_path / "w"))
    teacher_accuracy = float(np.mean(np.argmax(aligned["test"], -1) == dataset.splits["test"].labels))
    assert results["teacher"]["test"]["accuracy"] == pytest.approx(teacher_accuracy)
    assert os.path.isdir(tmp_path / "w" / "students" / "KD-seed0" / "final")


def linear_torch_net(num_classes):
    """A `module:function` factory for the command: flatten (NCHW) then a linear layer with fixed weights."""
    import torch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, num_classes))
    with torch.no_grad():
        weight = torch.sin(torch.arange(net[1].weight.numel(), dtype=torch.float32))
        net[1].weight.copy_(weight.reshape(num_classes, 768))
        net[1].bias.copy_(torch.arange(num_classes, dtype=torch.float32))
    return net


@pytest.mark.peer
def test_a_module_function_factory_sees_the_images_as_the_jax_models_do(cache_dir, tmp_path):
    pytest.importorskip("torch")
    sys.path.insert(0, str(REPO_ROOT))
    from third_party import write_logits

    config = small_config(cache_dir)
    out = str(tmp_path / "t.npz")
    write_logits.write_logits(config, "test_write_logits:linear_torch_net", "", out, batch_size=7)
    dataset = pipeline.load_source(config, "memory")
    aligned = teachers.align_logits(teachers.read_logits_file(out), dataset)
    net = linear_torch_net(dataset.num_classes)
    w, b = net[1].weight.detach().numpy(), net[1].bias.detach().numpy()
    for split in ("train", "val", "test"):
        x = (dataset.splits[split].images.astype(np.float32) - 127.5) / 127.5  # NHWC in [-1, 1]
        expected = x.transpose(0, 3, 1, 2).reshape(len(x), -1) @ w.T + b
        np.testing.assert_allclose(aligned[split], expected, rtol=1e-4, atol=1e-3)


@pytest.mark.peer
def test_weights_of_another_model_give_one_error_line_and_no_file(cache_dir, tmp_path):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(REPO_ROOT))
    from third_party import torch_peer

    torch.save(torch_peer.get_model("resnet8", 2).state_dict(), tmp_path / "resnet8.pt")
    out = tmp_path / "t.npz"
    proc = command(
        tmp_path, cache_dir, "--model=resnet_tiny", f"--weights={tmp_path / 'resnet8.pt'}", f"--out={out}"
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not load into --model" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
