"""bench/bench_upsample.py runs every rung of both ladders and reports identical class maps."""

from __future__ import annotations

from segmerge_ros.merging.segformerpp import ladder_for_backend
from segmerge_ros.bench import bench_upsample


def test_every_rung_is_timed_and_identical_to_interpolate(shared_data, capsys):
    video = shared_data / "opencv_samples" / "vtest.avi"
    assert bench_upsample.main(["--size", "96x128", "--frames", "1", "--repeat", "1", "--source", str(video)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    names = {rung.config.name for rung in ladder_for_backend("eager") + ladder_for_backend("openvino")}
    assert {row.split()[0] for row in rows} == names
    assert all(row.split()[-1] == "True" for row in rows), rows
