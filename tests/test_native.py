"""The oneDNN conv behind XLA FFI calls (`debkd_jax.native`, `conv_backward="onednn"`): values and both
gradients against `lax.conv_general_dilated` at every conv of the presets, a whole train step against the
plain XLA conv, the compiled gradient, the fallback when the library cannot be built, and determinism.

Where the library cannot be built (no compiler, no `.[native]` extra) these tests skip and say why; under CI
(`CI=true`, where `.ci/run` installs the extra) they fail instead."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT
from jax.test_util import check_grads

from debkd_jax import config_lib, methods, models, native, processes, training
from debkd_jax.native import check

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(scope="module", autouse=True)
def native_conv():
    status = native.status()
    if not status.ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs the native extra, yet the native conv does not run: {status.reason}")
        pytest.skip(f"the native conv cannot run here: {status.reason}")
    return status


def conv_geometries(model_name: str) -> list[tuple]:
    """(x shape, w shape, strides, padding) of every distinct conv of the preset, at batch 2 and 32x32."""
    seen = {}

    def recording_conv(lhs, rhs, window_strides, padding, **kw):
        seen[(lhs.shape, rhs.shape, tuple(window_strides), str(padding))] = (
            lhs.shape,
            rhs.shape,
            tuple(window_strides),
            padding,
        )
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)

    conv = functools.partial(nn.Conv, conv_general_dilated=recording_conv)
    model = models.MODELS[model_name](num_classes=2, conv=conv)
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), jnp.zeros((2, 32, 32, 3)))
    return list(seen.values())


@functools.partial(jax.jit, static_argnums=(3, 4))
def native_and_xla(x, w, g, strides, padding):
    """(y, dx, dw) of the native conv and of `lax.conv_general_dilated`, for the cotangent g."""

    def run(conv):
        return jax.vjp(lambda x, w: conv(x, w, strides, padding, dimension_numbers=NHWC), x, w)

    (y_n, vjp_n), (y_x, vjp_x) = run(models.conv_general_dilated_onednn), run(jax.lax.conv_general_dilated)
    return (y_n, *vjp_n(g)), (y_x, *vjp_x(g))


def assert_close_relative(got, want, rtol=1e-5):
    """max |got - want| <= rtol * max |want|, leaf by leaf."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape
        scale = max(float(np.max(np.abs(b))), 1e-30)
        assert float(np.max(np.abs(a - b))) <= rtol * scale, float(np.max(np.abs(a - b))) / scale


def check_geometry(x_shape, w_shape, strides, padding):
    kx, kw, kg = jax.random.split(jax.random.key(sum(x_shape) + sum(w_shape)), 3)
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, w_shape) / np.sqrt(np.prod(w_shape[:3]))
    y_shape = jax.eval_shape(
        lambda x, w: jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC), x, w
    ).shape
    g = jax.random.normal(kg, y_shape)
    padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))
    got, want = native_and_xla(x, w, g, tuple(strides), padding)
    assert_close_relative(got, want)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("model_name", ["resnet8", "resnet18", "resnet50"])
def test_every_conv_of_the_presets_matches_xla(model_name):
    """Outputs, input gradients and weight gradients at every conv shape of the preset (stem included)."""
    geometries = conv_geometries(model_name)
    assert any(w[:2] == (3, 3) and x[-1] == 3 for x, w, _, _ in geometries)  # the stem
    assert any(s == (2, 2) for _, _, s, _ in geometries) and any(w[:2] == (1, 1) for _, w, _, _ in geometries)
    for geometry in geometries:
        check_geometry(*geometry)


@pytest.mark.parametrize(
    "x_shape, w_shape, strides, padding",
    [
        ((2, 9, 9, 5), (3, 3, 5, 7), (2, 2), ((1, 1), (1, 1))),  # odd size, stride 2
        ((2, 8, 8, 6), (1, 1, 6, 4), (2, 2), "VALID"),  # 1x1 stride 2 (a projection)
        ((2, 7, 5, 3), (1, 1, 3, 8), (1, 1), "SAME"),  # 1x1, non-square
        ((1, 10, 10, 4), (3, 3, 4, 4), (2, 1), ((0, 2), (1, 0))),  # uneven strides and padding
        ((3, 6, 6, 2), (5, 5, 2, 3), (1, 1), "SAME"),  # 5x5
    ],
)
def test_stride_and_padding_cases_match_xla(x_shape, w_shape, strides, padding):
    check_geometry(x_shape, w_shape, strides, padding)


