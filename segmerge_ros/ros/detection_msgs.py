"""vision_msgs messages for tracked objects (message construction only; the node publishes them).

* ``LabelInfo``: every class of the label set as a ``VisionClass`` (id = index into the classes, name), and the
  score threshold objects had to reach.
* ``Detection2DArray``: one ``Detection2D`` per object, header copied from the input image; its ``id`` is the
  object's track id, ``bbox`` the box centre and size in input pixels, and one hypothesis with the class *name*
  (vision_msgs 4 makes ``class_id`` a string) and the object's score.
"""

from __future__ import annotations

from typing import Sequence

from std_msgs.msg import Header
from vision_msgs.msg import Detection2D, Detection2DArray, LabelInfo, ObjectHypothesisWithPose, VisionClass

from segmerge_ros.inference.detections import Objects
from segmerge_ros.ros.pose_msgs import copy_header


def label_info_message(classes: Sequence[str], header: Header, threshold: float) -> LabelInfo:
    """LabelInfo listing every class (``class_id`` = its index) with the given score threshold."""
    return LabelInfo(header=copy_header(header),
                     class_map=[VisionClass(class_id=i, class_name=str(name)) for i, name in enumerate(classes)],
                     threshold=float(threshold))


def detections_message(header: Header, objects: Objects, track_ids: Sequence[str],
                       class_names: Sequence[str]) -> Detection2DArray:
    """Detection2DArray of one frame's objects, each named by its track id (``track_ids[i]`` for object i)."""
    if len(track_ids) != len(objects):
        raise ValueError(f"{len(objects)} objects but {len(track_ids)} track ids")
    head = copy_header(header)
    out = Detection2DArray(header=head)
    boxes = objects.boxes.astype(float).reshape(-1, 4)
    centres = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    sizes = boxes[:, 2:] - boxes[:, :2]
    for index, track_id in enumerate(track_ids):
        detection = Detection2D(header=head, id=str(track_id))
        detection.bbox.center.position.x, detection.bbox.center.position.y = centres[index].tolist()
        detection.bbox.size_x, detection.bbox.size_y = sizes[index].tolist()
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = str(class_names[int(objects.class_ids[index])])
        hypothesis.hypothesis.score = float(objects.scores[index])
        detection.results = [hypothesis]
        out.detections.append(detection)
    return out
