"""segmerge-bag end to end on small real bags made here from vtest.avi with rosbags (both storage formats; the bags
are described in bag_helpers.py). The tool runs in this process (no DDS), a random SegFormer-B0 at a small network
input unless a test needs the trained one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from mcap.reader import make_reader
from rclpy.serialization import deserialize_message
from rosbags.rosbag2 import Reader
from sensor_msgs.msg import Image, PointCloud2
from std_msgs.msg import Float32, String
from visualization_msgs.msg import MarkerArray

from bag_helpers import (CORRUPT_JPEG, DEFAULT_OPTIONS, FRAMES, INFO, JPEG, JPEG_SIZE, NOTES, RAW, RAW_SIZE, SMALL,
                         STORAGE_SUFFIX, camera_messages, header_at, invoke, read_bag, stamp_ns, write_bag)
from segmerge_ros.apps import bag, bag_io
from segmerge_ros.ros.conversions import message_to_rgb, mono8_image, rgb8_image
from segmerge_ros.ros.pose_msgs import read_keypoints_cloud
from segmerge_ros.inference.engine import SegmentationEngine
from segmerge_ros.inference.sources import iter_frames


@pytest.fixture(scope="module")
def frames(shared_data) -> list[np.ndarray]:
    return list(iter_frames(shared_data / "opencv_samples" / "vtest.avi", max_frames=FRAMES))


@pytest.fixture(scope="module")
def bags(frames, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bags")
    return {storage: write_bag(folder / storage, storage, camera_messages(frames)) for storage in bag.STORAGES}


class Ran:
    def __init__(self, code: int, out: Path, stdout: str, stderr: str):
        self.code, self.out, self.stdout, self.stderr = code, out, stdout, stderr
        self.topics = read_bag(out) if out.exists() else {}


def run_tool(capsys, args: list[str]) -> Ran:
    """segmerge-bag with ``args``; random weights, eager and fp32 unless ``args`` say otherwise."""
    capsys.readouterr()
    args = [*args, *(option for name, value in DEFAULT_OPTIONS.items() if name not in args for option in (name, value))]
    code = bag.main([str(a) for a in args])
    captured = capsys.readouterr()
    return Ran(code, Path(args[1]), captured.out, captured.err)


@pytest.fixture(scope="module")
def runs(bags, tmp_path_factory, one_thread_module) -> dict[str, Ran]:
    """The tool once per input storage (a .db3 input written as .db3, an .mcap one as MCAP), random weights."""
    folder = tmp_path_factory.mktemp("out")
    results = {}
    for storage, path in bags.items():
        code, stdout, stderr = invoke([path, folder / storage, "--storage", storage, *SMALL,
                                       *(option for pair in DEFAULT_OPTIONS.items() for option in pair)])
        results[storage] = Ran(code, folder / storage, stdout, stderr)
    return results


# -- outputs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_one_mask_per_good_frame_with_its_header_and_log_time(runs, bags, storage):
    ran = runs[storage]
    assert ran.code == 0, ran.stderr
    inputs = read_bag(bags[storage])
    for camera, size in ((RAW, RAW_SIZE), (JPEG, JPEG_SIZE)):
        namespace = camera.split("/")[1]
        sent = inputs[camera]
        good = [(t, m) for i, (t, m) in enumerate(sent) if not (camera == JPEG and i == CORRUPT_JPEG)]
        for name in ("mask", "confidence"):
            outputs = ran.topics[f"/{namespace}/segmentation/{name}"]
            assert len(outputs) == len(good)
            for (log_time, frame), (out_time, out) in zip(good, outputs):
                assert out_time == log_time
                assert stamp_ns(out.header) == stamp_ns(frame.header) and out.header.frame_id == frame.header.frame_id
                assert (out.encoding, out.height, out.width) == ("mono8", *size)
        rates = ran.topics[f"/{namespace}/segmentation/merge_rate"]
        assert [t for t, _ in rates] == [t for t, _ in good] and all(m.data == 0.0 for _, m in rates)
        (label_time, labels), = ran.topics[f"/{namespace}/segmentation/labels"]
        table = json.loads(labels.data)
        assert table["mask_topic"] == f"/{namespace}/segmentation/mask" and len(table["classes"]) == 19
        assert table["randomly_initialised"] is True and label_time == good[0][0]
    assert "/cam_raw/segmentation/overlay" not in ran.topics  # only with --overlay
    assert not any(topic.startswith("/cam_raw/pose") for topic in ran.topics)  # only with --pose


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_input_topics_are_copied_unchanged(runs, bags, storage):
    ran = runs[storage]
    with Reader(bags[storage]) as source, Reader(ran.out) as copy:
        sent = [(c.topic, c.msgtype, t, bytes(raw)) for c, t, raw in source.messages()]
        copied = [(c.topic, c.msgtype, t, bytes(raw)) for c, t, raw in copy.messages(
            [c for c in copy.connections if c.topic in (RAW, INFO, JPEG, NOTES)])]
        assert sorted(copied) == sorted(sent)
        assert {c.topic: c.digest for c in source.connections} == {
            c.topic: c.digest for c in copy.connections if c.topic in (RAW, INFO, JPEG, NOTES)}
    assert ran.out.joinpath(f"{ran.out.name}{STORAGE_SUFFIX[storage]}").is_file()


def test_summary_counts_frames_processed_and_bad(runs):
    ran = runs["mcap"]
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
            for line in ran.stdout.splitlines() if line.startswith("│ /cam")}
    assert rows[RAW][:4] == ["Image", str(FRAMES), str(FRAMES), "0"]
    assert rows[JPEG][:4] == ["CompressedImage", str(FRAMES), str(FRAMES - 1), "1"]
    assert rows[RAW][-1] == "0"  # merge rates used
    total_in = 2 * FRAMES + 2  # both cameras, camera_info, notes
    outputs = 2 * FRAMES + 2 * (FRAMES - 1) + 2  # mask, confidence per good frame; labels per camera
    outputs += 2 * (2 * FRAMES - 1)  # merge_rate and processing_ms per good frame
    assert f"{total_in} messages read, {total_in + outputs} written; {2 * FRAMES - 1} frames processed" in ran.stdout
    assert sum(len(messages) for messages in ran.topics.values()) == total_in + outputs


def test_progress_bar_is_quiet_off_a_terminal(runs):
    ran = runs["mcap"]
    assert "RANDOMLY INITIALISED" in ran.stderr  # stderr was captured ...
    assert "ETA" not in ran.stderr and "━" not in ran.stderr and "fps" not in ran.stderr  # ... without a bar


def test_a_corrupt_frame_is_counted_skipped_and_named(runs):
    ran = runs["mcap"]
    assert f"{JPEG}: skipped bad frame {CORRUPT_JPEG + 1}" in ran.stderr and "truncated JPEG" in ran.stderr
    assert f"bad frames on {JPEG}: 1 x truncated JPEG" in ran.stdout
    jpeg_stamps = [stamp_ns(m.header) for _, m in ran.topics["/cam_jpeg/segmentation/mask"]]
    sent = [stamp_ns(m.header) for _, m in ran.topics[JPEG]]
    assert jpeg_stamps == sent[:CORRUPT_JPEG] + sent[CORRUPT_JPEG + 1:]


def test_output_opens_with_the_mcap_reader(runs):
    ran = runs["mcap"]
    (mcap_file,) = ran.out.glob("*.mcap")
    counts: dict[str, int] = {}
    with open(mcap_file, "rb") as stream:
        reader = make_reader(stream)
        for schema, channel, message in reader.iter_messages():
            assert channel.message_encoding == "cdr" and schema.encoding == "ros2msg" and schema.data
            counts[channel.topic] = counts.get(channel.topic, 0) + 1
            if channel.topic == "/cam_raw/segmentation/mask":
                assert schema.name == "sensor_msgs/msg/Image"
                mask = deserialize_message(message.data, Image)
                assert message.log_time == message.publish_time and mask.height == RAW_SIZE[0]
    assert counts["/cam_raw/segmentation/mask"] == FRAMES and counts["/cam_jpeg/segmentation/mask"] == FRAMES - 1
    assert counts[NOTES] == 1


def test_bare_mcap_file_as_input(bags, tmp_path, capsys, one_thread):
    bare = tmp_path / "recording.mcap"
    shutil.copy(next(bags["mcap"].glob("*.mcap")), bare)
    ran = run_tool(capsys, [bare, tmp_path / "out", "--topics", RAW, *SMALL])
    assert ran.code == 0, ran.stderr
    assert len(ran.topics["/cam_raw/segmentation/mask"]) == FRAMES
    assert "/cam_jpeg/segmentation/mask" not in ran.topics and len(ran.topics[JPEG]) == FRAMES  # copied only


def test_outputs_recorded_earlier_are_replaced_not_mixed_in(frames, tmp_path, capsys, one_thread):
    """A bag recorded with the node running already holds its masks: OUT holds this run's only."""
    stale = mono8_image(np.zeros(RAW_SIZE, np.uint8), header_at(1, "old_run"))
    messages = camera_messages(frames) + [("/cam_raw/segmentation/mask", 2 + i, stale) for i in range(3)]
    path = write_bag(tmp_path / "recorded", "mcap", messages)
    ran = run_tool(capsys, [path, tmp_path / "out", "--topics", RAW, *SMALL])
    assert ran.code == 0, ran.stderr
    masks = [m for _, m in ran.topics["/cam_raw/segmentation/mask"]]
    assert len(masks) == FRAMES and all(m.header.frame_id == "cam_raw_optical" for m in masks)
    assert "replaced: /cam_raw/segmentation/mask: 3 recorded message(s) left out" in ran.stdout


