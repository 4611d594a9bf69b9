"""The library's Python log records in the node's ROS log.

Models, engines and backends log with Python's ``logging`` (they run without ROS); without a handler, Python drops
their INFO records and prints WARNINGs bare on stderr, outside the node's log format and /rosout: an operator never
saw, e.g., a frame size's compiled rungs freed, a rung compiled again, or the steps budget mode skips. The node's
``main()`` forwards the ``segmerge_ros`` loggers to its rclpy logger instead, INFO and above.
"""

from __future__ import annotations

import logging

LIBRARY_LOGGER = "segmerge_ros"


class RosLogHandler(logging.Handler):
    """Forwards records to an rclpy logger at the matching severity (rcutils logging is thread-safe)."""

    def __init__(self, ros_logger):
        super().__init__()
        self.ros_logger = ros_logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.ERROR:
                self.ros_logger.error(message)
            elif record.levelno >= logging.WARNING:
                self.ros_logger.warning(message)
            elif record.levelno >= logging.INFO:
                self.ros_logger.info(message)
            else:
                self.ros_logger.debug(message)
        except Exception:  # noqa: BLE001 - logging must never break a frame; logging's own report
            self.handleError(record)


def forward_library_logs(ros_logger, level: int = logging.INFO) -> RosLogHandler:
    """Send the ``segmerge_ros`` loggers' records at ``level`` and above to ``ros_logger`` (once per process: a
    second call replaces the first handler). Returns the handler."""
    library = logging.getLogger(LIBRARY_LOGGER)
    for handler in [h for h in library.handlers if isinstance(h, RosLogHandler)]:
        library.removeHandler(handler)
    handler = RosLogHandler(ros_logger)
    handler.setFormatter(logging.Formatter("%(message)s"))
    library.addHandler(handler)
    library.setLevel(level)
    library.propagate = False  # not a second time through the root logger's handlers
    return handler