def first_cpus(count: int) -> str | None:
    """The first `count` CPUs this process may use, as taskset's list ('0,1'), or None where fewer."""
    allowed = sorted(os.sched_getaffinity(0))
    return ",".join(map(str, allowed[:count])) if len(allowed) >= count else None


@pytest.mark.timeout(200)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", check.machine_isas())
def test_every_geometry_matches_xla_under_every_instruction_set_in_a_fresh_process(isa, threads):
    """y, dx and dw of every geometry class of `native.check` (input channels 1-17, kernels 1/3/7, strides
    1/2, SAME/VALID, odd sizes, and the ResNet shortcuts where oneDNN's strided 1x1 kernel fails), repeated,
    within 1e-5 of XLA: in a fresh process per instruction-set cap this CPU has and per oneDNN thread count,
    on two cores (taskset), killed if it hangs."""
    cmd = [sys.executable, "-m", "debkd_jax.native", "--json"]
    cpus = first_cpus(2)
    if cpus and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus, *cmd]
    env = {**os.environ, check.ISA_ENV: isa, native.THREADS_ENV: str(threads), "JAX_PLATFORMS": "cpu"}
    try:
        done = processes.run(cmd, cwd=REPO_ROOT, env=env, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the check hung under {check.ISA_ENV}={isa} with {threads} thread(s); killed it")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["threads"] == threads
    assert [row["geometry"] for row in report["rows"]] == [check.describe(g) for g in check.GEOMETRIES]
    assert report["failures"] == []
    assert max(row[k] for row in report["rows"] for k in ("y", "dx", "dw")) <= check.TOLERANCE


@pytest.mark.timeout(200)
@pytest.mark.skipif("AVX2" not in check.machine_isas(), reason="oneDNN's AVX2 kernels need an AVX2 CPU")
def test_the_check_catches_onednns_strided_1x1_fault_when_the_routing_is_off():
    """The check is not blind: with the routing around oneDNN's fault switched off in a child process, the
    AVX2 1x1 kernel's backward-weights pass writes past its scratchpad (a guard zone catches it) or returns
    wrong weight gradients, and the check reports it. Every x86 CPU in CI has AVX2."""
    script = (
        "import sys\n"
        "from debkd_jax import native\n"
        "from debkd_jax.native import __main__ as cli\n"
        "native.needs_unit_stride = lambda *args: False\n"
        "sys.exit(cli.check_here())\n"
    )
    env = {**os.environ, check.ISA_ENV: "AVX2", native.THREADS_ENV: "1", "JAX_PLATFORMS": "cpu"}
    try:
        done = processes.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, timeout=150)
    except subprocess.TimeoutExpired:
        return  # a hang is the fault too; the self-check's deadline turns it into a failed verdict
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["failures"], report
    assert any("past its" in f or ("dw of" in f and "1x1 stride 2" in f) for f in report["failures"])


def test_the_geometries_cover_the_issue_matrix():
    grid = {(w[2], w[0], s[0], padding) for _, w, s, padding in check.GEOMETRIES}
    for c in (1, 3, 4, 6, 8, 12, 16, 17):
        for k in (1, 3, 7):
            for stride in (1, 2):
                for padding in ("SAME", "VALID"):
                    assert (c, k, stride, padding) in grid
    assert any(x[1] % 2 and x[2] % 2 and x[1] != x[2] for x, *_ in check.GEOMETRIES)  # odd, not square


def test_no_strided_1x1_convolution_reaches_onednn():
    """A strided 1x1 conv (a ResNet shortcut with 4 input channels) and both its gradients call the handlers
    at stride 1 on the subsampled input; the 3x3 stride-2 conv beside it keeps its stride."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))

    def loss(x, w1, w3):
        a = models.conv_general_dilated_onednn(x, w1, (2, 2), "SAME", dimension_numbers=NHWC)
        b = models.conv_general_dilated_onednn(x, w3, (2, 2), "SAME", dimension_numbers=NHWC)
        return jnp.sum(a * b)

    w1, w3 = jnp.ones((1, 1, 4, 8)), jnp.ones((3, 3, 4, 8))
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, w1, w3).as_text()
    calls = sorted(re.findall(r"custom_call @(debkd_onednn_conv_\w+)\(.*?sh = (\d+)", text))
    # Forward, backward-data and backward-weights of each conv: the 1x1 one at stride 1, the 3x3 one at 2.
    assert calls == sorted((target, sh) for target in native.TARGETS.values() for sh in "12")
    got = jax.grad(loss, argnums=(0, 1, 2))(x, w1, w3)

    def plain(x, w1, w3):
        a = jax.lax.conv_general_dilated(x, w1, (2, 2), "SAME", dimension_numbers=NHWC)
        b = jax.lax.conv_general_dilated(x, w3, (2, 2), "SAME", dimension_numbers=NHWC)
        return jnp.sum(a * b)

    assert_close_relative(got, jax.grad(plain, argnums=(0, 1, 2))(x, w1, w3))


def test_a_self_check_past_its_deadline_fails_and_leaves_nothing_running():
    before = set(processes.descendants())  # e.g. multiprocessing's resource tracker, from earlier modules
    started = time.monotonic()
    ok, reason = check.run_child(1, deadline=1.0)
    assert not ok and "did not finish within 1 s" in reason and "killed" in reason
    assert time.monotonic() - started < 30
    assert set(processes.descendants()) <= before


def test_auto_does_not_pick_a_native_conv_that_failed_its_self_check(tmp_path):
    """A fresh process whose self-check cannot finish (a 0.01 s deadline): the native conv is reported unsafe
    with the reason, `auto` picks the XLA conv, and `conv_backward="onednn"` falls back to it with a
    warning."""
    script = """
