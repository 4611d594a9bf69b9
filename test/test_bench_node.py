"""The node benchmarks end to end on a tiny input: bench_node's table per load and rate from the node's own
diagnostics, and bench_budget's phases. Short runs: they check what the tools report, not how fast anything is."""

from __future__ import annotations

import json
import math

from conftest import ros_domain_id
from segmerge_ros.bench import bench_budget, bench_node


def test_bench_node_reads_each_load_and_rate_from_the_nodes_diagnostics(tmp_path, shared_data, capsys):
    out = tmp_path / "node.json"
    assert bench_node.main(["--size", "96x128", "--configs", "eager:fp32", "--rates", "0,0.9", "--loads", "0,1",
                            "--variants", "all", "--seconds", "3", "--fps", "5", "--json", str(out),
                            "--domain", str(ros_domain_id("bench_node", 90, 10))]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["load"], row["rate"]) for row in rows] == [(0, 0.0), (0, 0.9), (1, 0.0), (1, 0.9)]
    for row in rows:
        assert row["variant"] == "all" and row["windows"] >= 1
        for stage in ("network_ms", "preprocess_ms", "postprocess_ms", "publish_ms", "processing_ms"):
            assert math.isfinite(row[stage]) and row[stage] > 0, (stage, row)
        assert row["network_ms"] < row["processing_ms"]  # a stage inside the frame, not a copy of it
    calm, loaded = rows[0], rows[2]
    assert calm["x_calm_p50"] == 1.0
    assert loaded["cpu_others_cores"] > 0.5 > calm["cpu_others_cores"]  # the busy process ran and the node saw it
    printed = capsys.readouterr().out
    assert "flags:" in printed and "authority (rate 0 / 0.9)" in printed


def test_bench_budget_judges_each_phase_against_its_target(tmp_path, shared_data, capsys):
    out = tmp_path / "budget.json"
    assert bench_budget.main(["--size", "96x128", "--fps", "5", "--busy", "1", "--burst-s", "1",
                              "--phases", "calm:6,busy:6", "--tail-s", "4", "--json", str(out),
                              "--domain", str(ros_domain_id("bench_budget", 90, 10))]) == 0
    result = json.loads(out.read_text())
    assert result["target_ms"] == 0.8 * result["calm_unmerged_ms"] > 0
    assert [row["phase"] for row in result["rows"]] == ["calm", "busy"]
    for row in result["rows"]:
        assert 0.0 <= row["merge_rate"] <= 0.9 and row["processing_ms"] > 0
        assert row["within"] == (abs(row["processing_ms"] / result["target_ms"] - 1) <= 0.15)
    assert result["rows"][1]["cpu_others_cores"] > 0.5  # the busy phase really was busy
    assert "rate higher under load than calm before" in capsys.readouterr().out
