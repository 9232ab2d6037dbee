"""`sslab bench` runs its paths and writes comparable numbers (no timing is asserted)."""

import json

import torch

from sslab.platform.cli import main

TINY = ["--width", "0.125", "--batch-size", "16", "--steps", "1", "--warmup", "1", "--device", "cpu"]


def test_bench_writes_side_by_side_results(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", *TINY, "--rounds", "2", "--images", "64", "--loader-workers", "0", "--out", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert set(result["paths"]) == {"sslab", "bare", "dataloader", "main@c08d6ab"}
    for path in result["paths"].values():
        assert path["images_per_s"] > 0 and path["views_per_s"] == 2 * path["images_per_s"]
    assert (
        result["ratios"]["sslab_speedup_vs_dataloader"] > 0
        and result["ratios"]["sslab_speedup_vs_before"] > 0
    )
    assert "DataLoader pipeline" in capsys.readouterr().out
    # the limit: a step's FLOPs over its time, against a matmul's FLOP/s measured here
    from sslab.platform.runtime import native_bf16

    assert result["flops_per_step"] > 0 and result["ceiling_flops_per_s"]["fp32"] > 0
    # a bf16 ceiling only where bf16 is native (emulated, it takes minutes and bounds nothing)
    assert ("bf16" in result["ceiling_flops_per_s"]) == native_bf16(torch.device("cpu"))
    for path in result["paths"].values():
        expected = result["flops_per_step"] / path["seconds_per_step"] / result["ceiling_flops_per_s"]["fp32"]
        assert path["fraction_of_fp32_ceiling"] == expected > 0


def test_precision_bench_times_each_precision_side_by_side(tmp_path, capsys):
    out = tmp_path / "precision.json"
    assert main(["bench", "--precision", *TINY, "--rounds", "1", "--images", "32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["paths"]) == {"fp32", "bf16", "channels_last", "bf16+channels_last"}
    variants = ("bf16", "channels_last", "bf16+channels_last")
    assert set(result["ratios"]) == {f"{p}_speedup_vs_fp32" for p in variants}
    assert "speed-up over fp32" in capsys.readouterr().out
