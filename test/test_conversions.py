"""Image message <-> RGB array conversion: every encoding, row padding, endianness, and every kind of bad input."""

from __future__ import annotations

import array
import time

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from segmerge_ros.ros.conversions import (
    BadFrame,
    bgr8_image,
    compressed_to_rgb,
    image_to_rgb,
    jpeg_image,
    message_to_rgb,
    mono8_image,
    rgb8_image,
)
from segmerge_ros.inference.sources import read_rgb

HEIGHT, WIDTH = 48, 64


@pytest.fixture(scope="module")
def rgb(shared_data) -> np.ndarray:
    """A real photo of people, cropped to an even-width test size."""
    photo = read_rgb(shared_data / "opencv_samples" / "messi5.jpg")
    return np.ascontiguousarray(cv2.resize(photo, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA))


def raw_message(pixels: np.ndarray, encoding: str, padding: int = 0, bigendian: bool = False) -> Image:
    """A received-style Image: data as array.array, rows padded with ``padding`` junk bytes."""
    height = pixels.shape[0]
    rows = pixels.reshape(height, -1)
    if padding:
        rows = np.hstack([rows, np.full((height, padding), 0xAB, np.uint8)])
    msg = Image(height=height, width=pixels.shape[1], encoding=encoding, is_bigendian=int(bigendian),
                step=rows.shape[1])
    msg.data = array.array("B", rows.tobytes())
    return msg


def to_bytes16(pixels16: np.ndarray, bigendian: bool) -> np.ndarray:
    return pixels16.astype(">u2" if bigendian else "<u2").view(np.uint8).reshape(pixels16.shape[0], -1)


@pytest.mark.parametrize("padding", [0, 7])
class TestRawEncodings:
    def test_rgb8(self, rgb, padding):
        np.testing.assert_array_equal(image_to_rgb(raw_message(rgb, "rgb8", padding)), rgb)

    def test_bgr8(self, rgb, padding):
        np.testing.assert_array_equal(image_to_rgb(raw_message(rgb[:, :, ::-1].copy(), "bgr8", padding)), rgb)

    def test_rgba8_and_bgra8(self, rgb, padding):
        alpha = np.full((HEIGHT, WIDTH, 1), 200, np.uint8)
        np.testing.assert_array_equal(image_to_rgb(raw_message(np.dstack([rgb, alpha]), "rgba8", padding)), rgb)
        bgra = np.dstack([rgb[:, :, ::-1], alpha])
        np.testing.assert_array_equal(image_to_rgb(raw_message(bgra, "bgra8", padding)), rgb)

    def test_mono8(self, rgb, padding):
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        out = image_to_rgb(raw_message(gray, "mono8", padding))
        assert out.shape == (HEIGHT, WIDTH, 3)
        for channel in range(3):
            np.testing.assert_array_equal(out[:, :, channel], gray)

    @pytest.mark.parametrize("encoding,to_yuv,from_yuv", [
        ("yuv422", cv2.COLOR_RGB2YUV_UYVY, cv2.COLOR_YUV2RGB_UYVY),
        ("uyvy", cv2.COLOR_RGB2YUV_UYVY, cv2.COLOR_YUV2RGB_UYVY),
        ("yuv422_yuy2", cv2.COLOR_RGB2YUV_YUY2, cv2.COLOR_YUV2RGB_YUY2),
        ("yuyv", cv2.COLOR_RGB2YUV_YUY2, cv2.COLOR_YUV2RGB_YUY2),
    ])
    def test_yuv422_variants_match_cv2(self, rgb, padding, encoding, to_yuv, from_yuv):
        packed = cv2.cvtColor(rgb, to_yuv)  # (H, W, 2)
        reference = cv2.cvtColor(packed, from_yuv)
        out = image_to_rgb(raw_message(packed, encoding, padding))
        np.testing.assert_array_equal(out, reference)
        assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 12  # and it is the picture, not garbage

    @pytest.mark.parametrize("bigendian", [False, True])
    def test_16_bit_honours_endianness(self, rgb, padding, bigendian):
        rgb16 = rgb.astype(np.uint16) * 257
        msg = raw_message(to_bytes16(rgb16.reshape(HEIGHT, -1), bigendian).reshape(HEIGHT, WIDTH, 6), "rgb16",
                          padding, bigendian)
        np.testing.assert_array_equal(image_to_rgb(msg), rgb)
        gray16 = rgb16[:, :, 0]
        msg = raw_message(to_bytes16(gray16, bigendian).reshape(HEIGHT, WIDTH, 2), "mono16", padding, bigendian)
        np.testing.assert_array_equal(image_to_rgb(msg)[:, :, 1], rgb[:, :, 0])


