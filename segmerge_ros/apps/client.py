"""A client for a segmerge node in another process, and how to start ROS processes for demos and tests.

:class:`SegmergeClient` sets and reads the node's parameters through its services, collects its diagnostics,
parameter events and image outputs; :func:`node_command`, :func:`camera_command`, :func:`ros_env` and
:func:`stop_process` start and stop the node and camera processes on localhost discovery and a private
ROS_DOMAIN_ID. Used by the ROS demo (``demo.py``) and the integration tests.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import ParameterEvent
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter, parameter_value_to_python
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import String


# -- starting processes ------------------------------------------------------------------------------------------
def ros_env(domain_id: int) -> dict[str, str]:
    """The environment for a ROS process of this demo/test: localhost discovery on a private domain."""
    env = dict(os.environ)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


FASTDDS_PROFILE_VARIABLE = "FASTRTPS_DEFAULT_PROFILES_FILE"


def package_fastdds_profile() -> Path | None:
    """The package's Fast DDS profile (config/fastdds.xml: a shared-memory segment large enough for raw frames up to
    1920x1080): in this checkout, else where colcon installed it; None when neither exists."""
    checkout = Path(__file__).resolve().parents[2] / "config" / "fastdds.xml"
    if checkout.is_file():
        return checkout
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    except ImportError:
        return None
    try:
        installed = Path(get_package_share_directory("segmerge_ros")) / "config" / "fastdds.xml"
    except PackageNotFoundError:
        return None
    return installed if installed.is_file() else None


def with_fastdds_profile(env: dict[str, str]) -> tuple[dict[str, str], str | None, bool]:
    """``env`` with FASTRTPS_DEFAULT_PROFILES_FILE set to the package's profile unless it is set already (the
    user's choice wins, as in segmerge.launch.py). Returns (env, the profile in use or None, chosen by the user)."""
    if env.get(FASTDDS_PROFILE_VARIABLE):
        return env, env[FASTDDS_PROFILE_VARIABLE], True
    profile = package_fastdds_profile()
    if profile is None:
        return env, None, False
    return {**env, FASTDDS_PROFILE_VARIABLE: str(profile)}, str(profile), False


def ros_args(params: dict[str, Any]) -> list[str]:
    """``--ros-args -p name:=value ...``; values in JSON, a YAML subset, so "off" stays a string, 0.0 a double."""
    args = ["--ros-args"]
    for name, value in params.items():
        args += ["-p", f"{name}:={json.dumps(value)}"]
    return args


def node_command(params: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "segmerge_ros.ros.node", *ros_args(params)]


def camera_command(options: dict[str, Any]) -> list[str]:
    args = [sys.executable, "-m", "segmerge_ros.apps.camera_node"]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value not in (None, False, ""):
            args += [flag, str(value)]
    return args


def stop_process(process: subprocess.Popen, sig: int = signal.SIGINT, timeout_s: float = 5.0) -> float:
    """Signal a process and wait for it; returns how long it took (kills it after ``timeout_s``)."""
    if process.poll() is not None:
        return 0.0
    started = time.monotonic()
    process.send_signal(sig)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return time.monotonic() - started


# -- talking to a running node -----------------------------------------------------------------------------------
@dataclass
class Received:
    """One output message as the client saw it."""

    receipt_ns: int
    stamp_ns: int
    msg: Image | None  # only the newest few keep their message (masks at camera resolution add up quickly)

    @property
    def latency_ms(self) -> float:
        return (self.receipt_ns - self.stamp_ns) / 1e6


@dataclass
class DiagnosticsWindow:
    time: float                      # monotonic receipt time
    values: dict[str, str]
    level: int
    message: str

    def number(self, key: str) -> float:
        try:
            return float(self.values.get(key, "nan"))
        except ValueError:
            return math.nan


