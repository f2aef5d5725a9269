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
    assert {"jax_ce", "jax_debkd", "jax_ce_xla_conv"} <= set(row)
    assert row["speedup_over_xla_conv"]["ce"] > 0
    assert row["conv_backward"] == "materialized"  # the default on CPU, compared with the plain XLA conv
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
        assert r["debkd_over_ce"] > 0 and r["debkd_over_optax_ce"] > 0
    assert "bfloat16" in results["levers"]["in_process"]

    md = (tmp_path / "BENCHMARKS.md").read_text()
    for heading in ("## a.", "## b.", "## c.", "## d.", "## e.", "## f.", "## g."):
        assert heading in md
    assert "plain XLA conv backward" in md and "proposed conv VJP" not in md


def test_steps_use_the_models_conv_backward():
    from debkd_jax import models

    assert callable(models.conv_general_dilated_materialized)
    assert not hasattr(bench, "conv_general_dilated_materialized")  # moved to models.py
    default = bench.get_step("resnet_tiny", "CE", batch=8)
    plain = bench.get_step("resnet_tiny", "CE", batch=8, conv_backward="xla")
    assert (default.conv_backward, plain.conv_backward) == ("materialized", "xla")
    assert default.spec.model.backbone.conv_backward == "materialized"
    assert plain.spec.model.backbone.conv_backward == "xla"
    default()  # the step runs


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


def test_unknown_section_is_a_usage_error(capsys):
    import pytest

    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--only=nonsense"])
    assert "unknown section" in capsys.readouterr().err
