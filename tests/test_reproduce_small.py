"""``bench/reproduce_small.py`` end to end at the smallest size: both variants pre-train and every column of the table
is filled with a score in range, so the README's reproduction command keeps working."""

import json

from conftest import TINY, run_cli


def test_reproduce_small_fills_the_table(tmp_path):
    # the demo's 64 px: block-wise masking needs more patches than the tests' usual 32 px give
    tiny = [item for item in TINY if not item.startswith(("optim.epochs", "data.demo_images", "log.", "model.img_size"))]
    proc = run_cli(["bench/reproduce_small.py", "--out", str(tmp_path), "--epochs", "1", "--images", "64",
                    "--probe-epochs", "2", "--seg-epochs", "1", *tiny], timeout=900)
    report = json.loads((tmp_path / "table1_small.json").read_text())
    assert set(report["rows"]) == {"vanilla", "proxy"}
    for row in report["rows"].values():
        for column in ("knn_cls", "knn_patch", "linear_cls", "linear_patch", "seg_miou", "seg_pixel_acc"):
            assert 0 <= row[column] <= 1, (column, row)
        assert (row["depth"], row["linear_block"], row["seg_block"]) == (4, 2, 2)
    assert "| SemanticMIM (proxy) |" in proc.stdout and "| vanilla |" in proc.stdout
    for variant in ("vanilla", "proxy"):
        config = (tmp_path / f"{variant}_pixels_s0" / "config.yaml").read_text()
        assert f"mode: {variant}" in config