def test_masks_equal_the_engines_for_the_same_frames(bags, tmp_path, capsys, student_dir):
    ran = run_tool(capsys, [bags["mcap"], tmp_path / "out", "--weights", student_dir])
    assert ran.code == 0, ran.stderr
    engine = SegmentationEngine(weights=str(student_dir))
    inputs = read_bag(bags["mcap"])
    for camera in (RAW, JPEG):
        namespace = camera.split("/")[1]
        frames = [m for i, (_, m) in enumerate(inputs[camera]) if not (camera == JPEG and i == CORRUPT_JPEG)]
        masks = [m for _, m in ran.topics[f"/{namespace}/segmentation/mask"]]
        assert len(masks) == len(frames)
        for frame, mask in zip(frames, masks):
            expected = engine.infer(message_to_rgb(frame)).class_map
            got = np.frombuffer(mask.data, np.uint8).reshape(mask.height, mask.width)
            assert np.array_equal(got, expected)
            assert len(np.unique(got)) > 1  # the trained model sees more than one class in vtest


def test_pose_writes_keypoints_per_frame_and_markers_where_calibrated(bags, tmp_path, capsys, one_thread):
    ran = run_tool(capsys, [bags["mcap"], tmp_path / "out", "--pose", "--pose-mode", "full_frame", "--overlay",
                            *SMALL])
    assert ran.code == 0, ran.stderr
    raw_frames = [m for _, m in ran.topics[RAW]]
    clouds = [m for _, m in ran.topics["/cam_raw/pose/keypoints"]]
    assert [stamp_ns(c.header) for c in clouds] == [stamp_ns(f.header) for f in raw_frames]
    for cloud in clouds:
        points = read_keypoints_cloud(cloud)
        assert points.shape == (1, 17)  # full_frame: one person
        assert np.all(points["z"] == 1.0)  # camera_info known: unit-depth rays
        assert np.allclose(points["x"], (points["u"] - 79.5) / 150.0, atol=1e-5)
    assert len(ran.topics["/cam_jpeg/pose/keypoints"]) == FRAMES - 1
    assert len(ran.topics["/cam_raw/pose/markers"]) == FRAMES and "/cam_jpeg/pose/markers" not in ran.topics
    overlay = ran.topics["/cam_raw/segmentation/overlay"][0][1]
    assert (overlay.encoding, overlay.height, overlay.width) == ("rgb8", *RAW_SIZE)