import json, warnings
import jax
from debkd_jax import models, native, training
one = training.create_mesh(jax.devices()[:1])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    x = jax.numpy.ones((1, 6, 6, 4))
    models.conv_general_dilated_onednn(x, jax.numpy.ones((3, 3, 4, 4)), (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
print(json.dumps({"ok": native.status().ok, "reason": native.status().reason,
                  "auto": training.resolve_conv_backward("auto", one),
                  "warnings": [str(w.message) for w in caught]}))
"""
    env = {**os.environ, check.DEADLINE_ENV: "0.01", "JAX_PLATFORMS": "cpu"}
    done = processes.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert not out["ok"] and "self-check did not finish within 0.01 s" in out["reason"]
    assert out["auto"] == "materialized"
    assert any("unsafe on this CPU" in w for w in out["warnings"])


def test_check_grads_on_a_small_conv():
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (2, 5, 5, 2))
    w = jax.random.normal(kw, (3, 3, 2, 3)) * 0.3
    conv = lambda x, w: models.onednn_conv(x, w, (2, 2), ((1, 1), (1, 1)))
    check_grads(conv, (x, w), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_the_compiled_gradient_holds_the_custom_calls_and_no_convolution():
    model = models.get_model("resnet_tiny", 2, conv_backward="onednn")
    x = jnp.ones((2, 8, 8, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    loss = lambda params: model.apply({**variables, "params": params}, x, train=False)[0].sum()
    hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).compile().as_text()
    for target in native.TARGETS.values():
        assert f'custom_call_target="{target}"' in hlo
    assert "convolution(" not in hlo


def one_device_train_steps(conv_backward: str, n_steps: int = 2, model: str = "resnet8", batch: int = 8):
    """(initial params, params, batch_stats, metrics) after `n_steps` CE steps of `training.make_train_step`
    on one CPU device, from the same init and the same batch whatever the conv."""
    mesh = training.create_mesh(jax.devices()[:1])
    cfg = config_lib.train_config(model, num_epochs=2, batch_size=batch)
    method_cfg = methods.preset("CE")
    objective = methods.objective(method_cfg, cfg.num_epochs)
    spec = training.build_step_spec(
        cfg, 2, "float32", objective, 4, False, conv_backward, method_cfg=method_cfg
    )
    state = training.init_state(jax.random.key(0), spec.model, training.make_optimizer(cfg, 4), (32, 32, 3))
    initial = jax.device_get(state.params)
    rng = np.random.default_rng(0)
    labels = (np.arange(batch) % 2).astype(np.int32)
    rows = methods.method_targets(method_cfg, rng.normal(size=(batch, 2)).astype(np.float32), labels)
    batch_arrays = {
        "image": rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8),
        "label": labels,
        "rows": jax.tree.map(np.asarray, rows),
    }
    step = training.make_train_step(spec, mesh)
    acc = training.zero_metrics()
    for _ in range(n_steps):
        state, acc = step(state, acc, batch_arrays, None, None)
    return initial, jax.device_get(state.params), jax.device_get(state.batch_stats), jax.device_get(acc)


@pytest.fixture(scope="module")
def onednn_steps():
    return one_device_train_steps("onednn")


@pytest.mark.timeout(600)
def test_a_train_step_with_the_native_conv_agrees_with_xla(onednn_steps):
    initial, params, stats, acc = onednn_steps
    initial_x, params_x, stats_x, acc_x = one_device_train_steps("xla")
    for a, b in zip(
        jax.tree.leaves((initial, params, stats)),
        jax.tree.leaves((initial_x, params_x, stats_x)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert_close_relative(acc["loss_sum"], acc_x["loss_sum"])
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(initial), strict=True)
    ]
    assert sum(changed) > len(changed) // 2  # the steps did train


def test_whole_model_gradients_agree_with_xla():
    """The gradient of a ResNet-8's training-mode loss in every parameter, leaf by leaf within 1e-5 of the
    leaf's largest entry (the parameter update above is blurred by the parameters' own rounding)."""
    x = jax.random.normal(jax.random.key(2), (8, 32, 32, 3))
    grads = {}
    for setting in ("onednn", "xla"):
        model = models.get_model("resnet8", 2, conv_backward=setting)
        variables = model.init(jax.random.key(0), x, train=False)

        def loss(params, model=model, variables=variables):
            (logits, _), _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

        grads[setting] = jax.jit(jax.grad(loss))(variables["params"])
    assert_close_relative(grads["onednn"], grads["xla"])


def test_two_runs_are_bitwise_identical(onednn_steps):
    again = one_device_train_steps("onednn")
    for a, b in zip(jax.tree.leaves(onednn_steps), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_failed_build_falls_back_to_xla_with_one_warning(tmp_path):
    """With a compiler that runs but fails to compile, and an empty cache, `conv_backward="onednn"` still
    trains: the plain XLA conv, the same gradients, and one warning naming the cause."""
    failing_cxx = tmp_path / "failing-c++"
    failing_cxx.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && echo "failing c++ 1.0" && exit 0\necho boom >&2\nexit 1\n'
    )
    failing_cxx.chmod(0o755)
    script = """
import json, warnings
import jax, jax.numpy as jnp
from debkd_jax import models, native
x = jnp.linspace(-1, 1, 2 * 8 * 8 * 3).reshape(2, 8, 8, 3)
grads = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for setting in ("onednn", "xla"):
        model = models.get_model("resnet_tiny", 2, conv_backward=setting)
        variables = model.init(jax.random.key(0), x, train=False)
        loss = lambda p: model.apply({**variables, "params": p}, x, train=False)[0].sum()
        grads[setting] = jax.jit(jax.grad(loss))(variables["params"])
same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(grads["onednn"]),
                                                     jax.tree.leaves(grads["xla"])))
