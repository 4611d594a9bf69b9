"""segmerge-bench end to end on a tiny size: the JSON schema the issue asks for, and parity with transformers."""

from __future__ import annotations

import json

import pytest

from segmerge_ros.bench import bench

pytest.importorskip("transformers", reason="transformers is a test dependency: run `make setup`")

ROW_KEYS = {
    "name": str,
    "median_ms": float,
    "speedup_vs_unmerged": float,
    "agreement_vs_unmerged": float,
}


def test_bench_writes_the_documented_json(tmp_path, shared_data):
    out = tmp_path / "bench.json"
    assert bench.main(["--size", "64x128", "--repeat", "1", "--presets", "hq", "--rates", "0.45", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"device", "model", "size", "rows"} and result["size"] == [64, 128]
    names = [row["name"] for row in result["rows"]]
    assert names == ["hf-transformers", "unmerged", "hq", "rate=0.45"]
    for row in result["rows"]:
        for key, kind in ROW_KEYS.items():
            assert isinstance(row[key], kind), (row["name"], key)
        assert set(row) >= {"speedup_vs_hf", "max_abs_logit_diff_vs_hf", "miou"}
    unmerged = result["rows"][1]
    assert unmerged["agreement_vs_unmerged"] == 1.0 and unmerged["speedup_vs_unmerged"] == 1.0
    assert unmerged["max_abs_logit_diff_vs_hf"] <= 1e-4  # same weights, same input: our model matches transformers
    assert result["rows"][2]["max_abs_logit_diff_vs_hf"] > 1e-4  # hq really merges


def test_bench_rejects_out_of_range_rates():
    with pytest.raises(SystemExit, match="outside"):
        bench.main(["--size", "64x128", "--repeat", "1", "--rates", "0.97", "--no-hf"])


def test_pose_bench_has_a_row_per_backend_precision_and_crop_with_time_per_person(tmp_path, shared_data, one_thread):
    from segmerge_ros.inference.backends.base import cpu_bf16_support
    from segmerge_ros.bench import bench_pose

    out = tmp_path / "pose.md"
    assert bench_pose.main(["--configs", "none", "--persons", "2", "--repeats", "1", "--warmup", "0",
                            "--precision", "fp32,bf16", "--input-size", "128x96,64x64", "--markdown", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| eager-")]
    half = "fp32" if cpu_bf16_support() else "bf16"  # it says why not, or "": without bf16 the estimator runs fp32
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [
        f"eager-{p} {crop}" for p in ("fp32", half) for crop in ("96x128", "64x64")]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        frame_min, per_person = float(cells[4]), float(cells[5])
        assert per_person == pytest.approx(frame_min / 2, abs=0.06)  # two people