def test_budget_mode_records_each_frames_rate_and_plots(bags, tmp_path, capsys, one_thread):
    plot = tmp_path / "timeline.png"
    # 1 ms cannot be met: calibration walks the rates (several frames each), then the fastest rate stays.
    ran = run_tool(capsys, [bags["mcap"], tmp_path / "out", "--budget-ms", "1", "--topics", RAW, "--plot", plot,
                            *SMALL])
    assert ran.code == 0, ran.stderr
    rates = [m.data for _, m in ran.topics["/cam_raw/segmentation/merge_rate"]]
    assert len(rates) == FRAMES and rates[0] == 0.0 and len(set(rates)) > 1
    times = [m.data for _, m in ran.topics["/cam_raw/segmentation/processing_ms"]]
    assert all(t > 0 for t in times)
    assert "budget 1 ms per frame" in ran.stdout
    image = cv2.imread(str(plot))
    assert image is not None and image.shape[0] > 200 and image.std() > 0


def test_a_failing_frame_is_counted_logged_with_its_traceback_and_the_rest_written(bags, tmp_path, capsys,
                                                                                    monkeypatch, one_thread):
    infer = SegmentationEngine.infer
    calls = []

    def fail_on_the_second_camera_frame(engine, rgb, **options):
        if rgb.shape[:2] == RAW_SIZE:  # camera frames only (not the warm-up)
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("simulated device failure")
        return infer(engine, rgb, **options)

    monkeypatch.setattr(SegmentationEngine, "infer", fail_on_the_second_camera_frame)
    ran = run_tool(capsys, [bags["mcap"], tmp_path / "out", "--topics", RAW, *SMALL])
    assert ran.code == 1 and "1 frame(s) failed" in ran.stderr
    assert "simulated device failure" in ran.stderr and "Traceback" in ran.stderr
    assert "failed frames on /cam_raw/image: 1 x RuntimeError" in ran.stdout
    assert len(ran.topics["/cam_raw/segmentation/mask"]) == FRAMES - 1


