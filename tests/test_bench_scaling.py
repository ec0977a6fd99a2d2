"""bench/scaling.py end to end at toy size: it runs 1 and 2 processes, with and without overlapped all-reduce, and ZeRO
really shards the optimizer state."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.e2e  # subprocesses: the end-to-end tier (pytest --full)

DOCUMENTED = ["bench/scaling.py", "--size", "micro", "--img", "64", "--patch", "8", "--batch", "64", "--steps", "5",
              "--rounds", "8"]
"""docs/performance.md's command (the docs test counts this test as running it); the flags after it shrink it"""


def test_scaling_bench_reports_throughput_and_sharded_optimizer_state(tmp_path):
    out = tmp_path / "scaling.json"
    proc = run_cli([*DOCUMENTED, "--img", "32", "--batch", "4", "--warmup", "1", "--steps", "2", "--rounds", "1",
                    "--compare-overlap-comm", "--json", str(out)], timeout=300)
    assert "weak-scaling efficiency" in proc.stdout
    assert "2 process(es) with engine.overlap_comm:" in proc.stdout
    results = json.loads(out.read_text())
    throughput = {world: run["images_per_s"] for world, run in results["runs"].items()}
    assert set(throughput) == {"1", "2"} and all(value > 0 for value in throughput.values())
    assert results["efficiency"] == pytest.approx(throughput["2"] / (2 * throughput["1"]))
    assert all(run["overlapped"]["images_per_s"] > 0 for run in results["runs"].values())

    rows = {(row["stage"], row["world"]): row for row in results["optimizer_state"]}
    assert set(rows) == {(stage, world) for stage in (0, 1, 2, 3) for world in (1, 2)}
    for row in rows.values():
        assert row["moments"] == pytest.approx(row["expected_moments"], rel=0.05)
        assert row["master"] == pytest.approx(row["expected_master"], rel=0.05)
    assert rows[0, 2]["moments"] == pytest.approx(8 * results["runs"]["2"]["params"], rel=0.01)
    for stage in (1, 2, 3):
        assert rows[stage, 2]["moments"] == pytest.approx(rows[0, 2]["moments"] / 2, rel=0.05)
        total = {world: rows[stage, world]["moments"] + rows[stage, world]["master"] for world in (1, 2)}
        assert total[2] == pytest.approx(total[1] / 2, rel=0.05)
