"""Raw-frame delivery between two processes over best-effort sensor-data QoS, with and without config/fastdds.xml.

    python test/transport_probe.py                     # table: sizes x (profile, no profile), 300 frames at 15 Hz
    python test/transport_probe.py --frames 60 --sizes 720x1280

Each measurement starts a receiver and a sender process (``python test/transport_probe.py receive|send ...``) on a
private ROS domain with localhost discovery; the profile, when used, is given to both through
FASTRTPS_DEFAULT_PROFILES_FILE (Fast DDS reads it once per process, so it cannot be switched inside one). The sender
waits until the receiver is matched, then publishes numbered rgb8 frames (every byte = fill(number)) at the rate
asked; the receiver counts the distinct frames that arrive whole and prints one JSON line. test_transport.py uses
:func:`measure`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILE = REPO_ROOT / "config" / "fastdds.xml"
PROFILE_VARIABLE = "FASTRTPS_DEFAULT_PROFILES_FILE"
TOPIC = "/probe/image_raw"
MATCH_TIMEOUT_S = 30.0
# Valid Linux domain ids are 0..101 and 215..232; the other tests use 100..229.
TABLE_DOMAIN_ID = 230
DISTINCT_FILLS = 7  # frames cycle through this many ready-made images (a 1080p frame is 6.2 MB)


def fill(number: int) -> int:
    """The value of every byte of frame ``number``."""
    return 1 + 36 * (number % DISTINCT_FILLS)


FAST_DDS_ERROR = " Error]"  # Fast DDS logs "[XMLPARSER Error] ...", "[RTPS_TRANSPORT_SHM Error] ..." (on stdout)


@dataclass
class Delivery:
    size: tuple[int, int]
    sent: int
    received: int     # distinct frames that arrived whole (right size, every byte right)
    damaged: int      # frames that arrived with the wrong size or content
    profile: bool

    @property
    def ratio(self) -> float:
        return self.received / self.sent if self.sent else 0.0


def probe_env(domain_id: int, profile: Path | None) -> dict[str, str]:
    from segmerge_ros.apps.client import ros_env

    env = ros_env(domain_id)
    env.pop(PROFILE_VARIABLE, None)
    env.pop("RMW_IMPLEMENTATION", None)  # Fast DDS (Jazzy's default) is what the profile is for
    if profile is not None:
        env[PROFILE_VARIABLE] = str(profile)
    return env


def measure(size: tuple[int, int], frames: int, fps: float, profile: Path | None, domain_id: int,
            timeout_s: float = 120.0) -> Delivery:
    """One sender and one receiver process; raises with their output when either fails."""
    env = probe_env(domain_id, profile)
    script = str(Path(__file__).resolve())
    common = ["--size", f"{size[0]}x{size[1]}", "--frames", str(frames), "--fps", str(fps)]
    receiver = subprocess.Popen([sys.executable, script, "receive", *common], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sender = subprocess.Popen([sys.executable, script, "send", *common], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        sender_out, sender_err = sender.communicate(timeout=timeout_s)
        receiver_out, receiver_err = receiver.communicate(timeout=timeout_s)
    finally:
        for process in (sender, receiver):
            if process.poll() is None:
                process.kill()
                process.wait()
    if sender.returncode != 0 or receiver.returncode != 0:
        raise RuntimeError(f"probe failed (sender {sender.returncode}, receiver {receiver.returncode}):\n"
                           f"sender: {sender_out}{sender_err}\nreceiver: {receiver_out}{receiver_err}")
    for text in (sender_out, sender_err, receiver_out, receiver_err):
        if FAST_DDS_ERROR in text:
            raise RuntimeError(f"Fast DDS reported an error:\n{text}")
    report = json.loads(receiver_out.strip().splitlines()[-1])
    sent = json.loads(sender_out.strip().splitlines()[-1])["sent"]
    return Delivery(size, sent, report["received"], report["damaged"], profile is not None)


def fastdds_output(profile: Path | None, domain_id: int) -> str:
    """What Fast DDS prints while a process loads ``profile`` and creates a node with it."""
    code = "import rclpy; rclpy.init(); rclpy.create_node('transport_probe_profile_check'); rclpy.try_shutdown()"
    result = subprocess.run([sys.executable, "-c", code], env=probe_env(domain_id, profile), capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"creating a node with {profile} failed:\n{result.stdout}{result.stderr}")
    return result.stdout + result.stderr


# -- the two processes -------------------------------------------------------------------------------------------
def _ros():
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    return rclpy, qos_profile_sensor_data, Image


def run_sender(size: tuple[int, int], frames: int, fps: float) -> int:
    import numpy as np

    rclpy, sensor_qos, Image = _ros()
    from segmerge_ros.ros.conversions import rgb8_image
    from std_msgs.msg import Header

    rclpy.init()
    node = rclpy.create_node("transport_probe_sender")
    publisher = node.create_publisher(Image, TOPIC, sensor_qos)
    deadline = time.monotonic() + MATCH_TIMEOUT_S
    while publisher.get_subscription_count() == 0:
        if time.monotonic() > deadline:
            print("sender: no receiver matched", file=sys.stderr)
            return 1
        time.sleep(0.05)
    time.sleep(0.5)  # both ends have matched the other (the receiver's own discovery can lag the sender's)
    # Ready-made frames: building them is not what is measured.
    images = [rgb8_image(np.full((*size, 3), fill(number), np.uint8)) for number in range(DISTINCT_FILLS)]
    period = 1.0 / fps
    start = time.monotonic()
    for number in range(frames):
        time.sleep(max(0.0, start + number * period - time.monotonic()))
        image = images[number % DISTINCT_FILLS]
        image.header = Header(stamp=node.get_clock().now().to_msg(), frame_id=str(number))
        publisher.publish(image)
    time.sleep(1.0)  # the last frames are still on their way
    print(json.dumps({"sent": frames}))
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def run_receiver(size: tuple[int, int], frames: int, fps: float) -> int:
    import numpy as np

    rclpy, sensor_qos, Image = _ros()
    rclpy.init()
    node = rclpy.create_node("transport_probe_receiver")
    received: set[int] = set()
    damaged = [0]
    last_arrival = [time.monotonic()]

    def on_image(msg) -> None:
        last_arrival[0] = time.monotonic()
        number = int(msg.header.frame_id)
        data = np.frombuffer(msg.data, np.uint8)
        whole = (msg.height, msg.width) == size and data.size == size[0] * size[1] * 3
        if whole and data[0] == data[-1] == fill(number) and (data == fill(number)).all():
            received.add(number)
        else:
            damaged[0] += 1

    node.create_subscription(Image, TOPIC, on_image, sensor_qos)
    # Until every frame is in, or the sender has had its time plus slack and nothing arrived for 2 s.
    deadline = time.monotonic() + MATCH_TIMEOUT_S + frames / fps + 5.0
    while len(received) < frames and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
        if received and time.monotonic() - last_arrival[0] > 2.0:
            break
    print(json.dumps({"received": len(received), "damaged": damaged[0]}))
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def parse_size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", choices=("table", "send", "receive"), default="table")
    parser.add_argument("--size", type=parse_size, default=(720, 1280), help="HxW (send/receive)")
    parser.add_argument("--sizes", default="720x1280,512x1024,1080x1920", help="HxW list (table)")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--fps", type=float, default=15.0)
    args = parser.parse_args(argv)
    if args.role == "send":
        return run_sender(args.size, args.frames, args.fps)
    if args.role == "receive":
        return run_receiver(args.size, args.frames, args.fps)
    print(f"rgb8 frames, best-effort sensor-data QoS, {args.frames} frames at {args.fps:g} Hz between two processes")
    print(f"{'HxW':<12}{'profile':<22}{'delivered':>10}{'ratio':>8}{'damaged':>9}")
    domain = TABLE_DOMAIN_ID
    for text in args.sizes.split(","):
        for profile in (PROFILE, None):
            result = measure(parse_size(text), args.frames, args.fps, profile, domain)
            name = "config/fastdds.xml" if profile else "Fast DDS defaults"
            print(f"{text:<12}{name:<22}{result.received:>6}/{result.sent:<3}{result.ratio:>8.0%}"
                  f"{result.damaged:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