# -- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, reason", [
    (["--merge-rate", "1.5"], "merge_rate must lie in [0, 0.95]; got 1.5"),
    (["--preset", "turbo"], "preset must be one of"),
    (["--model", "segformer-b9"], "model must be segformer-b0 .. segformer-b5"),
    (["--pose-mode", "sideways"], "pose.mode must be one of"),
    (["--budget-ms", "0"], "budget.target_latency_ms must lie in"),
    (["--weights", "/nonexistent/model.safetensors"], "cannot load weights '/nonexistent/model.safetensors'"),
    (["--weights", ""], "weights is empty: set it to a checkpoint"),
    (["--pose", "--pose-weights", "/nonexistent/pose.pth", *SMALL], "cannot load pose.weights '/nonexistent/pose.pth'"),
])
def test_options_the_node_would_refuse_are_refused_before_writing(bags, tmp_path, capsys, options, reason):
    ran = run_tool(capsys, [bags["mcap"], tmp_path / "out", *options])
    assert ran.code == 1 and reason in ran.stderr and not (tmp_path / "out").exists()


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    ran = run_tool(capsys, [tmp_path / "nothing", tmp_path / "out"])
    assert ran.code == 1 and "input bag" in ran.stderr and "does not exist" in ran.stderr
    assert not (tmp_path / "out").exists()


def test_folder_without_metadata_names_the_file_to_pass(bags, tmp_path, capsys):
    folder = tmp_path / "no_metadata"
    shutil.copytree(bags["mcap"], folder)
    (folder / "metadata.yaml").unlink()
    ran = run_tool(capsys, [folder, tmp_path / "out"])
    assert ran.code == 1 and "has no metadata.yaml" in ran.stderr and "mcap.mcap: pass that file" in ran.stderr


def test_bag_without_image_topics_lists_what_it_has(tmp_path, capsys):
    notes = write_bag(tmp_path / "notes", "mcap", [(NOTES, 1, String(data="hello"))])
    ran = run_tool(capsys, [notes, tmp_path / "out"])
    assert ran.code == 1 and "no sensor_msgs/Image or CompressedImage topic" in ran.stderr
    assert "/notes (std_msgs/msg/String)" in ran.stderr and not (tmp_path / "out").exists()


def test_unknown_topic_and_existing_output_are_refused(bags, tmp_path, capsys):
    ran = run_tool(capsys, [bags["mcap"], tmp_path / "out", "--topics", "/elsewhere/image"])
    assert ran.code == 1 and "/elsewhere/image is not in the bag" in ran.stderr and RAW in ran.stderr
    ran = run_tool(capsys, [bags["mcap"], tmp_path / "out", "--topics", NOTES])
    assert ran.code == 1 and "std_msgs/msg/String, not a sensor_msgs/Image" in ran.stderr
    ran = run_tool(capsys, [bags["mcap"], bags["sqlite3"]])
    assert ran.code == 1 and "exists already" in ran.stderr


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_truncated_bag_is_a_clear_error(bags, tmp_path, capsys, storage):
    damaged = tmp_path / "damaged"
    shutil.copytree(bags[storage], damaged)
    (data,) = damaged.glob(f"*{STORAGE_SUFFIX[storage]}")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    ran = run_tool(capsys, [damaged, tmp_path / "out", *SMALL])
    assert ran.code == 1 and "truncated or corrupt" in ran.stderr
    assert ("mcap recover" if storage == "mcap" else "ros2 bag reindex") in ran.stderr


