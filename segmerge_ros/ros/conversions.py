"""The one place where ROS image messages and numpy arrays meet.

Incoming ``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage`` become RGB uint8 arrays (HxWx3); outgoing class
maps, confidences and overlays become ``sensor_msgs/Image`` messages. Anything we cannot decode raises
:class:`BadFrame` with a reason a user can act on, so the node can count it and carry on.

Speed notes (measured on this project's 2-core machine, see docs/ros-conventions.md):
- On receipt ``msg.data`` is an ``array.array``; ``np.frombuffer`` reads it without a copy, so rgb8 frames without
  row padding reach the engine as a zero-copy view.
- On publish, ``msg.data`` must be given ``bytes`` (``ndarray.tobytes()``): one memcpy, about 0.3 ms at 640x480.
  A memoryview or a numpy array is iterated element by element by the generated setter (46 ms at 640x480).
"""

from __future__ import annotations

import cv2
import numpy as np
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

JPEG_START = b"\xff\xd8"
JPEG_END = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BadFrame(ValueError):
    """An image message that cannot be turned into an RGB frame; the message says why."""


# encoding -> (channels, bytes per channel, how to reach RGB). "how" is a cv2 colour-conversion code, "rgb" (already
# RGB order), or "gray" (replicate one channel). The yuv422 family packs two pixels into four bytes, i.e. two
# "channels" of one byte per pixel.
_RAW_ENCODINGS: dict[str, tuple[int, int, int | str]] = {
    "rgb8": (3, 1, "rgb"),
    "bgr8": (3, 1, cv2.COLOR_BGR2RGB),
    "rgba8": (4, 1, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, 1, cv2.COLOR_BGRA2RGB),
    "mono8": (1, 1, "gray"),
    "8uc1": (1, 1, "gray"),
    "8uc3": (3, 1, cv2.COLOR_BGR2RGB),  # OpenCV's convention for an untyped 3-channel image is BGR
    # ROS "yuv422" is UYVY byte order (sensor_msgs/image_encodings.hpp); newer ROS spells it "uyvy".
    "yuv422": (2, 1, cv2.COLOR_YUV2RGB_UYVY),
    "uyvy": (2, 1, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": (2, 1, cv2.COLOR_YUV2RGB_YUY2),
    "yuyv": (2, 1, cv2.COLOR_YUV2RGB_YUY2),
    # 16-bit images (e.g. machine-vision cameras): scaled to 8 bits; here is_bigendian matters.
    "rgb16": (3, 2, "rgb"),
    "bgr16": (3, 2, cv2.COLOR_BGR2RGB),
    "rgba16": (4, 2, cv2.COLOR_RGBA2RGB),
    "bgra16": (4, 2, cv2.COLOR_BGRA2RGB),
    "mono16": (1, 2, "gray"),
}
SUPPORTED_ENCODINGS = tuple(_RAW_ENCODINGS)
_YUV422 = {"yuv422", "uyvy", "yuv422_yuy2", "yuyv"}


def _checked_layout(msg: Image):
    """The encoding's layout of a ``sensor_msgs/Image`` and its checked size; raises BadFrame on an unsupported
    encoding, a zero size, a step too small for the width, or a data length that does not equal ``step * height``.
    Reads no pixel: cheap enough for the subscription callback."""
    encoding = msg.encoding.strip().lower()
    layout = _RAW_ENCODINGS.get(encoding)
    if layout is None:
        raise BadFrame(f"unsupported encoding {msg.encoding!r} (supported: {', '.join(SUPPORTED_ENCODINGS)}, "
                       "or a CompressedImage on a '<topic>/compressed' topic)")
    channels, depth, _ = layout
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height == 0 or width == 0:
        raise BadFrame(f"empty image: {width}x{height} ({encoding})")
    if encoding in _YUV422 and width % 2:
        raise BadFrame(f"{encoding} packs pixel pairs, so its width must be even; got {width}")
    row_bytes = width * channels * depth
    if step < row_bytes:
        raise BadFrame(f"step {step} is smaller than width*bytes_per_pixel = {width}*{channels * depth} = {row_bytes}")
    if len(msg.data) != step * height:
        raise BadFrame(f"data length {len(msg.data)} does not match step*height = {step}*{height} = {step * height}")
    return layout, height, width, step, row_bytes


def check_message(msg: Image | CompressedImage) -> None:
    """Raise BadFrame for a message that cannot decode, from its fields and first and last bytes only (the node
    checks every frame on receipt, so one that a newer frame replaces before decoding is still counted)."""
    if isinstance(msg, CompressedImage):
        _compressed_kind(msg)
    else:
        _checked_layout(msg)


def image_to_rgb(msg: Image) -> np.ndarray:
    """Decode a ``sensor_msgs/Image`` into an HxWx3 RGB uint8 array (a view of ``msg.data`` for unpadded rgb8).

    Honours ``step`` (row padding) and, for 16-bit encodings, ``is_bigendian``. Raises BadFrame on an unsupported
    encoding, a zero size, a step too small for the width, or a data length that does not equal ``step * height``.
    """
    (channels, depth, to_rgb), height, width, step, row_bytes = _checked_layout(msg)
    data = np.frombuffer(msg.data, dtype=np.uint8)

    rows = data.reshape(height, step)[:, :row_bytes]  # drops row padding without copying
    if depth == 2:
        dtype = np.dtype(">u2" if msg.is_bigendian else "<u2")
        pixels16 = np.ascontiguousarray(rows).view(dtype).reshape(height, width, channels)
        pixels = (pixels16 >> 8).astype(np.uint8)
    else:
        pixels = rows.reshape(height, width, channels)

    if to_rgb == "rgb":
        return pixels
    if to_rgb == "gray":
        return cv2.cvtColor(np.ascontiguousarray(pixels[:, :, 0]), cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(np.ascontiguousarray(pixels), to_rgb)


def _compressed_kind(msg: CompressedImage) -> str:
    """"JPEG" or "PNG" from the payload's magic bytes; BadFrame for an empty, truncated or unknown payload."""
    data = msg.data
    if len(data) == 0:
        raise BadFrame(f"empty CompressedImage (format {msg.format!r})")
    head = bytes(data[:8])
    if head.startswith(JPEG_START):
        # libjpeg may return a half-grey frame for a cut-off stream instead of failing, so check the end marker.
        if JPEG_END not in bytes(data[-32:]):
            raise BadFrame(f"truncated JPEG: no end-of-image marker ({len(data)} bytes)")
        return "JPEG"
    if head.startswith(PNG_SIGNATURE):
        return "PNG"
    raise BadFrame(f"CompressedImage is neither JPEG nor PNG (format {msg.format!r}, first bytes {head.hex()})")


def compressed_to_rgb(msg: CompressedImage) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG or PNG) into an HxWx3 RGB uint8 array.

    image_transport's ``format`` field ("jpeg", "rgb8; jpeg compressed bgr8", "png", ...) only says what the camera
    had before compressing; the compressed bytes decode to BGR either way, so the payload's magic bytes decide.
    """
    kind = _compressed_kind(msg)
    data = np.frombuffer(msg.data, dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        raise BadFrame(f"corrupt {kind}: the decoder rejected {data.size} bytes (format {msg.format!r})")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def message_to_rgb(msg: Image | CompressedImage) -> np.ndarray:
    """Decode either kind of image message; see :func:`image_to_rgb` and :func:`compressed_to_rgb`."""
    if isinstance(msg, CompressedImage):
        return compressed_to_rgb(msg)
    return image_to_rgb(msg)


def _image_message(array: np.ndarray, encoding: str, channels: int, header: Header | None,
                   dtype: type = np.uint8) -> Image:
    if array.dtype != dtype:
        raise TypeError(f"{encoding} images must be {np.dtype(dtype).name}, got {array.dtype}")
    expected_ndim = 2 if channels == 1 else 3
    if array.ndim != expected_ndim or (channels > 1 and array.shape[2] != channels):
        raise ValueError(f"{encoding} image needs shape (H, W{'' if channels == 1 else f', {channels}'}), "
                         f"got {array.shape}")
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(array.shape[0]), int(array.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = msg.width * channels * array.itemsize
    # Little-endian bytes (is_bigendian 0), never a memoryview: see the module docstring.
    msg.data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return msg


def mono8_image(array: np.ndarray, header: Header | None = None) -> Image:
    """An HxW uint8 array (class ids, confidence) as a mono8 ``sensor_msgs/Image`` with the given header."""
    return _image_message(array, "mono8", 1, header)


def mono16_image(array: np.ndarray, header: Header | None = None) -> Image:
    """An HxW uint16 array (instance ids) as a mono16 ``sensor_msgs/Image`` with the given header."""
    return _image_message(array, "mono16", 1, header, np.uint16)


def rgb8_image(array: np.ndarray, header: Header | None = None) -> Image:
    """An HxWx3 RGB uint8 array as an rgb8 ``sensor_msgs/Image`` with the given header."""
    return _image_message(array, "rgb8", 3, header)


def bgr8_image(array_rgb: np.ndarray, header: Header | None = None) -> Image:
    """An HxWx3 RGB uint8 array as a bgr8 ``sensor_msgs/Image`` (what many USB camera drivers publish)."""
    return _image_message(cv2.cvtColor(array_rgb, cv2.COLOR_RGB2BGR), "bgr8", 3, header)


def jpeg_image(array_rgb: np.ndarray, header: Header | None = None, quality: int = 90) -> CompressedImage:
    """An HxWx3 RGB uint8 array as a JPEG ``sensor_msgs/CompressedImage``, in image_transport's format string."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(array_rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    msg = CompressedImage()
    if header is not None:
        msg.header = header
    msg.format = "rgb8; jpeg compressed bgr8"
    msg.data = encoded.tobytes()
    return msg
