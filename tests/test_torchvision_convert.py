"""ImageNet ResNets: torchvision-layout state_dict -> Flax variables (third_party/torchvision_to_flax.py)
gives
the same eval-mode logits."""

import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from debkd_jax import models  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from third_party import torchvision_to_flax  # noqa: E402
from third_party.torch_peer import torchvision_resnet  # noqa: E402

pytestmark = pytest.mark.peer


def randomized(model, seed: int):
    """`model` in eval mode with BatchNorm weight/bias/mean/var drawn away from 1/0/0/1, so the test can
    fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
                m.running_mean.normal_(0.0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet_tiny"])
def test_converted_torchvision_resnet_gives_the_same_logits(name):
    torch.manual_seed(0)
    torch_model = randomized(torchvision_resnet.MODELS[name](num_classes=7), seed=1)
    # 35 pixels: odd sizes check the stem's and max-pool's padding (torch pads both sides).
    x = np.random.default_rng(2).normal(size=(2, 35, 35, 3)).astype(np.float32)
    x_torch = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():  # logits of a trained network's scale (std 5), so that 1e-4 is float32's, not 1e-6
        torch_model.fc.weight.mul_(5.0 / torch_model(x_torch).std())
        expected = torch_model(x_torch).numpy()
    state_dict = torch_model.state_dict()
    arch = torchvision_to_flax.architecture(state_dict)
    flax_name = torchvision_to_flax.model_name(arch)
    assert flax_name == f"imagenet_{name}"
    variables = torchvision_to_flax.convert(state_dict)
    flax_model = models.get_model(flax_name, arch["num_classes"])
    logits, _ = jax.jit(lambda v, x: flax_model.apply(v, x, train=False))(variables, x)
    assert np.max(np.abs(np.asarray(logits) - expected)) <= 1e-4
    # The converted tree is exactly the model's (no extra or missing variables, same shapes).
    abstract = jax.eval_shape(
        lambda: flax_model.init(jax.random.key(0), jnp.zeros((1, 35, 35, 3)), train=False)
    )
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, variables)


def test_converter_unwraps_checkpoints_and_rejects_foreign_keys():
    sd = torchvision_resnet.resnet_tiny(num_classes=3).state_dict()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    a = torchvision_to_flax.convert(wrapped)
    b = torchvision_to_flax.convert(sd)
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
    with pytest.raises(ValueError, match="no place"):
        torchvision_to_flax.convert({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="conv1.weight"):
        torchvision_to_flax.convert({"head.weight": torch.zeros(1)})


def test_a_pretrained_torchvision_teacher_sees_its_own_input_normalization():
    """torchvision's network on `(u / 255 - mean) / std` == the converted `torchvision_*` preset on the
    project's `(u / 255 - 0.5) / 0.5` of the same uint8 images."""
    torch.manual_seed(3)
    torch_model = randomized(torchvision_resnet.MODELS["resnet_tiny"](num_classes=5), seed=4)
    images = np.random.default_rng(5).integers(0, 256, size=(3, 33, 33, 3)).astype(np.uint8)
    mean = np.asarray(models.resnet.IMAGENET_MEAN, np.float32)
    std = np.asarray(models.resnet.IMAGENET_STD, np.float32)
    x_torchvision = (images.astype(np.float32) / 255.0 - mean) / std
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x_torchvision).permute(0, 3, 1, 2)).numpy()
    name = torchvision_to_flax.with_torchvision_inputs(
        torchvision_to_flax.model_name(torchvision_to_flax.architecture(torch_model.state_dict()))
    )
    assert name == "torchvision_resnet_tiny"
    flax_model = models.get_model(name, 5)
    variables = torchvision_to_flax.convert(torch_model.state_dict())
    x_project = (images.astype(np.float32) - 127.5) / 127.5
    logits, _ = flax_model.apply(variables, x_project, train=False)
    assert np.max(np.abs(np.asarray(logits) - expected)) <= 1e-4
    # The project-input preset of the same weights sees other inputs, and so computes other logits.
    other, _ = models.get_model("imagenet_resnet_tiny", 5).apply(variables, x_project, train=False)
    assert np.max(np.abs(np.asarray(other) - expected)) > 1e-2