def test_damage_found_part_way_stops_reading_and_keeps_what_came_before(frames, tmp_path, capsys, one_thread):
    messages = camera_messages(frames)
    path = write_bag(tmp_path / "damaged", "sqlite3", messages)
    (database,) = path.glob("*.db3")
    data = bytearray(database.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")  # SQLite's file header
    third_raw = bytes([message for topic, _, message in messages if topic == RAW][2].data)
    pixels = third_raw[len(third_raw) // 2:][:64]  # stored in an overflow page: opening the bag does not read it
    assert data.count(pixels) == 1
    page = data.find(pixels) // page_size * page_size
    data[page:page + 16] = b"\xff" * 16  # reading stops at the third raw frame
    database.write_bytes(data)
    ran = run_tool(capsys, [path, tmp_path / "out", "--topics", RAW, *SMALL])
    assert ran.code == 1 and "is truncated or corrupt" in ran.stderr and "holds what came before it" in ran.stderr
    masks = ran.topics["/cam_raw/segmentation/mask"]  # OUT was closed properly: it opens and holds the first ones
    assert len(masks) == 2 and "2 frames processed" in ran.stdout


def test_unknown_encoding_frames_are_bad_with_the_reason(frames, tmp_path, capsys, one_thread):
    odd = rgb8_image(cv2.resize(frames[0], RAW_SIZE[::-1]), header_at(1, "cam"))
    odd.encoding = "bayer_weird42"
    path = write_bag(tmp_path / "odd", "mcap", [(RAW, 1 + i, odd) for i in range(2)])
    ran = run_tool(capsys, [path, tmp_path / "out", *SMALL])
    assert ran.code == 1 and "no frame could be processed" in ran.stderr
    assert "unsupported encoding 'bayer_weird42'" in ran.stderr
    assert f"bad frames on {RAW}: 2 x unsupported encoding" in ran.stdout
    assert len(ran.topics[RAW]) == 2 and "/cam_raw/segmentation/mask" not in ran.topics  # copied, no outputs


def test_raw_topic_wins_over_its_own_compressed_copy():
    types = {"/cam/image": "sensor_msgs/msg/Image", "/cam/image/compressed": "sensor_msgs/msg/CompressedImage",
             "/other/image/compressed": "sensor_msgs/msg/CompressedImage"}
    assert bag.select_cameras(types, None) == ["/cam/image", "/other/image/compressed"]
    with pytest.raises(bag.BagError, match="would both publish"):
        bag.select_cameras(types, ["/cam/image", "/cam/image/compressed"])


def test_output_types_carry_the_installed_ros_definitions():
    """rosbags' Jazzy hashes for what the tool writes equal the type hashes rosidl installed beside the messages
    (share/<package>/msg/<Type>.json under $AMENT_PREFIX_PATH, or this environment's prefix for the pip wheels)."""
    prefixes = [Path(p) for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p] + [Path(sys.prefix)]
    for message in (Image(), String(), Float32(), PointCloud2(), MarkerArray()):
        name = bag_io.ros_type_name(message)
        package, _, type_name = name.split("/")
        found = [p / "share" / package / "msg" / f"{type_name}.json" for p in prefixes]
        described = next((f for f in found if f.is_file()), None)
        assert described is not None, f"no type description of {name} in {prefixes}"
        hashes = json.loads(described.read_text())["type_hashes"]
        assert hashes[0]["type_name"] == name
        assert hashes[0]["hash_string"] == bag_io.OUTPUT_TYPESTORE.hash_rihs01(name), name


def test_the_default_backend_and_precision_choose_by_timing_and_say_so(bags, tmp_path, capsys):
    """segmerge-bag follows the node's defaults (backend auto, precision auto): every good frame is processed by
    the backend timed fastest here, and the summary names it with the figures it was chosen from."""
    ran = run_tool(capsys, [bags["mcap"], tmp_path / "out", *SMALL, "--backend", "auto", "--precision", "auto",
                            "--engine-cache-dir", tmp_path / "engines"])
    assert ran.code == 0, ran.stderr
    line = next(line for line in ran.stdout.splitlines() if line.startswith("backend: "))
    assert line.split()[1].rstrip(",") in ("eager", "openvino") and "(auto: " in line and " ms" in line, line
    inputs = read_bag(bags["mcap"])
    assert len(ran.topics["/cam_raw/segmentation/mask"]) == len(inputs[RAW])
