"""Parity of the PyTorch peer (third_party/torch_peer) with debkd_jax.models."""

import functools
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from debkd_jax import models  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from third_party import torch_peer  # noqa: E402
from third_party.torch_peer import train as peer_train  # noqa: E402

pytestmark = pytest.mark.peer

TINY_BOTTLENECK = dict(stage_sizes=(2, 1), num_classes=3, stem_width=4, widths=(2, 4), strides=(1, 2))


def random_variables(model, seed=0):
    """NumPy-drawn variables with BatchNorm scale/bias/mean/var away from 1/0/0/1, so the test can fail."""
    rng = np.random.default_rng(seed)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, size=leaf.shape)
        else:
            value = 0.2 * rng.normal(size=leaf.shape)
        return np.asarray(value, np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.mark.parametrize("config", ["resnet_tiny", "resnet8", "tiny_bottleneck"])
def test_eval_logits_match(config):
    if config == "tiny_bottleneck":
        flax_model = models.ResNet(block_cls=models.Bottleneck, **TINY_BOTTLENECK)
        torch_model = torch_peer.ResNet(block_cls=torch_peer.Bottleneck, **TINY_BOTTLENECK)
    else:
        flax_model = models.get_model(config, 10)
        torch_model = torch_peer.get_model(config, 10)
    variables = random_variables(flax_model)
    torch_peer.load_flax_params(torch_model, variables["params"], variables["batch_stats"])
    torch_model.eval()

    x = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype(np.float32)
    logits, blocks = flax_model.apply(variables, x, train=False)
    with torch.no_grad():
        t_logits, t_blocks = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2))
    np.testing.assert_allclose(t_logits.numpy(), logits, rtol=1e-4, atol=1e-4)
    assert len(t_blocks) == len(blocks)
    for tb, fb in zip(t_blocks, blocks, strict=True):
        np.testing.assert_allclose(tb.permute(0, 2, 3, 1).numpy(), fb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet8", "resnet8x4", "resnet18", "resnet50"])
def test_param_counts_match(name):
    for num_classes in (2, 100):
        flax_model = models.get_model(name, num_classes)
        x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
        abstract = jax.eval_shape(functools.partial(flax_model.init, train=False), jax.random.key(0), x)
        torch_model = torch_peer.get_model(name, num_classes)
        n_torch = sum(p.numel() for p in torch_model.parameters())
        assert n_torch == models.count_params(abstract["params"])
        n_stats = sum(b.numel() for n, b in torch_model.named_buffers() if "running" in n)
        assert n_stats == models.count_params(abstract["batch_stats"])


def test_load_rejects_incomplete_tree():
    flax_model = models.get_model("resnet_tiny", 10)
    variables = random_variables(flax_model)
    params = {k: v for k, v in variables["params"].items() if k != "head"}
    with pytest.raises(ValueError, match="head"):
        torch_peer.load_flax_params(torch_peer.get_model("resnet_tiny", 10), params, variables["batch_stats"])


def test_autocast_step_computes_in_bfloat16_and_keeps_float32_parameters():
    torch.manual_seed(0)
    model = torch_peer.get_model("resnet_tiny", 2)
    seen = []
    model.head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    before = model.head.weight.detach().clone()
    step = peer_train.make_train_step(model, autocast_dtype=torch.bfloat16)
    loss = step(torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4,)))
    assert np.isfinite(loss) and seen == [torch.bfloat16]
    assert model.head.weight.dtype == torch.float32 and not torch.equal(before, model.head.weight)
    peer_train.make_train_step(model)(torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4,)))
    assert seen[-1] == torch.float32  # without autocast the step stays float32


def test_train_steps_run_and_time():
    torch.manual_seed(0)
    student = torch_peer.get_model("resnet_tiny", 2)
    teacher = torch_peer.get_model("resnet_tiny", 2)
    images = torch.randn(8, 3, 32, 32)
    labels = torch.randint(0, 2, (8,))
    before = student.head.weight.detach().clone()
    kd_step = peer_train.make_kd_train_step(student, teacher)
    losses = [kd_step(images, labels) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert not torch.equal(before, student.head.weight)
    assert all(p.grad is None for p in teacher.parameters())
    step = peer_train.make_train_step(torch_peer.get_model("resnet_tiny", 2))
    ips = peer_train.images_per_second(step, batch_size=4, steps=2, warmup=1)
    assert ips > 0


def test_no_strided_1x1_conv_with_few_inputs_reaches_onednn_and_the_subsampled_one_is_exact():
    """The peers' strided 1x1 convs with fewer than 16 input channels (oneDNN's faulty kernel: pointwise.py)
    are `SubsampledConv1x1`s, whose output and gradients equal a plain strided conv computed without oneDNN;
    the benchmark models keep plain `nn.Conv2d`s."""
    from third_party.torch_peer import pointwise

    def strided_pointwise(model):
        return [
            m
            for m in model.modules()
            if isinstance(m, torch.nn.Conv2d)
            and m.kernel_size == (1, 1)
            and (m.stride != (1, 1) or isinstance(m, pointwise.SubsampledConv1x1))
        ]

    tiny = strided_pointwise(torch_peer.get_model("resnet_tiny", 2))
    assert tiny and all(isinstance(m, pointwise.SubsampledConv1x1) for m in tiny)
    for name in ("resnet8", "resnet18", "imagenet_resnet18"):
        assert not any(
            isinstance(m, pointwise.SubsampledConv1x1)
            for m in strided_pointwise(torch_peer.get_model(name, 2))
        )
    torch.manual_seed(0)
    conv = pointwise.conv1x1(4, 8, 2)
    plain = torch.nn.Conv2d(4, 8, 1, stride=2, bias=False)
    plain.weight.data.copy_(conv.weight.data)
    x = torch.randn(8, 4, 17, 15).contiguous(memory_format=torch.channels_last)
    g = torch.randn(8, 8, 9, 8)
    y = conv(x)
    y.backward(g)
    with torch.backends.mkldnn.flags(enabled=False):
        y_ref = plain(x)
        y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-4)


def test_the_tiny_peer_trains_on_one_and_two_threads():
    """`resnet_tiny` has the 4 -> 8 stride-2 shortcut that crashed (1 thread) or gave wrong gradients (2)
    before the peer routed it around oneDNN's fault."""
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            step = peer_train.make_train_step(torch_peer.get_model("resnet_tiny", 2))
            images = torch.randn(32, 3, 32, 32)
            labels = torch.randint(0, 2, (32,))
            losses = [step(images, labels) for _ in range(3)]
            assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    finally:
        torch.set_num_threads(previous)
