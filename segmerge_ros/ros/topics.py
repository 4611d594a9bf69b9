"""Where a camera's outputs go: for a camera topic ``<ns>/<name>`` (``<ns>/<name>/compressed`` for JPEG/PNG), the
node publishes ``<ns>/segmentation/*`` and ``<ns>/pose/*`` and reads ``<ns>/camera_info``. Pure string functions."""

from __future__ import annotations

import posixpath

COMPRESSED_SUFFIX = "/compressed"


def strip_compressed(topic: str) -> str:
    return topic[: -len(COMPRESSED_SUFFIX)] if topic.endswith(COMPRESSED_SUFFIX) else topic


def output_topic(input_topic: str, name: str) -> str:
    """``<ns>/<name>`` for the camera topic ``<ns>/<image>`` (``<ns>/<image>/compressed``); relative stays relative."""
    namespace = posixpath.dirname(strip_compressed(input_topic))
    if namespace == "":
        return name
    return posixpath.join(namespace, name)