class SegmergeClient:
    """A client node for a segmerge node in another process: parameters, diagnostics and outputs."""

    def __init__(self, context: Context, target: str = "/segmerge", name: str = "segmerge_client"):
        self.target = target
        self.node = Node(name, context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self._set = self.node.create_client(SetParameters, f"{target}/set_parameters")
        self._get = self.node.create_client(GetParameters, f"{target}/get_parameters")
        self.diagnostics: dict[str, list[DiagnosticsWindow]] = {}
        self.rate_changes: list[tuple[float, float]] = []
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.node.create_subscription(ParameterEvent, "/parameter_events", self._on_parameter_event, 100)
        self.outputs: dict[str, list[Received]] = {}

    # spinning
    def spin_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=min(0.05, max(end - time.monotonic(), 0.0)))

    def spin_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if predicate():
                return True
            self.executor.spin_once(timeout_sec=0.05)
        return predicate()

    def wait_ready(self, timeout_s: float, process: subprocess.Popen | None = None) -> None:
        """Wait for the node's parameter service; fail early when its process has exited."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the node exited with code {process.returncode} before becoming ready")
            if self._set.wait_for_service(timeout_sec=0.2) and self._get.wait_for_service(timeout_sec=0.2):
                return
        raise TimeoutError(f"{self.target} did not offer its parameter services within {timeout_s:.0f} s")

    def _call(self, client, request, timeout_s: float):
        future = client.call_async(request)
        self.spin_until(future.done, timeout_s)
        if not future.done():
            raise TimeoutError(f"{client.srv_name} did not answer within {timeout_s:.0f} s")
        return future.result()

    # parameters
    def set_parameters(self, values: dict[str, Any], timeout_s: float = 10.0):
        """Set parameters one by one as ``ros2 param set`` does; returns the SetParametersResult per name."""
        request = SetParameters.Request(parameters=[Parameter(n, value=v).to_parameter_msg() for n, v in
                                                    values.items()])
        response = self._call(self._set, request, timeout_s)
        return dict(zip(values, response.results))

    def set_raw(self, name: str, value_msg, timeout_s: float = 10.0):
        """Set one parameter from a ready-made ParameterValue (e.g. a deliberately wrong type)."""
        from rcl_interfaces.msg import Parameter as ParameterMsg

        request = SetParameters.Request(parameters=[ParameterMsg(name=name, value=value_msg)])
        return self._call(self._set, request, timeout_s).results[0]

    def get_parameters(self, *names: str, timeout_s: float = 10.0) -> dict[str, Any]:
        response = self._call(self._get, GetParameters.Request(names=list(names)), timeout_s)
        return {n: parameter_value_to_python(v) for n, v in zip(names, response.values)}

    def _on_parameter_event(self, event: ParameterEvent) -> None:
        if event.node != self.target:
            return
        for parameter in event.changed_parameters:
            if parameter.name == "merge_rate":
                self.rate_changes.append((time.monotonic(), parameter.value.double_value))

    # diagnostics
    def _on_diagnostics(self, array: DiagnosticArray) -> None:
        now = time.monotonic()
        for status in array.status:
            if not status.name.startswith(self.target.lstrip("/") + ":"):
                continue
            level = status.level[0] if isinstance(status.level, bytes) else int(status.level)  # a byte field
            window = DiagnosticsWindow(now, {kv.key: kv.value for kv in status.values}, level, status.message)
            self.diagnostics.setdefault(status.hardware_id, []).append(window)

    def latest(self, camera_topic: str) -> DiagnosticsWindow | None:
        windows = self.diagnostics.get(camera_topic)
        return windows[-1] if windows else None

    def windows_after(self, camera_topic: str, since: float) -> list[DiagnosticsWindow]:
        return [w for w in self.diagnostics.get(camera_topic, []) if w.time > since]

    # outputs
    def subscribe_images(self, topic: str, depth: int = 50, keep_messages: int = 5) -> list[Received]:
        """Collect images from ``topic`` (best effort, matching any publisher) with their receipt time; the last
        ``keep_messages`` entries keep the message itself. Subscribing to a topic again returns the same list."""
        if topic in self.outputs:
            return self.outputs[topic]
        received = self.outputs.setdefault(topic, [])

        def keep(msg: Image) -> None:
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            received.append(Received(self.node.get_clock().now().nanoseconds, stamp, msg))
            if len(received) > keep_messages:
                received[-keep_messages - 1].msg = None

        qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.BEST_EFFORT)
        self.node.create_subscription(Image, topic, keep, qos)
        return received

    def latched_string(self, topic: str, timeout_s: float = 10.0) -> str | None:
        got: list[str] = []
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        subscription = self.node.create_subscription(String, topic, lambda m: got.append(m.data), qos)
        self.spin_until(lambda: bool(got), timeout_s)
        self.node.destroy_subscription(subscription)
        return got[0] if got else None

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=0.5)
        self.node.destroy_node()