def test_unpadded_rgb8_is_a_view_of_the_message(rgb):
    msg = raw_message(rgb, "rgb8")
    out = image_to_rgb(msg)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))


def test_encoding_names_are_case_insensitive(rgb):
    np.testing.assert_array_equal(image_to_rgb(raw_message(rgb, "RGB8")), rgb)


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_compressed_matches_cv2_decode(rgb, kind):
    ok, encoded = cv2.imencode(".jpg" if kind == "jpeg" else ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    msg = CompressedImage(format=kind)
    msg.data = array.array("B", encoded.tobytes())
    reference = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(compressed_to_rgb(msg), reference)
    if kind == "png":
        np.testing.assert_array_equal(compressed_to_rgb(msg), rgb)  # lossless


def test_message_to_rgb_dispatches_on_type(rgb):
    np.testing.assert_array_equal(message_to_rgb(raw_message(rgb, "rgb8")), rgb)
    jpeg = jpeg_image(rgb, quality=100)
    assert np.abs(message_to_rgb(jpeg).astype(int) - rgb.astype(int)).mean() < 8  # chroma subsampling


def bad_raw_messages(rgb):
    good = raw_message(rgb, "rgb8")
    short = raw_message(rgb, "rgb8")
    short.data = short.data[:-10]
    long = raw_message(rgb, "rgb8")
    long.data = long.data + array.array("B", b"\x00" * 5)
    small_step = raw_message(rgb, "rgb8")
    small_step.step = WIDTH * 3 - 1
    zero = Image(height=0, width=0, encoding="rgb8", step=0)
    zero_width = Image(height=HEIGHT, width=0, encoding="rgb8", step=0)
    odd_yuv = raw_message(np.zeros((4, 5, 2), np.uint8), "yuv422")
    bayer = raw_message(rgb[:, :, 0].copy(), "bayer_rggb8")
    empty_name = raw_message(rgb, "")
    return {
        "unknown encoding": (bayer, "unsupported encoding"),
        "empty encoding": (empty_name, "unsupported encoding"),
        "zero size": (zero, "empty image"),
        "zero width": (zero_width, "empty image"),
        "truncated data": (short, "does not match"),
        "extra data": (long, "does not match"),
        "step too small": (small_step, "smaller than"),
        "odd yuv width": (odd_yuv, "even"),
        "good": (good, None),
    }


@pytest.mark.parametrize("case", ["unknown encoding", "empty encoding", "zero size", "zero width", "truncated data",
                                  "extra data", "step too small", "odd yuv width"])
def test_bad_raw_images_raise_badframe_with_reason(rgb, case):
    msg, reason = bad_raw_messages(rgb)[case]
    with pytest.raises(BadFrame, match=reason):
        image_to_rgb(msg)


def compressed(data: bytes, fmt: str = "jpeg") -> CompressedImage:
    msg = CompressedImage(format=fmt)
    msg.data = array.array("B", data)
    return msg


@pytest.mark.parametrize("case,reason", [
    ("empty", "empty CompressedImage"),
    ("truncated jpeg", "truncated JPEG"),
    ("corrupt jpeg", "corrupt JPEG"),
    ("truncated png", "corrupt PNG"),
    ("not an image", "neither JPEG nor PNG"),
])
def test_bad_compressed_images_raise_badframe_with_reason(rgb, case, reason):
    jpeg = jpeg_image(rgb).data.tobytes()
    ok, png = cv2.imencode(".png", rgb)
    payloads = {
        "empty": b"",
        "truncated jpeg": jpeg[: len(jpeg) // 2],
        # A JPEG header and end marker around noise: the markers look right, the decoder must still refuse it.
        "corrupt jpeg": jpeg[:2] + bytes(range(256)) * 4 + jpeg[-2:],
        "truncated png": png.tobytes()[: png.size // 2],
        "not an image": b"GIF89a" + bytes(100),
    }
    with pytest.raises(BadFrame, match=reason):
        compressed_to_rgb(compressed(payloads[case]))


def test_badframe_is_a_valueerror():
    assert issubclass(BadFrame, ValueError)


class TestBuilders:
    def test_mono8_and_rgb8_round_trip_with_header(self, rgb):
        header = Header(frame_id="cam")
        header.stamp.sec, header.stamp.nanosec = 12, 345
        class_map = (np.arange(HEIGHT * WIDTH) % 19).astype(np.uint8).reshape(HEIGHT, WIDTH)
        mask = mono8_image(class_map, header)
        assert (mask.encoding, mask.width, mask.height, mask.step) == ("mono8", WIDTH, HEIGHT, WIDTH)
        assert mask.header.frame_id == "cam" and mask.header.stamp.nanosec == 345
        np.testing.assert_array_equal(np.frombuffer(mask.data, np.uint8).reshape(HEIGHT, WIDTH), class_map)
        colour = rgb8_image(rgb, header)
        assert (colour.encoding, colour.step) == ("rgb8", WIDTH * 3)
        np.testing.assert_array_equal(image_to_rgb(colour), rgb)
        np.testing.assert_array_equal(image_to_rgb(bgr8_image(rgb)), rgb)

    def test_builders_accept_non_contiguous_views(self, rgb):
        view = rgb[::2, ::2]
        np.testing.assert_array_equal(image_to_rgb(rgb8_image(view)), view)

    def test_builders_reject_wrong_arrays(self, rgb):
        with pytest.raises(ValueError):
            mono8_image(rgb)
        with pytest.raises(ValueError):
            rgb8_image(rgb[:, :, 0])
        with pytest.raises(TypeError):
            mono8_image(rgb[:, :, 0].astype(np.float32))

    def test_building_a_vga_overlay_is_fast(self):
        """bytes, not a memoryview: the generated setter iterates anything else element by element (~46 ms)."""
        frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
        rgb8_image(frame)
        start = time.perf_counter()
        for _ in range(5):
            rgb8_image(frame)
        assert (time.perf_counter() - start) / 5 < 0.015


def test_check_message_refuses_without_decoding_what_decoding_would_refuse():
    from segmerge_ros.ros.conversions import check_message

    good = rgb8_image(np.zeros((4, 6, 3), np.uint8))
    check_message(good)
    short = rgb8_image(np.zeros((4, 6, 3), np.uint8))
    short.data = bytes(short.data)[:-1]
    with pytest.raises(BadFrame, match="data length"):
        check_message(short)
    wrong = rgb8_image(np.zeros((4, 6, 3), np.uint8))
    wrong.encoding = "32FC1"
    with pytest.raises(BadFrame, match="unsupported encoding"):
        check_message(wrong)
    jpeg = jpeg_image(np.zeros((8, 8, 3), np.uint8))
    check_message(jpeg)
    jpeg.data = bytes(jpeg.data)[: len(jpeg.data) // 2]
    with pytest.raises(BadFrame, match="truncated JPEG"):
        check_message(jpeg)
