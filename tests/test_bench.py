"""`sslab bench` runs its three paths and writes comparable numbers (no timing is asserted)."""

import json

from sslab.platform.cli import main


def test_bench_writes_side_by_side_results(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--width",
            "0.125",
            "--batch-size",
            "16",
            "--steps",
            "1",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--images",
            "64",
            "--loader-workers",
            "0",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["paths"]) == {"sslab", "bare", "dataloader"}
    for path in result["paths"].values():
        assert path["images_per_s"] > 0 and path["views_per_s"] == 2 * path["images_per_s"]
    assert result["ratios"]["sslab_speedup_vs_dataloader"] > 0
    assert "DataLoader pipeline" in capsys.readouterr().out
