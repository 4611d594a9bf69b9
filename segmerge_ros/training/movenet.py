"""MoveNet SinglePose (TFLite) as a pose teacher: the distillation target of ``segmerge-train pose``.

Training and evaluation only: it needs ``ai-edge-litert`` (a test/training dependency, imported when a teacher is
built), and nothing the node runs imports this module.

The model takes one uint8 RGB 192x192 image and returns COCO-17 keypoints as normalised (y, x, score). For a person
box, the teacher sees a square crop of the frame around the box (real pixels; black only outside the frame), made
with the node's crop geometry (``crop_matrices`` with a square crop), and its keypoints are mapped back to frame
pixels with ``crop_to_image`` (normalised x times 192 is a crop pixel).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from segmerge_ros.inference.pose import crop_people, crop_to_image

MOVENET_INPUT = 192
# Side of the teacher's square crop, as a multiple of the longer side of the person box. Tighter than the node's
# crop (1.25 padding at 3:4, then padded to a square), so a small person covers more of the teacher's 192 pixels.
TEACHER_PADDING = 1.15


class SquareCropTeacher:
    """What every pose teacher shares: ``run`` one ``input_size`` square RGB crop to COCO-17 (y, x, score)
    normalised to the crop; whole images and square frame regions go through it (``BlazePoseTeacher`` too)."""

    input_size = MOVENET_INPUT

    def run(self, rgb: np.ndarray) -> np.ndarray:
        """(17, 3) normalised (y, x, score) for one ``input_size`` square uint8 RGB image (a subclass's model)."""
        raise NotImplementedError

    def on_image(self, rgb: np.ndarray) -> np.ndarray:
        """(17, 3) normalised (y, x, score) of the whole image resized (bilinear, aspect not kept) to the input."""
        side = self.input_size
        return self.run(cv2.resize(rgb, (side, side), interpolation=cv2.INTER_LINEAR))

    def on_boxes(self, rgb: np.ndarray, boxes: np.ndarray,
                 padding: float = TEACHER_PADDING) -> tuple[np.ndarray, np.ndarray]:
        """Keypoints (N, 17, 2) in frame pixels (x, y) and scores (N, 17) for xyxy person boxes (N, 4).

        Each box becomes a square of side ``padding`` times its longer side around its centre.
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        center, side = square_regions(boxes, padding)
        return self.on_regions(rgb, center, np.repeat(side[:, None], 2, axis=1))

    def on_regions(self, rgb: np.ndarray, center: np.ndarray,
                   scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As ``on_boxes`` for explicit square regions: centres (N, 2) and sides (N, 2) with equal entries."""
        center = np.asarray(center, dtype=np.float64).reshape(-1, 2)
        scale = np.asarray(scale, dtype=np.float64).reshape(-1, 2)
        if len(center) == 0:
            return np.zeros((0, 17, 2), np.float32), np.zeros((0, 17), np.float32)
        size = (self.input_size, self.input_size)
        crops = crop_people(np.ascontiguousarray(rgb), center, scale, size)
        raw = np.stack([self.run(crop) for crop in crops])  # (N, 17, 3) y, x, score
        crop_xy = raw[..., [1, 0]] * self.input_size
        return crop_to_image(crop_xy, center, scale, size).astype(np.float32), raw[..., 2].astype(np.float32)


class MoveNetTeacher(SquareCropTeacher):
    """``ai_edge_litert`` interpreter of a MoveNet SinglePose ``.tflite``."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        self.path = path = Path(path)
        self._interpreter = tflite_interpreter(path, threads, "MoveNet")
        detail = self._interpreter.get_input_details()[0]
        if tuple(detail["shape"]) != (1, MOVENET_INPUT, MOVENET_INPUT, 3) or detail["dtype"] != np.uint8:
            raise ValueError(f"{path}: expected a uint8 [1,192,192,3] input, got {detail['dtype']} {detail['shape']}")
        self._input = detail["index"]
        out = self._interpreter.get_output_details()[0]
        if tuple(out["shape"]) != (1, 1, 17, 3):
            raise ValueError(f"{path}: expected a [1,1,17,3] output (MoveNet SinglePose), got {out['shape']}")
        self._output = out["index"]

    def run(self, rgb192: np.ndarray) -> np.ndarray:
        """(17, 3) normalised (y, x, score) for one 192x192x3 uint8 RGB image."""
        if rgb192.shape != (MOVENET_INPUT, MOVENET_INPUT, 3) or rgb192.dtype != np.uint8:
            raise ValueError(f"MoveNet needs a 192x192x3 uint8 image, got {rgb192.dtype} {rgb192.shape}")
        self._interpreter.set_tensor(self._input, np.ascontiguousarray(rgb192)[None])
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)[0, 0].copy()


def tflite_interpreter(path: Path, threads: int, what: str):
    """An allocated ``ai_edge_litert`` interpreter of the ``what`` teacher's ``.tflite`` at ``path``, with clear
    errors for a missing file or a missing ai-edge-litert."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} teacher {path} does not exist")
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as error:
        raise ImportError(f"the {what} teacher needs ai-edge-litert (pip install -r requirements-test.txt)") from error
    interpreter = Interpreter(model_path=str(path), num_threads=int(threads))
    interpreter.allocate_tensors()
    return interpreter


def square_regions(boxes: np.ndarray, padding: float = TEACHER_PADDING) -> tuple[np.ndarray, np.ndarray]:
    """Centres (N, 2) and sides (N,) of squares ``padding`` times the longer side of xyxy boxes (N, 4)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    center = np.stack([(boxes[:, 0] + boxes[:, 2]) * 0.5, (boxes[:, 1] + boxes[:, 3]) * 0.5], axis=1)
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * float(padding)
    return center, np.maximum(side, 1.0)
