"""segmerge_camera: publish real frames (a video, a folder of images or one image) as a camera would.

    segmerge_camera --source vtest.avi --fps 10 --encoding jpeg --loop
    segmerge_camera --ros-args -p source:=/data/frames -p fps:=5.0 -p frame_id:=front_camera

Command-line options set the defaults of the ROS parameters of the same name (dashes become underscores), so
``--ros-args -p`` and a params file override them. Frames go out with header.stamp = now and the ``frame_id``
parameter, with sensor-data QoS (best effort, keep last 1): rgb8 or bgr8 ``sensor_msgs/Image`` on ``<topic>``, or
JPEG ``sensor_msgs/CompressedImage`` on ``<topic>/compressed`` (image_transport's naming).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Iterator

import cv2
import numpy as np
import rclpy
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.utilities import remove_ros_args
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from segmerge_ros.inference.engine import parse_size
from segmerge_ros.inference.sources import default_video, iter_frames
from segmerge_ros.ros.conversions import bgr8_image, jpeg_image, rgb8_image

CAMERA_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT,
                        durability=DurabilityPolicy.VOLATILE)
ENCODINGS = ("rgb8", "bgr8", "jpeg")


def build_parser() -> argparse.ArgumentParser:
    video = default_video()
    parser = argparse.ArgumentParser(prog="segmerge_camera", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(video) if video else "",
                        help=f"video file, image folder or image (default: {video or 'none found'})")
    parser.add_argument("--fps", type=float, default=10.0, help="frames per second (default 10)")
    parser.add_argument("--topic", default="image", help="image topic; jpeg goes to <topic>/compressed")
    parser.add_argument("--frame-id", default="camera", help="header.frame_id (default camera)")
    parser.add_argument("--encoding", choices=ENCODINGS, default="rgb8", help="rgb8 | bgr8 | jpeg (default rgb8)")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--resize", default="", help="HEIGHTxWIDTH to resize frames to (default: as read)")
    parser.add_argument("--max-frames", type=int, default=0, help="stop after this many frames (0 = no limit)")
    parser.add_argument("--loop", action="store_true", help="start over at the end of the source")
    return parser


class CameraPublisher(Node):
    def __init__(self, defaults: argparse.Namespace):
        super().__init__("segmerge_camera")
        settings = {name: self.declare_parameter(name, value).value for name, value in vars(defaults).items()}
        if not settings["source"]:
            raise ValueError("no frame source: pass --source (no shared vtest.avi or opencv-doc copy was found)")
        if settings["encoding"] not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {settings['encoding']!r}")
        if not settings["fps"] > 0:
            raise ValueError(f"fps must be > 0, got {settings['fps']}")
        self.encoding = settings["encoding"]
        self.frame_id = settings["frame_id"]
        self.jpeg_quality = int(settings["jpeg_quality"])
        self.size = parse_size(settings["resize"] or None)
        max_frames = int(settings["max_frames"]) or None
        frames = iter_frames(settings["source"], max_frames=max_frames, loop=bool(settings["loop"]))
        first = next(frames, None)  # opens the source now, so a bad path fails at start-up with a clear message
        if first is None:
            raise FileNotFoundError(f"no frames in {settings['source']}")
        self.frames: Iterator[np.ndarray] = itertools.chain([first], frames)
        if self.encoding == "jpeg":
            self.publisher = self.create_publisher(CompressedImage, settings["topic"] + "/compressed", CAMERA_QOS)
        else:
            self.publisher = self.create_publisher(Image, settings["topic"], CAMERA_QOS)
        self.published = 0
        self.finished = False
        self.create_timer(1.0 / float(settings["fps"]), self._publish_next)
        self.get_logger().info(f"publishing {settings['source']} on {self.publisher.topic_name} "
                               f"({self.encoding}, {settings['fps']:g} fps{', looping' if settings['loop'] else ''})")

    def _publish_next(self) -> None:
        if self.finished:
            return
        frame = next(self.frames, None)
        if frame is None:
            self.finished = True
            return
        if self.size is not None and frame.shape[:2] != self.size:
            frame = cv2.resize(frame, (self.size[1], self.size[0]), interpolation=cv2.INTER_AREA)
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self.frame_id)
        if self.encoding == "jpeg":
            msg = jpeg_image(frame, header, self.jpeg_quality)
        elif self.encoding == "bgr8":
            msg = bgr8_image(frame, header)
        else:
            msg = rgb8_image(frame, header)
        self.publisher.publish(msg)
        self.published += 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    options = build_parser().parse_args(remove_ros_args(argv)[1:])
    try:
        rclpy.init(args=argv)
        try:
            node = CameraPublisher(options)
        except (ValueError, FileNotFoundError, ParameterException) as error:
            rclpy.logging.get_logger("segmerge_camera").fatal(str(error))
            return 1
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        try:
            while rclpy.ok() and not node.finished:
                executor.spin_once(timeout_sec=0.1)
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            summary = f"published {node.published} frames"
            if rclpy.ok():
                node.get_logger().info(summary)
            else:  # after SIGINT/SIGTERM the context is gone, and with it the logger's /rosout publisher
                print(f"[segmerge_camera] {summary}", file=sys.stderr, flush=True)
            executor.shutdown(timeout_sec=0.5)
            node.destroy_node()
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
