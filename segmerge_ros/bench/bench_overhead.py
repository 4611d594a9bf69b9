"""What the node costs per frame beyond model inference (a benchmark, not a test).

    python -m segmerge_ros.bench.bench_overhead [--frames 100] [--size 480x640] [--encoding rgb8]

Runs the real SegmergeNode's per-frame path (decode the received message, build and publish mask, confidence and
overlay, bookkeeping) with the engine's inference replaced by a precomputed result, on real vtest frames, with a
subscriber for every output in another process (so the overlay is computed and every message crosses DDS).
Prints per-step medians and the per-frame total; the goal is <= 5 ms per frame at 640x480 for raw input.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import zlib

import cv2
import numpy as np
import rclpy
from rclpy.context import Context
from rclpy.parameter import Parameter
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import Header

from segmerge_ros.models.labels import overlay
from segmerge_ros.inference.engine import parse_size
from segmerge_ros.inference.sources import default_video, iter_frames
from segmerge_ros.ros.conversions import bgr8_image, jpeg_image, message_to_rgb, mono8_image, rgb8_image
from segmerge_ros.ros.node import SegmergeNode

TOPIC = "/bench/image"
LISTENER = """
import sys, rclpy
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
rclpy.init()
node = Node("bench_listener")
qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
for topic in sys.argv[1:]:
    node.create_subscription(Image, topic, lambda msg: None, qos)
try:
    rclpy.spin(node)
except BaseException:
    pass
"""


def received(msg):
    """The message as a subscriber gets it (data as array.array), via a serialisation round trip."""
    return deserialize_message(serialize_message(msg), type(msg))


def timed(function, repeats: int) -> list[float]:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segmerge-bench-overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", default="480x640", help="camera frames HEIGHTxWIDTH (default 480x640)")
    parser.add_argument("--encoding", choices=("rgb8", "bgr8", "jpeg"), default="rgb8")
    parser.add_argument("--source", default=None, help="video/images (default vtest.avi)")
    parser.add_argument("--domain-id", type=int, default=100 + zlib.crc32(b"bench_overhead") % 100)
    args = parser.parse_args(argv)

    height, width = parse_size(args.size)
    source = args.source or default_video()
    if source is None:
        print("no video found: pass --source", file=sys.stderr)
        return 2
    rgb_frames = [cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA)
                  for f in iter_frames(source, max_frames=min(args.frames, 50))]
    build = {"rgb8": rgb8_image, "bgr8": bgr8_image, "jpeg": jpeg_image}[args.encoding]
    messages = [received(build(f, Header(frame_id="bench"))) for f in rgb_frames]

    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    context = Context()
    rclpy.init(context=context, domain_id=args.domain_id)
    topic = TOPIC + ("/compressed" if args.encoding == "jpeg" else "")
    listener = None
    node = SegmergeNode(context=context, parameter_overrides=[
        Parameter("image_topics", value=[topic]), Parameter("input_size", value="64x64"),
        Parameter("weights", value="random"), Parameter("backend", value="eager"), Parameter("precision", value="fp32")])
    try:
        camera = node.cameras[0]
        outputs = (camera.mask_pub, camera.confidence_pub, camera.overlay_pub)
        # A subscriber per output in another process, as in a real system: every message really crosses DDS.
        listener = subprocess.Popen([sys.executable, "-c", LISTENER, *(p.topic_name for p in outputs)],
                                    env=dict(os.environ, ROS_DOMAIN_ID=str(args.domain_id)))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and min(p.get_subscription_count() for p in outputs) < 1:
            time.sleep(0.05)
        if min(p.get_subscription_count() for p in outputs) < 1:
            raise RuntimeError("the listener process did not subscribe within 30 s")

        result = node.engine.infer(message_to_rgb(messages[0]))  # real maps at camera resolution, computed once
        node.engine.infer = lambda rgb, **options: result  # what remains is the node's own work
        node.stop()  # the bench drives _process itself

        frame = message_to_rgb(messages[0])
        palette = node.engine.labels.palette
        header = messages[0].header
        mask_msg = mono8_image(result.class_map, header)
        overlay_rgb = overlay(frame, result.class_map, palette, 0.5)
        overlay_msg = rgb8_image(overlay_rgb, header)
        repeats = max(args.frames // 2, 10)
        steps = [
            (f"decode {args.encoding} message -> RGB", timed(lambda: message_to_rgb(messages[0]), repeats)),
            ("build mask (mono8)", timed(lambda: mono8_image(result.class_map, header), repeats)),
            ("build confidence (mono8)", timed(lambda: mono8_image(result.confidence, header), repeats)),
            ("compute overlay (alpha blend)", timed(lambda: overlay(frame, result.class_map, palette, 0.5), repeats)),
            ("build overlay (rgb8)", timed(lambda: rgb8_image(overlay_rgb, header), repeats)),
            ("publish mask", timed(lambda: camera.mask_pub.publish(mask_msg), repeats)),
            ("publish overlay", timed(lambda: camera.overlay_pub.publish(overlay_msg), repeats)),
        ]
        totals = []
        for i in range(args.frames):
            started = time.perf_counter()
            node._process(camera, messages[i % len(messages)])
            totals.append((time.perf_counter() - started) * 1e3)
        totals = totals[2:]  # the first calls allocate

        print(f"\nnode overhead beyond inference: {width}x{height} {args.encoding}, {args.frames} frames, "
              "mask + confidence + overlay published to a subscriber in another process")
        rows = [(name, statistics.median(t), float(np.percentile(t, 90))) for name, t in steps]
        rows.append(("node per-frame total (_process)", statistics.median(totals), float(np.percentile(totals, 90))))
        width_name = max(len(r[0]) for r in rows)
        print(f"{'step':<{width_name}}  {'median ms':>9}  {'p90 ms':>7}")
        print(f"{'-' * width_name}  {'-' * 9}  {'-' * 7}")
        for name, median, p90 in rows:
            if name.startswith("node per-frame"):
                print(f"{'-' * width_name}  {'-' * 9}  {'-' * 7}")
            print(f"{name:<{width_name}}  {median:9.2f}  {p90:7.2f}")
        verdict = "within" if statistics.median(totals) <= 5.0 else "OVER"
        print(f"\n{verdict} the 5 ms per-frame goal (the steps above are timed separately; the total is the node's "
              "real path, including bookkeeping)")
        return 0
    finally:
        if listener is not None:
            listener.terminate()
            listener.wait()
        node.destroy_node()
        rclpy.try_shutdown(context=context)


if __name__ == "__main__":
    sys.exit(main())
