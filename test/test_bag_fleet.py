"""segmerge-bag over many bags (``--out-dir``): on local Ray with 2 workers and in this process, resumable.

The inputs: two small bags of bag_helpers.py (a rosbag2 folder and a bare .mcap, with different frames) and a file
of garbage bytes named like a bag. Outputs must equal what the single-bag tool writes for the same input and
options, message for message (timing topics excepted); the manifest must say what happened, and a re-run must
redo exactly what is not complete.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
from rich.console import Console

from bag_helpers import DEFAULT_OPTIONS, FRAMES, JPEG, RAW, SMALL, camera_messages, invoke, read_bag, write_bag
from segmerge_ros.apps import bag, bag_manifest, fleet
from segmerge_ros.inference.sources import iter_frames
from segmerge_ros.ros.frame_pipeline import FramePipeline

# A fixed merge rate, pose on (one person per frame: keypoints in every processed frame), one torch thread each.
OPTIONS = [*SMALL, *(o for pair in DEFAULT_OPTIONS.items() for o in pair), "--merge-rate", "0.3", "--pose",
           "--pose-mode", "full_frame", "--threads", "1"]
GOOD = ("a", "b")
PROCESSED = 2 * FRAMES - 1  # per good bag: both cameras' frames but the corrupt JPEG one


def messages(path: Path) -> dict[str, list[tuple[int, object]]]:
    """topic -> [(log time, rclpy message)], without the timing topic (processing_ms differs from run to run).
    Messages, not their CDR bytes: rclpy leaves CDR's alignment padding as it finds it in memory."""
    return {topic: sent for topic, sent in read_bag(path).items() if not topic.endswith("/processing_ms")}


def manifest(out: Path) -> dict:
    return json.loads((out / bag_manifest.MANIFEST_NAME).read_text())["bags"]


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory) -> Path:
    """inputs/a (a rosbag2 folder), inputs/b.mcap (a bare file, other frames), inputs/x.mcap (garbage)."""
    folder = tmp_path_factory.mktemp("inputs")
    frames = list(iter_frames(shared_data / "opencv_samples" / "vtest.avi", max_frames=2 * FRAMES))
    write_bag(folder / "a", "mcap", camera_messages(frames[:FRAMES]))
    made = write_bag(tmp_path_factory.mktemp("made") / "b", "mcap", camera_messages(frames[FRAMES:]))
    shutil.copy(next(made.glob("*.mcap")), folder / "b.mcap")
    (folder / "x.mcap").write_bytes(b"\x89MCAP0\r\n" + bytes(range(256)) * 8)
    return folder


