"""Where real frames come from: a video file, a folder of images, or a single image.

Also finds the project's shared real data (../shared/data beside a source checkout, or $SEGMERGE_SHARED_DATA) and
OpenCV's sample video of people, which Debian's ``opencv-doc`` installs, for demos on a fresh machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
DEBIAN_VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")


def shared_data_dir() -> Path | None:
    """$SEGMERGE_SHARED_DATA, else ../shared/data beside the source checkout; None when neither exists."""
    env = os.environ.get("SEGMERGE_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    return next((p for p in candidates if p.is_dir()), None)


def default_video() -> Path | None:
    """A real video of people: the shared copy of vtest.avi, else Debian's opencv-doc copy."""
    shared = shared_data_dir()
    for path in ([shared / "opencv_samples" / "vtest.avi"] if shared else []) + [DEBIAN_VTEST]:
        if path.is_file():
            return path
    return None


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as an RGB uint8 array, with a clear error for a missing or unreadable file."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def iter_frames(source: str | Path, max_frames: int | None = None, step: int = 1, loop: bool = False) -> Iterator[np.ndarray]:
    """Yield RGB uint8 frames from a video file, an image folder (sorted by name) or one image."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"frame source {path} does not exist")
    count = 0
    while True:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
            frames = (read_rgb(p) for p in files[::step])
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            frames = iter([read_rgb(path)])
        else:
            frames = _video_frames(path, step)
        for frame in frames:
            yield frame
            count += 1
            if max_frames is not None and count >= max_frames:
                return
        if not loop:
            return


def _video_frames(path: Path, step: int) -> Iterator[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise FileNotFoundError(f"cannot open video {path}")
    try:
        index = 0
        while True:
            ok, bgr = capture.read()
            if not ok:
                return
            if index % step == 0:
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()
