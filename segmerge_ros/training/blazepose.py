"""MediaPipe BlazePose landmark models (TFLite: lite, full, heavy) as a pose teacher beside MoveNet.

Training and evaluation only, like ``movenet.py``: it needs ``ai-edge-litert``, imported when a teacher is built.

A landmark model takes one float32 RGB 256x256 crop with values in [0, 1] and returns 39 rows of (x, y, z,
visibility, presence) in crop pixels, visibility and presence as logits; rows 0-32 are the 33 BlazePose landmarks.
``BlazePoseTeacher`` keeps the 17 that COCO also has (``BLAZEPOSE_TO_COCO``, "left" is the person's left in both),
with score = sigmoid(visibility), and has ``MoveNetTeacher``'s interface (``SquareCropTeacher``): ``on_image``,
``on_boxes`` and ``on_regions`` with the same square crops and the same mapping back to frame pixels. It runs the
landmark model on the given region only: no person detector, no rotated ROI, no heatmap refinement, no smoothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segmerge_ros.training.movenet import SquareCropTeacher, tflite_interpreter

BLAZEPOSE_INPUT = 256
BLAZEPOSE_LANDMARKS = 33
# COCO-17 order (nose, eyes, ears, then left/right shoulder ... ankle) as BlazePose-33 indices.
BLAZEPOSE_TO_COCO = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)
LANDMARK_VALUES = 5  # x, y, z, visibility logit, presence logit


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, elementwise (overflow-free for large negative logits)."""
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def landmarks_to_coco(landmarks: np.ndarray, size: int = BLAZEPOSE_INPUT) -> np.ndarray:
    """(33+, 5) landmarks (crop pixels, visibility as a probability) -> (17, 3) normalised COCO (y, x, score)."""
    rows = np.asarray(landmarks, dtype=np.float64)[list(BLAZEPOSE_TO_COCO)]
    return np.stack([rows[:, 1] / size, rows[:, 0] / size, rows[:, 3]], axis=1).astype(np.float32)


class BlazePoseTeacher(SquareCropTeacher):
    """``ai_edge_litert`` interpreter of a BlazePose landmark ``.tflite`` (``pose_landmark_{lite,full,heavy}``)."""

    input_size = BLAZEPOSE_INPUT

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        self.path = path = Path(path)
        self._interpreter = tflite_interpreter(path, threads, "BlazePose")
        detail = self._interpreter.get_input_details()[0]
        expected = (1, BLAZEPOSE_INPUT, BLAZEPOSE_INPUT, 3)
        if tuple(detail["shape"]) != expected or detail["dtype"] != np.float32:
            raise ValueError(f"{path}: expected a float32 {list(expected)} input, got {detail['dtype']} "
                             f"{detail['shape']}")
        self._input = detail["index"]
        self._output = landmark_output_index(self._interpreter.get_output_details(), path)

    def landmarks(self, rgb256: np.ndarray) -> np.ndarray:
        """(33, 5) landmarks of one 256x256x3 uint8 RGB crop: x, y, z in crop pixels, visibility and presence
        as probabilities (the sigmoid of the model's logits)."""
        if rgb256.shape != (BLAZEPOSE_INPUT, BLAZEPOSE_INPUT, 3) or rgb256.dtype != np.uint8:
            raise ValueError(f"BlazePose needs a 256x256x3 uint8 image, got {rgb256.dtype} {rgb256.shape}")
        image = (rgb256.astype(np.float32) / np.float32(255.0))[None]
        self._interpreter.set_tensor(self._input, image)
        self._interpreter.invoke()
        raw = self._interpreter.get_tensor(self._output).reshape(-1, LANDMARK_VALUES)[:BLAZEPOSE_LANDMARKS]
        out = raw.astype(np.float64)
        out[:, 3:] = sigmoid(out[:, 3:])
        return out

    def run(self, rgb256: np.ndarray) -> np.ndarray:
        """(17, 3) normalised COCO (y, x, score) for one 256x256x3 uint8 RGB crop; score = sigmoid(visibility)."""
        return landmarks_to_coco(self.landmarks(rgb256))


def landmark_output_index(outputs: list[dict], path: Path) -> int:
    """The tensor index of the (1, 195) landmark output among a landmark model's output details."""
    size = 39 * LANDMARK_VALUES
    found = [o["index"] for o in outputs if tuple(o["shape"]) == (1, size)]
    if len(found) != 1:
        shapes = [list(o["shape"]) for o in outputs]
        raise ValueError(f"{path}: expected one [1,{size}] landmark output (BlazePose), got {shapes}")
    return found[0]
