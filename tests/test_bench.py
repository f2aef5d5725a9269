"""The benchmark module's smallest mode runs end to end and writes both files with the expected keys.

No timing assertions: these run on shared, busy machines.
"""

import json

from debkd_jax import bench


def test_smoke_mode_writes_markdown_and_json(tmp_path):
    assert bench.main(["--smoke", f"--out={tmp_path}"]) == 0
    results = json.loads((tmp_path / "benchmarks.json").read_text())
    assert set(bench.SECTIONS) <= set(results)
    meta = results["meta"]
    assert meta["mode"] == "smoke" and {"load_before", "load_after", "noisy", "versions"} <= set(meta)

    (row,) = results["train_step"]["models"].values()
    assert {"jax_ce", "jax_debkd", "jax_ce_materialized"} <= set(row)
    assert row["materialized_speedup"]["ce"] > 0
    assert row["jax_ce"]["images_per_s"] > 0
    if meta["peer_skipped"] is None:
        assert "torch_ce" in row and row["speedup_vs_torch"]["jax_ce"] > 0
    epoch = results["epoch"]
    assert {"jax_debkd_precomputed", "jax_kd_online"} <= set(epoch["rows"])
    assert epoch["speedup_precomputed_vs_jax_online"] > 0 and epoch["teacher_pass_s"] > 0
    assert "debkd_over_ce" in results["overhead"]
    flops = results["flops"]
    assert flops["gemm"]["flops_per_s"] > 0
    (model,) = flops["models"].values()
    assert model["training_flops_per_image"] > 2 * model["forward_flops_per_image"] > 0
    assert 0 < next(iter(flops["train_step"].values()))["share_of_gemm_peak"]
    assert results["memory"]["main_job"] == {"skipped": "smoke mode"}
    assert results["memory"]["batch_sweep"]["rows"]
    (inf,) = results["inference"]["models"].values()
    assert inf["exported_bytes"] > 0 and inf["parameters"] > 0 and "exported" in inf["throughput"]
    ks = {(r["k"], r["case"]) for r in results["loss"]["rows"]}
    assert ks == {(2, "realistic"), (2, "worst"), (10, "realistic"), (10, "worst")}
    for r in results["loss"]["rows"]:
        assert r["debkd_over_ce"] > 0
        assert max(r["fast_max_abs_diff"].values()) < 1e-5
    assert "bfloat16" in results["levers"]["in_process"]

    md = (tmp_path / "BENCHMARKS.md").read_text()
    for heading in ("## a.", "## b.", "## c.", "## d.", "## e.", "## f.", "## g."):
        assert heading in md


def test_closed_form_flops_count_every_conv_and_dense():
    macs = bench.conv_dense_macs("resnet8")
    # stem 32*32*16*27, stage 1: 2 convs 32*32*16*144, stage 2: 16*16*32*(144 + 288) + proj 16*16*32*16,
    # stage 3: 8*8*64*(288 + 576) + proj 8*8*64*32, head 64*2.
    want = (
        32 * 32 * 16 * 27
        + 2 * 32 * 32 * 16 * 144
        + 16 * 16 * 32 * (144 + 288 + 16)
        + 8 * 8 * 64 * (288 + 576 + 32)
        + 64 * 2
    )
    assert macs["forward"] == want
    assert macs["first_layer"] == 32 * 32 * 16 * 27
    assert bench.training_flops_per_image(macs) == 2 * (3 * want - macs["first_layer"])


def test_proposed_projection_is_exact(tmp_path):
    import jax
    import numpy as np

    from debkd_jax import losses

    for k, case in ((5, "realistic"), (100, "realistic"), (100, "worst")):
        s, _, lo, hi = bench.loss_inputs(256, k, case)
        p = jax.nn.softmax(s / 4.0)
        np.testing.assert_allclose(
            bench.box_projection_fast(p, lo, hi), losses.box_projection(p, lo, hi), atol=2e-7
        )


def test_unknown_section_is_a_usage_error(capsys):
    import pytest

    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--only=nonsense"])
    assert "unknown section" in capsys.readouterr().err
