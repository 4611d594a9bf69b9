"""segmerge-bench end to end on a tiny size: the JSON schema the issue asks for, and parity with transformers."""

from __future__ import annotations

import json
import sys

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


def _bf16_probe_modules() -> tuple[object, list]:
    """The bf16 probe (``cpu_bf16_support``, wherever the backends keep it) and every loaded module holding it by
    name, after importing those the pose bench goes through."""
    import importlib

    for name in ("segmerge_ros.inference.backends.base", "segmerge_ros.inference.backends.registry",
                 "segmerge_ros.inference.ladder", "segmerge_ros.inference.pose", "segmerge_ros.bench.bench_pose"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    probe = next(getattr(sys.modules[name], "cpu_bf16_support") for name in (
        "segmerge_ros.inference.backends.base", "segmerge_ros.inference.backends.registry")
        if hasattr(sys.modules.get(name), "cpu_bf16_support"))
    holders = [module for name, module in list(sys.modules.items())
               if name.startswith("segmerge_ros") and getattr(module, "cpu_bf16_support", None) is probe]
    return probe, holders


@pytest.mark.parametrize("cpu", ["this CPU", "native bf16", "no bf16"])
def test_pose_bench_has_a_row_per_backend_precision_and_crop_with_time_per_person(tmp_path, shared_data, one_thread,
                                                                                   monkeypatch, cpu):
    """bf16 rows where the CPU has native bf16; where it has not, the estimator runs fp32, the bf16 rows fold into
    the fp32 ones and a note says so. Both answers of the probe are forced, so both branches run on any CPU."""
    from segmerge_ros.bench import bench_pose

    probe, holders = _bf16_probe_modules()
    if cpu != "this CPU":
        answer = "" if cpu == "native bf16" else "no native bf16 instructions (forced by the test)"
        for module in holders:
            monkeypatch.setattr(module, "cpu_bf16_support", lambda: answer)
    missing = probe() if cpu == "this CPU" else answer  # "" where bf16 is native, else why not
    out = tmp_path / "pose.md"
    assert bench_pose.main(["--configs", "none", "--persons", "2", "--repeat", "1", "--warmup", "0",
                            "--precision", "fp32,bf16", "--input-size", "128x96,64x64", "--markdown", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| eager-")]
    ran = ("fp32",) if missing else ("fp32", "bf16")
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [
        f"eager-{p} {crop}" for p in ran for crop in ("96x128", "64x64")]
    notes = [line for line in text.splitlines() if line.startswith("note: ")]
    if missing:  # folded, and said so, once per crop
        assert notes == [f"note: eager-bf16 {crop} asked, ran as eager-fp32 {crop} ({missing}): folded into its rows"
                         for crop in ("96x128", "64x64")]
    else:
        assert notes == []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        frame_min, per_person = float(cells[4]), float(cells[5])
        assert per_person == pytest.approx(frame_min / 2, abs=0.06)  # two people


def test_memory_reports_the_rss_of_each_ladder_from_a_fresh_process(capsys):
    from segmerge_ros.bench import bench

    assert bench.main(["--memory", "--size", "64x96", "--backend", "eager", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("eager"))
    assert row[:3] == ["eager", "fp32", "7"]  # every step of eager's ladder prepared and run
    python, model, ladder, total = (float(v) for v in row[3:])
    assert python > 100 and model > 0 and total == pytest.approx(python + model + ladder, abs=2)
