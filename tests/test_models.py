"""Tests for debkd_jax.models.

Reference parameter counts (trainable scalars; BatchNorm running statistics excluded), equal to the PyTorch
definitions of mdistiller `resnet.py` (resnet8, resnet8x4) and kuangliu/mdistiller `resnetv2.py` (ResNet18,
ResNet50), and to `third_party/torch_peer` (checked in tests/test_torch_peer.py):

    classes       2            10           100
    resnet8       77,522       78,042       83,892
    resnet8x4     1,208,354    1,210,410    1,233,540
    resnet18      11,169,858   11,173,962   11,220,132
    resnet50      23,504,450   23,520,842   23,705,252
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debkd_jax import models

REFERENCE_PARAM_COUNTS = {
    "resnet8": {2: 77_522, 10: 78_042, 100: 83_892},
    "resnet8x4": {2: 1_208_354, 10: 1_210_410, 100: 1_233_540},
    "resnet18": {2: 11_169_858, 10: 11_173_962, 100: 11_220_132},
    "resnet50": {2: 23_504_450, 10: 23_520_842, 100: 23_705_252},
}

# (block, blocks per stage, stem width, stage widths, stage strides), written independently of the models.
ARCHS = {
    "resnet8": ("basic", (1, 1, 1), 16, (16, 32, 64), (1, 2, 2)),
    "resnet8x4": ("basic", (1, 1, 1), 32, (64, 128, 256), (1, 2, 2)),
    "resnet18": ("basic", (2, 2, 2, 2), 64, (64, 128, 256, 512), (1, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 64, (64, 128, 256, 512), (1, 2, 2, 2)),
    "resnet_tiny": ("basic", (1, 1), 4, (4, 8), (1, 2)),
}

# (H, W, C) of every block output for a 32x32 input.
BLOCK_SHAPES = {
    "resnet8": [(32, 32, 16), (16, 16, 32), (8, 8, 64)],
    "resnet8x4": [(32, 32, 64), (16, 16, 128), (8, 8, 256)],
    "resnet18": [(32, 32, 64)] * 2 + [(16, 16, 128)] * 2 + [(8, 8, 256)] * 2 + [(4, 4, 512)] * 2,
    "resnet50": [(32, 32, 256)] * 3 + [(16, 16, 512)] * 4 + [(8, 8, 1024)] * 6 + [(4, 4, 2048)] * 3,
    "resnet_tiny": [(32, 32, 4), (16, 16, 8)],
}


def closed_form_param_count(name: str, num_classes: int) -> int:
    """Sum over layers: conv k*k*cin*cout (no bias), BatchNorm 2*c, dense (cin+1)*classes."""
    block, sizes, stem, widths, strides = ARCHS[name]

    def conv(k, cin, cout):
        return k * k * cin * cout

    def bn(c):
        return 2 * c

    n, cin = conv(3, 3, stem) + bn(stem), stem
    for size, width, stride in zip(sizes, widths, strides, strict=True):
        for j in range(size):
            s = stride if j == 0 else 1
            if block == "basic":
                cout = width
                n += conv(3, cin, width) + bn(width) + conv(3, width, width) + bn(width)
            else:
                cout = 4 * width
                n += conv(1, cin, width) + bn(width) + conv(3, width, width) + bn(width)
                n += conv(1, width, cout) + bn(cout)
            if s != 1 or cin != cout:
                n += conv(1, cin, cout) + bn(cout)
            cin = cout
    return n + (cin + 1) * num_classes


def abstract_variables(model, batch=2, hw=32):
    x = jax.ShapeDtypeStruct((batch, hw, hw, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


pytestmark = pytest.mark.usefixtures("fast_compiles")


def images(batch=4, hw=32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, hw, hw, 3)), jnp.float32)


def init(model, batch=4, hw=32):
    """The model's own initialisation (jitted: one compile instead of one per op)."""
    x = images(batch, hw)
    return jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x), x


