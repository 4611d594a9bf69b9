"""ros/log_bridge.py: the library's Python log records reach the node's ROS log (they were dropped: INFO, or printed
bare on stderr: WARNING)."""

from __future__ import annotations

import logging
import subprocess
import sys

PROBE = r"""
import logging
import rclpy
import rclpy.logging
from segmerge_ros.ros.log_bridge import forward_library_logs
rclpy.init()
forward_library_logs(rclpy.logging.get_logger("segmerge"))
logging.getLogger("segmerge_ros.inference.engine").info("freed the rungs of 360x480 (probe)")
logging.getLogger("segmerge_ros.inference.backends.openvino").warning("rung compiled again (probe)")
logging.getLogger("segmerge_ros.inference.engine").debug("not shown (probe)")
logging.getLogger("other_library").info("someone else's (probe)")
rclpy.shutdown()
"""


def test_library_records_go_to_the_ros_log_at_their_severity():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    lines = (done.stdout + done.stderr).splitlines()
    info = [line for line in lines if "freed the rungs of 360x480 (probe)" in line]
    warning = [line for line in lines if "rung compiled again (probe)" in line]
    assert len(info) == 1 and "[INFO]" in info[0] and "[segmerge]" in info[0], lines
    assert len(warning) == 1 and "[WARN]" in warning[0] and "[segmerge]" in warning[0], lines
    assert not any("not shown (probe)" in line or "someone else's (probe)" in line for line in lines)


def test_forwarding_twice_keeps_one_handler():
    from segmerge_ros.ros.log_bridge import LIBRARY_LOGGER, RosLogHandler, forward_library_logs

    class Collect:
        def __init__(self):
            self.infos = []

        def info(self, message):
            self.infos.append(message)

    library = logging.getLogger(LIBRARY_LOGGER)
    saved = (list(library.handlers), library.level, library.propagate)
    try:
        first, second = Collect(), Collect()
        forward_library_logs(first)
        forward_library_logs(second)
        logging.getLogger(f"{LIBRARY_LOGGER}.inference.pose").info("once")
        assert first.infos == [] and second.infos == ["once"]
        assert sum(isinstance(h, RosLogHandler) for h in library.handlers) == 1
    finally:
        library.handlers[:] = saved[0]
        library.setLevel(saved[1])
        library.propagate = saved[2]