@pytest.fixture(scope="module")
def references(inputs, tmp_path_factory, one_thread_module) -> dict[str, Path]:
    """The single-bag tool's outputs for the good inputs, same options."""
    folder = tmp_path_factory.mktemp("single")
    outputs = {}
    for name, path in (("a", inputs / "a"), ("b", inputs / "b.mcap")):
        code, _, stderr = invoke([path, folder / name, *OPTIONS])
        assert code == 0, stderr
        outputs[name] = folder / name
    return outputs


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray session for the module (starting one costs seconds); the tool uses it instead of its own."""
    try:
        import ray
    except ImportError:
        pytest.fail("Ray is not installed: it is a test requirement (requirements-fleet.txt, make setup)",
                    pytrace=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_run(inputs, local_ray, tmp_path_factory):
    out = tmp_path_factory.mktemp("fleet") / "out"
    code, stdout, stderr = invoke([inputs / "*", "--out-dir", out, "--workers", "2", *OPTIONS])
    return out, code, stdout, stderr


def test_two_ray_workers_write_what_the_single_bag_tool_writes(ray_run, references):
    out, code, stdout, stderr = ray_run
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "a", "b", bag_manifest.MANIFEST_NAME]
    for name in GOOD:
        got, expected = messages(out / name), messages(references[name])
        assert set(got) == set(expected)
        for topic in ("/cam_raw/segmentation/mask", "/cam_jpeg/segmentation/mask", "/cam_raw/segmentation/labels",
                      "/cam_raw/pose/keypoints", "/cam_jpeg/pose/keypoints", "/cam_raw/segmentation/merge_rate"):
            assert got[topic] and got[topic] == expected[topic], (name, topic)
        assert got == expected  # every other topic too, message for message
    a, b = (messages(out / name)["/cam_raw/segmentation/mask"] for name in GOOD)
    assert [bytes(m.data) for _, m in a] != [bytes(m.data) for _, m in b]  # different inputs, different outputs: no mix-up
    entries = manifest(out)
    assert len({entries[name]["worker"] for name in GOOD}) == 2, "both workers took a bag"


def test_the_corrupt_input_is_reported_and_the_others_finish(ray_run):
    out, code, stdout, stderr = ray_run
    assert code == 1
    entries = manifest(out)
    assert entries["x"]["status"] == "failed" and "truncated or corrupt" in entries["x"]["error"]
    assert entries["x"]["error_kind"] == "input"
    assert "x failed: cannot read" in stderr
    row = next(line for line in stdout.splitlines() if line.startswith("│ x "))
    assert "failed" in row and "truncated or corrupt" in stdout
    for name in GOOD:
        entry = entries[name]
        assert entry["status"] == "complete" and entry["checksum"] == bag_manifest.checksum(out / name)
        assert entry["output_fingerprint"] == bag_manifest.fingerprint(out / name)
        assert (entry["frames"], entry["processed"], entry["bad"], entry["persons"]) == (
            2 * FRAMES, PROCESSED, 1, PROCESSED)
        (first, time_s, rate), = entry["cameras"][RAW]["merge_rate_trace"]  # one rate throughout
        assert (first, rate) == (0, 0.3) and time_s == 0.006  # the first frame's log time after the bag's start
        assert entry["cameras"][JPEG]["bad_reasons"] and entry["wall_s"] > 0
    assert "3 inputs: 2 complete, 1 failed" in stdout and not (out / bag_manifest.PARTIAL_DIR).exists()


def test_a_second_run_does_nothing_and_a_deleted_output_is_redone_alone(ray_run, inputs):
    out, *_ = ray_run
    before, files = manifest(out), {name: mtimes(out / name) for name in GOOD}
    code, stdout, stderr = invoke([inputs / "*", "--out-dir", out, "--workers", "2", *OPTIONS])
    assert code == 1  # x is still failed
    assert "a: done earlier" in stderr and "b: done earlier" in stderr
    assert "x: failed earlier on these same files: not retried" in stderr
    assert manifest(out) == before and {name: mtimes(out / name) for name in GOOD} == files
    assert "This run: 0 bag(s), 0 frames" in stdout

    shutil.rmtree(out / "b")
    code, stdout, stderr = invoke([inputs / "*", "--out-dir", out, "--workers", "2", *OPTIONS])
    after = manifest(out)
    assert code == 1 and "b: its output is missing: 8 frames to do" in stderr
    assert after["a"] == before["a"] and mtimes(out / "a") == files["a"]
    assert after["b"]["status"] == "complete" and after["b"]["finished"] >= before["b"]["finished"]
    assert after["b"]["checksum"] == bag_manifest.checksum(out / "b") and after["x"] == before["x"]
    assert "This run: 1 bag(s), 7 frames" in stdout


def test_interrupted_in_process_run_marks_nothing_half_written_complete_and_resumes(inputs, tmp_path, monkeypatch,
                                                                                   one_thread):
    """--workers 1 (no Ray): Ctrl-C in the second bag leaves it unfinished; the re-run redoes only it."""
    out = tmp_path / "out"
    argv = [inputs / "a", inputs / "b.mcap", "--out-dir", out, *OPTIONS]
    process, calls = FramePipeline.process, []

    def interrupted_in_the_second_bag(pipeline, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * FRAMES + 3:
            raise KeyboardInterrupt
        return process(pipeline, *args, **kwargs)

    monkeypatch.setattr(FramePipeline, "process", interrupted_in_the_second_bag)
    code, stdout, stderr = invoke(argv)
    assert code == 130 and "interrupted: b left unfinished" in stderr
    entries = manifest(out)
    assert entries["a"]["status"] == "complete" and entries["b"]["status"] == "running"
    assert (out / "a").is_dir() and not (out / "b").exists()
    assert (out / bag_manifest.PARTIAL_DIR / "b").is_dir()  # the half-written bag, outside DIR's outputs
    assert "interrupted" in next(line for line in stdout.splitlines() if line.startswith("│ b "))

    monkeypatch.setattr(FramePipeline, "process", process)
    args = bag.parse_args([str(a) for a in argv])
    terminal = io.StringIO()
    err = Console(file=terminal, force_terminal=True, width=160)
    code = fleet.run_fleet(args, bag.node_values(args), err, Console(file=io.StringIO()))
    assert code == 0
    shown = terminal.getvalue()
    assert "a: done earlier" in shown and "b: interrupted before it finished: redone" in shown
    assert f"{2 * FRAMES}/{2 * FRAMES}" in shown and "bags 1/1, 0 failed" in shown  # the one progress bar
    assert manifest(out)["b"]["status"] == "complete" and manifest(out)["a"] == entries["a"]
    assert not (out / bag_manifest.PARTIAL_DIR).exists()


def test_workers_without_ray_say_how_to_install_it(inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    code, _, stderr = invoke([inputs / "a", "--out-dir", tmp_path / "out", "--workers", "2", *OPTIONS])
    assert code == 1 and "pip install 'segmerge_ros[fleet]'" in stderr and "requirements-fleet.txt" in stderr
    assert not (tmp_path / "out").exists()


def test_two_positionals_without_out_dir_still_mean_in_out(capsys):
    args = bag.parse_args(["in_bag", "out_bag"])
    assert (args.input, args.output, args.out_dir) == ("in_bag", "out_bag", None)
    # options between IN and OUT, as the single-bag tool always took them
    args = bag.parse_args(["in_bag", "--merge-rate", "0.3", "out_bag"])
    assert (args.input, args.output, args.merge_rate) == ("in_bag", "out_bag", 0.3)
    for argv, message in ((["a", "b", "c"], "give IN OUT for one bag"),
                          (["a", "b", "--workers", "2"], "--workers goes with --out-dir"),
                          (["a", "--out-dir", "d", "--plot", "p.png"], "--plot draws one bag")):
        with pytest.raises(SystemExit):
            bag.parse_args(argv)
        assert message in capsys.readouterr().err
    assert bag.parse_args(["a", "b", "--out-dir", "d"]).paths == ["a", "b"]


def test_resume_rules(tmp_path):
    source = tmp_path / "in.mcap"
    source.write_bytes(b"recording")
    out = tmp_path / "out"
    (out / "in").mkdir(parents=True)
    (out / "in" / "in.mcap").write_bytes(b"output")
    record = bag_manifest.Manifest(out, {"node": {"merge_rate": 0.3}})
    record.record("in", {"status": "complete", "checksum": bag_manifest.checksum(out / "in"),
                         "fingerprint": bag_manifest.fingerprint(source)})
    decide = lambda **kw: bag_manifest.decide(record, "in", source, **kw)  # noqa: E731
    assert (decide().action, decide().reason) == ("skip", "done earlier")
    (out / "in" / "in.mcap").write_bytes(b"outpuT")
    assert (decide().action, decide().reason) == ("do", "its output changed since (checksum)")
    # with the output's file facts recorded, its checksum is read only where they changed, or with --verify
    written = out / "in" / "in.mcap"
    record.bags["in"]["output_fingerprint"] = bag_manifest.fingerprint(out / "in")
    stat = written.stat()
    written.write_bytes(b"outpuX")  # same size; the same modification time restored below
    os.utime(written, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert decide().action == "skip"  # not read: names, sizes and times as recorded
    assert (decide(verify=True).action, decide(verify=True).reason) == ("do", "its output changed since (checksum)")
    os.utime(written, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert decide().reason == "its output changed since (checksum)"  # the time changed: read, and it differs
    record.bags["in"].update(status="failed", error_kind="input")
    assert decide().action == "keep" and decide(retry_failed=True).action == "do"
    record.bags["in"].update(error_kind="run")
    assert decide().action == "do"
    with pytest.raises(bag.BagError, match=r"other options \(node.merge_rate: 0.3 -> 0.5\)"):
        bag_manifest.Manifest.load(out, {"node": {"merge_rate": 0.5}})


def test_the_out_dirs_own_bags_are_left_out_and_recordings_below_it_are_inputs(tmp_path):
    out = tmp_path / "work"
    recordings = out / "recordings"  # recordings below the out dir are inputs
    recordings.mkdir(parents=True)
    for name in ("a.mcap", "b.mcap"):
        (recordings / name).write_bytes(b"recording")
    (out / "a").mkdir()  # an earlier output (a bag folder), directly in the out dir
    (out / "a" / "metadata.yaml").write_text("rosbag2_bagfile_information: {}\n")
    (out / "a" / "a.mcap").write_bytes(b"output")
    inputs, left_out = fleet.expand_inputs([str(out / "**" / "*.mcap")], out)
    assert sorted(inputs) == ["a", "b"] and inputs["a"] == (recordings / "a.mcap").absolute()
    assert left_out == [out / "a" / "a.mcap"]  # inside the output "a": not an input of the same name
    inputs, left_out = fleet.expand_inputs([str(recordings), str(out / "a")], out)
    assert sorted(inputs) == ["a", "b"] and left_out == [out / "a"]
    with pytest.raises(bag.BagError, match="1 path\\(s\\) are --out-dir .*'s own"):
        fleet.expand_inputs([str(out / "a")], out)