def random_variables(model, seed=0):
    """NumPy-drawn variables, with BatchNorm scale/bias/mean/var away from 1/0/0/1 so every branch matters."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, size=leaf.shape)
        else:
            value = 0.2 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_variables(model))


def conv_nhwc(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("num_classes", [2, 10, 100])
@pytest.mark.parametrize("name", ["resnet8", "resnet8x4", "resnet18", "resnet50", "resnet_tiny"])
def test_output_shapes_and_param_counts(name, num_classes):
    model = models.get_model(name, num_classes)
    variables = abstract_variables(model)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    logits, blocks = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    assert logits.shape == (2, num_classes) and logits.dtype == jnp.float32
    assert [b.shape for b in blocks] == [(2, *s) for s in BLOCK_SHAPES[name]]
    n = models.count_params(variables["params"])
    assert n == closed_form_param_count(name, num_classes)
    if name in REFERENCE_PARAM_COUNTS:
        assert n == REFERENCE_PARAM_COUNTS[name][num_classes]


def test_variable_names():
    params = abstract_variables(models.get_model("resnet8", 10))["params"]
    assert set(params) == {"stem_conv", "stem_bn", "block_0", "block_1", "block_2", "head"}
    assert set(params["block_0"]) == {"conv1", "bn1", "conv2", "bn2"}
    assert set(params["block_1"]) == {"conv1", "bn1", "conv2", "bn2", "proj_conv", "proj_bn"}
    assert params["block_2"]["proj_conv"]["kernel"].shape == (1, 1, 32, 64)
    assert params["head"]["kernel"].shape == (64, 10)
    bottleneck = abstract_variables(models.get_model("resnet50", 10), batch=1)["params"]
    assert set(bottleneck["block_0"]) == {f"{k}{i}" for k in ("conv", "bn") for i in (1, 2, 3)} | {
        "proj_conv", "proj_bn"}
    assert "proj_conv" not in bottleneck["block_1"]
    assert bottleneck["block_3"]["conv2"]["kernel"].shape == (3, 3, 128, 128)


@pytest.mark.parametrize("name", ["resnet_tiny", "resnet8"])
def test_block_outputs_feed_the_head(name):
    model = models.get_model(name, 10)
    variables, x = random_variables(model), images()
    logits, blocks = model.apply(variables, x, train=False)
    assert [b.shape[1:] for b in blocks] == BLOCK_SHAPES[name]
    assert all(bool(jnp.all(b >= 0)) for b in blocks)
    head = variables["params"]["head"]
    expected = jnp.mean(blocks[-1], axis=(1, 2)) @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_any_spatial_size():
    model = models.get_model("resnet_tiny", 3)
    variables, x = random_variables(model), images(batch=2, hw=17)
    logits, blocks = model.apply(variables, x, train=False)
    assert logits.shape == (2, 3)
    assert [b.shape for b in blocks] == [(2, 17, 17, 4), (2, 9, 9, 8)]


def test_train_mode_updates_batch_stats_with_batch_statistics():
    model = models.get_model("resnet_tiny", 10)
    variables, x = random_variables(model), images(batch=8)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    kernel = variables["params"]["stem_conv"]["kernel"]
    h = conv_nhwc(x, kernel, 1, ((1, 1), (1, 1)))
    old = variables["batch_stats"]["stem_bn"]
    new = updates["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * h.mean((0, 1, 2)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * h.var((0, 1, 2)),
                               rtol=1e-5, atol=1e-6)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                           updates["batch_stats"])
    assert all(jax.tree.leaves(changed))


def test_train_mode_depends_on_batch_eval_mode_does_not():
    model = models.get_model("resnet_tiny", 10)
    variables, x = random_variables(model), images(batch=4)

    def train_logits(xs):
        return model.apply(variables, xs, train=True, mutable=["batch_stats"])[0][0]

    def eval_logits(xs):
        return model.apply(variables, xs, train=False)[0]

    np.testing.assert_allclose(eval_logits(x)[:1], eval_logits(x[:1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eval_logits(x)[:2], eval_logits(x[:2]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(train_logits(x)[:2], train_logits(x[:2]), atol=1e-4)

    shifted = jax.tree.map(lambda s: s + 0.5, variables["batch_stats"])
    moved = {**variables, "batch_stats": shifted}
    assert not np.allclose(model.apply(moved, x, train=False)[0], eval_logits(x), atol=1e-4)
    np.testing.assert_allclose(
        model.apply(moved, x, train=True, mutable=["batch_stats"])[0][0], train_logits(x),
        rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_dtype():
    model32 = models.get_model("resnet8", 10)
    model16 = models.get_model("resnet8", 10, dtype="bfloat16")
    assert model16.dtype == jnp.bfloat16
    abstract16 = abstract_variables(model16)
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract16)} == {jnp.dtype(jnp.float32)}
    variables, x = random_variables(model32), images()
    logits32, _ = model32.apply(variables, x, train=False)
    logits16, blocks16 = model16.apply(variables, x, train=False)
    assert logits16.dtype == jnp.float32
    assert blocks16[-1].dtype == jnp.bfloat16
    scale = float(jnp.abs(logits32).max())
    np.testing.assert_allclose(logits16, logits32, atol=0.05 * scale)
    assert not np.array_equal(logits16, logits32)


def assert_blocks_are_relu_of_shortcut(model, strides, last_bn, hw=32):
    """At init every residual branch is zero, so block_i(h) = relu(h) = h or relu(proj_bn(proj_conv(h)))."""
    variables, x = init(model, batch=2, hw=hw)
    params = variables["params"]
    bn_gain = 1 / np.sqrt(1 + 1e-5)
    _, blocks = model.apply(variables, x, train=False)
    h = jax.nn.relu(conv_nhwc(x, params["stem_conv"]["kernel"], 1, ((1, 1), (1, 1))) * bn_gain)
    for i, (out, stride) in enumerate(zip(blocks, strides, strict=True)):
        block = params[f"block_{i}"]
        assert not jnp.any(block[last_bn]["scale"])
        assert jnp.all(block["bn1"]["scale"] == 1)
        assert ("proj_conv" in block) == (stride != 1 or h.shape[-1] != out.shape[-1])
        shortcut = h
        if "proj_conv" in block:
            shortcut = conv_nhwc(h, block["proj_conv"]["kernel"], stride, "VALID") * bn_gain
        np.testing.assert_allclose(out, jax.nn.relu(shortcut), rtol=1e-5, atol=1e-5)
        h = out


def test_zero_init_basic_blocks():
    assert_blocks_are_relu_of_shortcut(models.get_model("resnet8", 10), (1, 2, 2), "bn2")


def test_zero_init_bottleneck_blocks():
    model = models.ResNet(stage_sizes=(2, 1), block_cls=models.Bottleneck, num_classes=2, stem_width=4,
                          widths=(2, 4), strides=(1, 2))
    assert_blocks_are_relu_of_shortcut(model, (1, 1, 2), "bn3", hw=8)


def test_get_model_errors():
    with pytest.raises(ValueError, match="resnet18.*resnet50.*resnet8.*resnet8x4.*resnet_tiny"):
        models.get_model("resnet34", 10)
    for bad in (1, 0, -3):
        with pytest.raises(ValueError, match="num_classes"):
            models.get_model("resnet8", bad)
    with pytest.raises(ValueError, match="dtype"):
        models.get_model("resnet8", 10, dtype="int32")
    with pytest.raises(ValueError, match="dtype"):
        models.get_model("resnet8", 10, dtype="not-a-dtype")
    model = models.get_model("resnet18", 7, dtype=jnp.bfloat16)
    assert (model.num_classes, model.dtype, model.block_cls) == (7, jnp.bfloat16, models.BasicBlock)


def test_hint_regressor():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    reg = models.HintRegressor(features=64)
    variables = jax.jit(functools.partial(reg.init, target_hw=(8, 8), train=False))(jax.random.key(1), x)
    assert variables["params"]["conv"]["kernel"].shape == (1, 1, 16, 64)
    assert set(variables["batch_stats"]["bn"]) == {"mean", "var"}
    kernel = variables["params"]["conv"]["kernel"]
    same = reg.apply(variables, x, target_hw=(8, 8), train=False)
    np.testing.assert_allclose(same, conv_nhwc(x, kernel, 1, "VALID") / np.sqrt(1 + 1e-5),
                               rtol=1e-5, atol=1e-5)
    up = reg.apply(variables, x, target_hw=(16, 16), train=False)
    down = reg.apply(variables, x, target_hw=(4, 4), train=False)
    assert up.shape == (2, 16, 16, 64) and down.shape == (2, 4, 4, 64)
    np.testing.assert_allclose(up, jax.image.resize(same, (2, 16, 16, 64), "bilinear"), atol=1e-5)
    np.testing.assert_allclose(up.mean((1, 2)), same.mean((1, 2)), atol=1e-4)
    out, updates = reg.apply(variables, x, target_hw=(4, 4), train=True, mutable=["batch_stats"])
    assert out.shape == (2, 4, 4, 64)
    assert jnp.any(updates["batch_stats"]["bn"]["mean"] != 0)


def test_feature_taps():
    assert models.feature_taps(16, "teacher") == (0, 2, 15)
    assert models.feature_taps(8, "teacher") == (0, 2, 7)
    assert models.feature_taps(3, "teacher") == (0, 2)
    assert models.feature_taps(2, "teacher") == (0, 1)
    assert models.feature_taps(1, "teacher") == (0,)
    assert models.feature_taps(16, "student") == (0, 8, 15)
    assert models.feature_taps(8, "student") == (0, 4, 7)
    assert models.feature_taps(3, "student") == (0, 1, 2)
    assert models.feature_taps(2, "student") == (0, 1)
    assert models.feature_taps(1, "student") == (0,)
    with pytest.raises(ValueError):
        models.feature_taps(3, "both")
    with pytest.raises(ValueError):
        models.feature_taps(0, "teacher")


def test_count_params_on_arrays():
    model = models.get_model("resnet_tiny", 10)
    params = random_variables(model)["params"]
    assert models.count_params(params) == closed_form_param_count("resnet_tiny", 10) == 1454
    assert models.count_params({"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4)]}) == 10
    assert isinstance(models.MODELS["resnet50"](num_classes=2), nn.Module)


def _value_and_grads(model, variables, x):
    """Jitted train-mode loss over logits and every block output, its gradients w.r.t. params and input, and
    the BatchNorm updates."""

    def loss(params, x):
        (logits, blocks), updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                                x, train=True, mutable=["batch_stats"])
        value = jnp.sum(jnp.sin(logits)) + sum(jnp.mean(b * jnp.cos(b)) for b in blocks)
        return value, updates

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], x)


@pytest.mark.parametrize("bottleneck", [False, True], ids=["basic", "bottleneck"])
def test_materialized_conv_backward_gives_the_same_values_and_gradients(bottleneck):
    """conv_backward="materialized" (the conv VJP through a fusion barrier) changes neither the variables nor
    the values nor the gradients w.r.t. params and input, under jit."""
    if bottleneck:
        make = functools.partial(models.ResNet, stage_sizes=(1, 1), block_cls=models.Bottleneck,
                                 num_classes=3, stem_width=4, widths=(2, 4), strides=(1, 2))
        xla, materialized = make(), make(conv=models.MaterializedConv)
    else:
        xla = models.get_model("resnet_tiny", 3)
        materialized = models.get_model("resnet_tiny", 3, conv_backward="materialized")
    assert xla.conv_backward == "xla" and materialized.conv_backward == "materialized"
    assert abstract_variables(xla, hw=8) == abstract_variables(materialized, hw=8)
    variables, x = random_variables(xla), images(batch=4, hw=8)
    (value, updates), (g_params, g_x) = _value_and_grads(xla, variables, x)
    (value_m, updates_m), (g_params_m, g_x_m) = _value_and_grads(materialized, variables, x)
    np.testing.assert_allclose(value_m, value, rtol=1e-5, atol=1e-5)
    assert jnp.abs(g_x).max() > 0
    np.testing.assert_allclose(g_x_m, g_x, rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(g_params_m) == jax.tree.structure(g_params)
    for a, b in zip(jax.tree.leaves(g_params_m) + jax.tree.leaves(updates_m),
                    jax.tree.leaves(g_params) + jax.tree.leaves(updates), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # The materialized backward does hold the barrier (one identity cond per conv); the plain one none.
    def grad_jaxpr(model):
        return str(jax.make_jaxpr(lambda p: _value_and_grads(model, {**variables, "params": p}, x)[1])(
            variables["params"]))
    n_convs = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])
                  if "conv" in jax.tree_util.keystr(path))
    assert grad_jaxpr(materialized).count("cond[") == n_convs
    assert "cond[" not in grad_jaxpr(xla)


def test_materialized_hint_regressor_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 6))
    regs = [models.HintRegressor(features=5, conv=models.CONV_BACKWARDS[c]) for c in ("xla", "materialized")]
    variables = regs[0].init(jax.random.key(1), x, target_hw=(4, 4), train=False)

    def grads(reg):
        def loss(params, x):
            out, _ = reg.apply({**variables, "params": params}, x, target_hw=(4, 4), train=True,
                               mutable=["batch_stats"])
            return jnp.sum(jnp.sin(out))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)

    for a, b in zip(jax.tree.leaves(grads(regs[1])), jax.tree.leaves(grads(regs[0])), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fusion_barrier_is_the_identity():
    for x in (jnp.arange(6.0).reshape(2, 3) - 2.0, jnp.array([jnp.nan, -0.0, jnp.inf]),
              jnp.ones((2, 2), jnp.bfloat16)):
        y = jax.jit(models.fusion_barrier)(x)
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(x, np.float32))
        assert np.array_equal(np.signbit(np.asarray(y, np.float32)), np.signbit(np.asarray(x, np.float32)))


def test_unknown_conv_backward_is_refused():
    for bad in ("auto", "lax", "", None):
        one_of = r"conv_backward must be one of \('xla', 'materialized', 'onednn'\)"
        with pytest.raises(ValueError, match=one_of):
            models.get_model("resnet_tiny", 2, conv_backward=bad)
    custom = functools.partial(nn.Conv, precision="highest")
    model = models.ResNet(stage_sizes=(1,), block_cls=models.BasicBlock, num_classes=2, stem_width=4,
                          widths=(4,), strides=(1,), conv=custom)
    with pytest.raises(ValueError, match="none of CONV_BACKWARDS"):
        model.conv_backward  # noqa: B018 - the property raises


def test_models_built_alike_are_equal_and_carry_their_conv():
    """get_model injects one module-level conv per conv_backward, so equal calls give equal, equally hashed
    modules (jit and lru caches keyed on the module hit); the model reports which conv it was built with."""
    for setting in models.CONV_BACKWARDS:
        a, b = (models.get_model("resnet_tiny", 2, conv_backward=setting) for _ in range(2))
        assert a == b and hash(a) == hash(b)
        assert a.conv is models.CONV_BACKWARDS[setting] and a.conv_backward == setting
        assert models.conv_backward_of(a.conv) == setting
    assert models.get_model("resnet_tiny", 2) != models.get_model("resnet_tiny", 2, "float32", "materialized")
    assert models.CONV_BACKWARD_SETTINGS == ("auto", "xla", "materialized", "onednn")



def test_channel_sums_are_the_sums_over_every_axis_but_the_last():
    x = jax.random.normal(jax.random.key(0), (64, 16, 16, 8)) * 3 + 2
    want = np.asarray(x, np.float64).reshape(-1, 8).sum(0)
    got = np.asarray(jax.jit(models.channel_sums)(x), np.float64)
    assert np.max(np.abs(got - want) / np.abs(want)) < 1e-6  # partial sums keep float32 error small
    odd = jax.random.normal(jax.random.key(1), (3, 5, 7))
    np.testing.assert_allclose(models.channel_sums(odd), odd.sum((0, 1)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dot_sum_batch_norm_trains_as_flax_batch_norm(dtype):
    """The CPU BatchNorm of conv_backward="onednn": same variables, outputs, running averages and gradients
    (w.r.t. input, scale and bias) as nn.BatchNorm, in training and in eval mode."""
    x = (jax.random.normal(jax.random.key(0), (8, 6, 6, 5)) * 2 + 1).astype(dtype)
    cot = jax.random.normal(jax.random.key(1), x.shape)
    norms = {name: models.NORMS[name](dtype=dtype) for name in ("xla", "onednn")}
    variables = norms["xla"].init(jax.random.key(2), x, use_running_average=False)
    variables = {**variables, "params": {"scale": jnp.linspace(0.5, 2, 5), "bias": jnp.linspace(-1, 1, 5)}}
    assert jax.tree.map(jnp.shape, norms["onednn"].init(jax.random.key(2), x, use_running_average=False)) == (
        jax.tree.map(jnp.shape, variables))

    def run(norm):
        def loss(params, x):
            y, upd = norm.apply({**variables, "params": params}, x, use_running_average=False,
                                mutable=["batch_stats"])
            return jnp.sum(jnp.asarray(y, jnp.float32) * cot), (y, upd)

        (_, (y, upd)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(variables["params"], x)
        eval_y = norm.apply({**variables, **upd}, x, use_running_average=True)
        return y, upd, grads, eval_y

    tol = 1e-5 if dtype == "float32" else 2e-2
    for a, b in zip(jax.tree.leaves(run(norms["onednn"])), jax.tree.leaves(run(norms["xla"])), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
    assert models.norm_for("onednn") is models.CpuBatchNorm and models.norm_for("xla") is models.BatchNorm
    with pytest.raises(ValueError, match="conv_backward must be one of"):
        models.norm_for("fast")
