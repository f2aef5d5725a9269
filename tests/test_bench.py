"""The benchmarks (benchmarks/, outside the package): the report holds what the JSON holds, every ratio is the
ratio of the recorded samples, fresh-process rounds rotate, and a hanging worker is killed within its timeout.

No assertions on speed: these run on shared, busy machines.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import fresh_pairs, modes, peer, render, run, steps, timing, train_step, workers


def median_ratio(a, b):
    return float(np.median(np.asarray(a) / np.asarray(b)))


def row_of(md: str, *first_cells: str) -> list[str]:
    """The cells of the Markdown table row that starts with `first_cells`."""
    prefix = "| " + " | ".join(first_cells) + " |"
    (line,) = [line for line in md.splitlines() if line.startswith(prefix)]
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert run.main(["--smoke", f"--out={out}"]) == 0
    return json.loads((out / "benchmarks.json").read_text()), (out / "BENCHMARKS.md").read_text()


def test_smoke_report_is_rendered_from_its_json_alone(smoke):
    results, md = smoke
    assert set(modes.SECTIONS) <= set(results)
    assert md == render.render(results) + "\n"


def test_train_step_ratios_and_table_equal_the_recorded_samples(smoke):
    results, md = smoke
    ((run_,),) = [results["train_step"]["runs"]]
    ((name, row),) = run_["models"].items()
    batch, dtype = run_["batch"], run_["dtype"]
    assert (batch, dtype) == (modes.MODES["smoke"].batch, "float32")
    for key, label in (("jax_ce", "JAX CE"), ("jax_debkd", "JAX DeBKD, targets precomputed")):
        s = row[key]["samples_s"]
        assert row[key]["images_per_s"] == pytest.approx(batch / np.median(s))
        cells = row_of(md, name, str(batch), dtype, label)
        assert (
            cells[4]
            == f"{render.fmt(row[key]['images_per_s'])} ({render.fmt(row[key]['best_images_per_s'])})"
        )
    want = median_ratio(row["jax_ce_xla_conv"]["samples_s"], row["jax_ce"]["samples_s"])
    assert row["speedup_over_xla_conv"]["ce"] == pytest.approx(want)
    assert f"conv backward: {want:.2f}x (CE)" in md
    assert row["conv_backward"] == "materialized"  # the default on CPU, compared with the plain XLA conv
    if results["meta"]["peer_skipped"] is None:
        want = median_ratio(row["torch_ce"]["samples_s"], row["jax_ce"]["samples_s"])
        assert row["speedup_vs_torch"]["jax_ce"] == pytest.approx(want)
        assert row_of(md, name, str(batch), dtype, "JAX CE")[5] == f"{want:.2f}x"


def test_train_step_grid_runs_every_batch_and_dtype_and_the_render_cli_reproduces_the_report(
    tmp_path, capsys
):
    argv = [
        "--smoke",
        "--only=train_step",
        "--train-batches=8,16",
        "--train-dtypes=bfloat16",
        f"--out={tmp_path}",
    ]
    assert run.main(argv) == 0
    results = json.loads((tmp_path / "benchmarks.json").read_text())
    runs = results["train_step"]["runs"]
    assert [(r["batch"], r["dtype"]) for r in runs] == [(8, "bfloat16"), (16, "bfloat16")]
    for r in runs:
        ((name, row),) = r["models"].items()
        assert row["jax_ce"]["images_per_s"] == pytest.approx(
            r["batch"] / np.median(row["jax_ce"]["samples_s"])
        )
        if results["meta"]["peer_skipped"] is None:  # the peer under bfloat16 autocast, side by side
            assert row["speedup_vs_torch"]["jax_ce"] == pytest.approx(
                median_ratio(row["torch_ce"]["samples_s"], row["jax_ce"]["samples_s"])
            )
        step = steps.get_step(name, "CE", batch=r["batch"], dtype="bfloat16")
        assert step.spec.dtype == np.dtype("bfloat16") and step.spec.model.backbone.dtype == "bfloat16"
    steps.clear_steps()
    capsys.readouterr()
    render.main([str(tmp_path / "benchmarks.json")])
    assert capsys.readouterr().out == (tmp_path / "BENCHMARKS.md").read_text()


def test_calls_per_sample_keep_the_images_per_sample():
    mode = dataclasses.replace(modes.MODES["accelerator"], batch=512, steps={"resnet8": 20})
    assert train_step.calls_per_sample(mode, "resnet8", 512) == 20
    assert train_step.calls_per_sample(mode, "resnet8", 2048) == 5
    assert train_step.calls_per_sample(mode, "resnet8", 1 << 20) == 1
    assert train_step.calls_per_sample(mode, "resnet18", 512) == 1  # a model without a count: one call


def test_results_written_before_the_grid_still_render():
    row = {k: {"images_per_s": 10.0, "best_images_per_s": 12.0} for k in ("jax_ce", "torch_ce")}
    row["speedup_vs_torch"] = {"jax_ce": 1.5}
    old = {"batch": 128, "image_size": 32, "models": {"resnet8": row}}
    lines = train_step.render(old)
    assert "| resnet8 | 128 | float32 | JAX CE | 10 (12) | 1.50x |" in lines


def test_smoke_peer_ran_in_its_own_process_with_passive_openmp(smoke):
    results, md = smoke
    meta = results["meta"]
    if meta["peer_skipped"]:
        pytest.skip(meta["peer_skipped"])
    assert meta["peer"]["pid"] != os.getpid()
    assert meta["peer"]["threads"] == 1
    assert meta["peer"]["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert meta["peer"]["env"]["GOMP_SPINCOUNT"] == "0"
    assert "OMP_WAIT_POLICY=PASSIVE" in md


def test_interleaved_rotates_and_records_one_sample_per_round():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    samples = timing.interleaved(fns, rounds=3, calls={"a": 1, "b": 2, "c": 1}, warmup=0, settle=0)
    assert order == ["a", "b", "b", "c", "b", "b", "c", "a", "c", "a", "b", "b"]
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}


def test_the_fresh_jax_worker_gets_the_command_line_defaults_on_one_device():
    env = fresh_pairs.jax_env("1")
    assert "--xla_cpu_experimental_ynn_fusion_type=" in env["XLA_FLAGS"].split()
    assert "xla_force_host_platform_device_count" not in env["XLA_FLAGS"]  # the test session's fake devices
    assert env["DEBKD_ONEDNN_THREADS"] == "1"


def test_a_fresh_jax_sample_runs_in_its_own_process_and_reports_its_samples():
    mode = dataclasses.replace(modes.MODES["smoke"], batch=4, pair_calls={"resnet_tiny": 3})
    got = fresh_pairs.jax_sample(modes.Context(mode, None, lambda msg: None), "resnet_tiny", "1")
    assert len(got["samples_s"]) == 3
    assert got["images_per_s"] == pytest.approx(4 / np.median(got["samples_s"]))
    assert got["xla_flags"] == fresh_pairs.jax_env("1")["XLA_FLAGS"]


HANGS = [sys.executable, "-c", "import time; time.sleep(600)"]
# Answers the first request, then hangs: a peer stuck inside a step.
HANGS_AFTER_HELLO = [
    sys.executable,
    "-c",
    "import json, sys, time\n"
    "sys.stdin.readline()\n"
    "print(json.dumps({'torch': 'fake', 'threads': 1, 'env': {}, 'pid': 0}), flush=True)\n"
    "time.sleep(600)\n",
]


def test_a_hanging_worker_is_killed_within_its_timeout_and_named():
    worker = workers.LineWorker(HANGS, env=dict(os.environ), name="the PyTorch peer worker")
    t0 = time.monotonic()
    with pytest.raises(
        workers.WorkerTimeout, match=r"train_step: the PyTorch peer worker did not answer 'time'"
    ):
        worker.request("time", timeout=2, section="train_step", key="train_step resnet8, batch 128")
    assert time.monotonic() - t0 < 10
    assert worker.proc.poll() is not None  # killed, not left running


def test_a_peer_that_hangs_in_a_step_fails_the_section_within_its_timeout():
    p = peer.Peer(1, timeout=2, start_timeout=60, command=HANGS_AFTER_HELLO)
    t0 = time.monotonic()
    with pytest.raises(workers.WorkerTimeout, match=r"train_step: .* 'train_step'"):
        p.train_step("train_step", "resnet8", 64)
    assert time.monotonic() - t0 < 10
    assert p.worker.proc.poll() is not None


def test_a_one_shot_worker_past_its_timeout_is_killed_with_its_children():
    marker = "bench-test-grandchild"
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)", marker]
    spawn = f"import subprocess, time; subprocess.Popen({sleeper!r});"
    cmd = [sys.executable, "-c", spawn + " time.sleep(600)", marker]
    t0 = time.monotonic()
    with pytest.raises(
        workers.WorkerTimeout, match=r"fresh_pairs: the JAX worker .* did not finish within 2 s"
    ):
        workers.run_json(
            cmd, env=dict(os.environ), timeout=2, section="fresh_pairs", what="the JAX worker (x)"
        )
    assert time.monotonic() - t0 < 10
    alive = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, timeout=10).stdout.split()
    assert alive == []


@pytest.mark.peer
def test_the_peer_worker_runs_torch_with_explicit_threads():
    pytest.importorskip("torch")
    p = peer.Peer(1, timeout=120)
    try:
        assert p.info["pid"] != os.getpid() and p.info["threads"] == 1
        assert p.info["env"] == {"OMP_NUM_THREADS": "1", **peer.PEER_THREAD_ENV}
        sampler = p.train_step("train_step", "resnet_tiny", 4)
        seconds = timing.interleaved({"peer": sampler}, rounds=2, calls=1, warmup=1, settle=0)["peer"]
        assert len(seconds) == 2
    finally:
        p.close()
    assert p.worker.proc.poll() == 0  # it quit when asked


@pytest.mark.peer
def test_a_peer_asked_for_cuda_without_one_fails_with_the_reason():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(workers.WorkerFailed, match="sees no CUDA device; use --device=cpu"):
        peer.Peer(1, timeout=60, device="cuda")


def test_steps_use_the_models_conv_backward():
    default = steps.get_step("resnet_tiny", "CE", batch=8)
    plain = steps.get_step("resnet_tiny", "CE", batch=8, conv_backward="xla")
    assert (default.conv_backward, plain.conv_backward) == ("materialized", "xla")
    assert default.spec.model.backbone.conv_backward == "materialized"
    assert plain.spec.model.backbone.conv_backward == "xla"
    before = int(default.state.step)
    default()
    assert int(default.state.step) == before + 1
    steps.clear_steps()


def test_unknown_section_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        run.main(["--smoke", "--only=nonsense"])
    assert "unknown section" in capsys.readouterr().err


def test_a_peer_hang_ends_the_run_with_one_line_naming_the_section(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(
        run,
        "start_peer",
        lambda mode, log, device: (peer.Peer(1, timeout=2, command=HANGS_AFTER_HELLO), None),
    )
    t0 = time.monotonic()
    assert run.main(["--smoke", "--only=train_step", f"--out={tmp_path}"]) == 1
    assert time.monotonic() - t0 < 120
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: train_step: the PyTorch peer worker did not answer 'train_step'")
    assert not (tmp_path / "benchmarks.json").exists()


def test_the_committed_gpu_report_is_its_json_rendered(capsys):
    folder = os.path.join(workers.REPO_ROOT, "benchmarks", "results", "gpu-h200-2026-12-04")
    render.main([os.path.join(folder, "benchmarks.json")])
    with open(os.path.join(folder, "BENCHMARKS.md"), encoding="utf-8") as f:
        assert capsys.readouterr().out == f.read()


def test_the_committed_scale_report_is_its_json_written(tmp_path):
    from benchmarks.scale import report

    folder = os.path.join(workers.REPO_ROOT, "benchmarks", "results", "scale-2026-12-04")
    with open(os.path.join(folder, "benchmarks_scale.json"), encoding="utf-8") as f:
        md = report.write(json.load(f), str(tmp_path))
    with open(os.path.join(folder, "BENCHMARKS_SCALE.md"), encoding="utf-8") as f:
        assert md == f.read() == (tmp_path / "BENCHMARKS_SCALE.md").read_text()


def test_fresh_pairs_rotate_the_order_and_divide_the_peer_time_by_each_arm():
    times = {"jax_omp2": 1.0, "jax_omp1": 2.0, "torch": 3.0}
    calls = []

    def run(name):
        calls.append(name)
        return {"median_s": times[name], "images_per_s": 8 / times[name]}

    rounds = fresh_pairs.rounds_of(run, ["jax_omp2", "jax_omp1", "torch"], 3)
    assert [r["order"] for r in rounds] == [
        ["jax_omp2", "jax_omp1", "torch"],
        ["jax_omp1", "torch", "jax_omp2"],
        ["torch", "jax_omp2", "jax_omp1"],
    ]
    assert calls == [name for r in rounds for name in r["order"]]
    assert all(r["speedup_vs_peer"] == {"jax_omp2": 3.0, "jax_omp1": 1.5} for r in rounds)
    assert all(r["load_before"] >= 0 and r["load_after"] >= 0 for r in rounds)
    md = "\n".join(fresh_pairs.render({"batch": 8, "rounds": 3, "models": {"m": {
        "rounds": rounds, "median_speedup_vs_peer": {"jax_omp2": 3.0, "jax_omp1": 1.5},
        "geomean_speedup_vs_peer": {"jax_omp2": 3.0, "jax_omp1": 1.5},
        "images_per_s": {}, "omp2_over_omp1": 2.0, "conv_backward": "onednn"}}}))
    assert "median **3.00x**" in md and "2 threads over 1 thread: 2.00x" in md
    # A side that gains 1.5x in every other round: ratios r*1.5, r/1.5, ... -> geometric mean r.
    assert fresh_pairs.geometric_mean([2 * 1.5, 2 / 1.5, 2 * 1.5, 2 / 1.5]) == pytest.approx(2.0)


def test_the_targets_benchmark_counts_store_bytes_and_its_top_k_error_shrinks_with_k():
    from benchmarks import targets

    im = targets.imagenet_store(top_k=100, views=100)
    assert im["bytes_per_view"] == {"top_k": 4 * (2 * 100 + 1), "whole": 4 * 1000}
    assert im["bytes"]["top_k"] == 804 * 100 * targets.IMAGENET_TRAIN_IMAGES
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200).astype(np.int32)
    logits = (rng.normal(size=(200, 10)) * 3).astype(np.float32)
    logits[np.arange(200), labels] += 4
    rows = targets.topk_error(logits, labels, [1, 5, 9])
    errors = [r["KD"]["max_abs_soft_label_error"] for r in rows]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3  # k = K - 1: the float16 rounding alone
    assert rows[0]["DeBKD"]["rows_whose_region_moves"] > rows[2]["DeBKD"]["rows_whose_region_moves"]
