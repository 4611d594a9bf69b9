"""The outputs part of ``SegmergeNode`` (``ros/node.py``), built at configure: the cameras (publishers now,
subscriptions at activate), their latched labels (JSON, and vision_msgs/LabelInfo where it is installed) and the
REP-155 body publishers.

A mixin of the node: it uses the node's ``param``, ``get_clock``, ``engine``, ``cameras``, ``frame_ready`` and
``_count_bad``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rclpy.exceptions import NameValidationException
from std_msgs.msg import Header

from segmerge_ros.ros.camera import HAVE_VISION_MSGS, Camera
from segmerge_ros.ros.parameter_policy import topics_refusal
from segmerge_ros.ros.startup import StartupError, model_info

if TYPE_CHECKING:
    from segmerge_ros.ros.bodies import BodyPublishers


class NodeOutputs:
    """Cameras, labels and REP-155 publishers of a configured node."""

    @staticmethod
    def _checked_topics(topics: list[str]) -> list[str]:
        topics, reason = topics_refusal(topics)
        if reason:
            raise StartupError(reason)
        return topics

    def _create_cameras(self, topics: list[str]) -> list[Camera]:
        cameras: list[Camera] = []
        try:
            for topic in topics:
                cameras.append(Camera(self, topic, self.frame_ready, self._count_bad))
        except (NameValidationException, RuntimeError) as error:  # rcl's RCLError for a name it cannot expand
            for camera in cameras:
                camera.destroy()
            raise StartupError(f"image_topics: {error}") from None
        return cameras

    def _publish_labels(self) -> None:
        """The latched labels of every camera: JSON, and vision_msgs/LabelInfo where it is installed."""
        label_info = None
        if HAVE_VISION_MSGS:
            from segmerge_ros.ros.detection_msgs import label_info_message  # vision_msgs: only where installed

            label_info = label_info_message(self.engine.labels.classes, Header(stamp=self.get_clock().now().to_msg()),
                                            float(self.param("instances.score_threshold"))
                                            if self.engine.family.has_instances else 0.0)
        info = model_info(self.param, self.engine)
        for camera in self.cameras:
            camera.publish_labels(self.engine.labels, info, label_info)

    @staticmethod
    def _make_body_publishers(node, person_ids) -> BodyPublishers:
        """The REP-155 publishers (hri.enable); StartupError where hri_msgs is not installed."""
        try:
            from segmerge_ros.ros.bodies import BodyPublishers
        except ImportError as error:
            raise StartupError(f"hri.enable needs hri_msgs ({error}): install ros-jazzy-hri-msgs (rosdep key "
                               "hri_msgs), or set hri.enable false") from None
        return BodyPublishers(node, person_ids)