print(json.dumps({"status": native.status().reason, "same": same,
                  "warnings": [str(w.message) for w in caught if "onednn" in str(w.message)]}))
"""
    env = {
        **os.environ,
        "CXX": str(failing_cxx),
        "DEBKD_NATIVE_CACHE": str(tmp_path / "cache"),
        "JAX_PLATFORMS": "cpu",
    }
    done = processes.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "compiling onednn_conv.cc failed" in out["status"] and out["same"]
    assert len(out["warnings"]) == 1 and out["status"] in out["warnings"][0]
    cache = tmp_path / "cache"
    assert [p.suffix for p in cache.iterdir()] == [".log"]  # the compiler's output; no library, no temporary
    assert "boom" in next(cache.iterdir()).read_text()


def test_unsupported_convolutions_fall_back_with_the_reason():
    x, w = jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 2, 4))
    assert "grouped" in models.onednn_unsupported(x, w, None, None, NHWC, 2, None)
    assert "dilated" in models.onednn_unsupported(x, jnp.ones((3, 3, 4, 4)), None, (2, 2), NHWC, 1, None)
    assert "float32" in models.onednn_unsupported(x.astype(jnp.bfloat16), w, None, None, NHWC, 1, None)
    assert models.onednn_unsupported(x, jnp.ones((3, 3, 4, 4)), None, None, NHWC, 1, None) is None
    with pytest.warns(RuntimeWarning, match="dilated"):
        y = models.conv_general_dilated_onednn(
            x, jnp.ones((3, 3, 4, 4)), (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC
        )
    np.testing.assert_array_equal(
        y,
        jax.lax.conv_general_dilated(
            x, jnp.ones((3, 3, 4, 4)), (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC
        ),
    )


def test_auto_picks_the_native_conv_on_one_cpu_device_in_float32_only():
    one = training.create_mesh(jax.devices()[:1])
    assert training.resolve_conv_backward("auto", one) == "onednn"
    assert training.resolve_conv_backward("auto", one, "bfloat16") == "materialized"
    assert training.resolve_conv_backward("auto", training.create_mesh()) == "materialized"  # 8 devices


def test_the_ahead_of_time_build_command_reports_a_working_conv():
    done = processes.run(
        [sys.executable, "-m", "debkd_jax.native"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok: conv_backward='onednn' runs natively" in done.stdout
