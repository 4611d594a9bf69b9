"""REP-155 bodies (``hri.enable``): the people the node tracks, the ROS4HRI way.

``/humans/bodies/tracked`` (``hri_msgs/IdsList``) lists the ids of every body the node's cameras track now (a track
missed for up to ``tracking.max_age`` frames is still tracked); per body ``/humans/bodies/<id>/roi``
(``NormalizedRegionOfInterest2D``) on the frames it is seen and, when pose ran on it, ``/humans/bodies/<id>/
skeleton2d`` (``Skeleton2D``). A body's publishers are made when it appears and destroyed when its track is dropped
(or its camera has sent nothing for ``STALE_CAMERA_S``, or the node deactivates: an empty list is published then).
Ids are the trackers' (unique per node across cameras), so one list serves every camera.
"""

from __future__ import annotations

import time

import numpy as np
from hri_msgs.msg import IdsList, NormalizedRegionOfInterest2D, Skeleton2D
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from segmerge_ros.ros.frame_pipeline import FrameOutputs
from segmerge_ros.ros.hri_messages import ids_list_message, roi_message, skeleton_message

BODIES = "/humans/bodies"
STALE_CAMERA_S = 5.0  # a camera that sent no frame for this long tracks nobody
BODY_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


class BodyPublishers:
    """The REP-155 publishers of one node; ``publish`` is called after each frame, from one thread at a time."""

    def __init__(self, node: Node, person_ids):
        self._node = node
        self._person_ids = np.asarray(list(person_ids), dtype=np.int64)
        self._tracked_pub = node.create_publisher(IdsList, f"{BODIES}/tracked", BODY_QOS)
        self._bodies: dict[str, tuple] = {}  # id -> (roi publisher, skeleton publisher)
        self._by_camera: dict[str, tuple[float, list[str]]] = {}  # camera topic -> (last frame, body ids it tracks)

    @property
    def tracked(self) -> list[str]:
        """Every body tracked now, by any camera."""
        return [body for _, ids in self._by_camera.values() for body in ids]

    def publish(self, camera_topic: str, outputs: FrameOutputs, live_ids: list[str]) -> None:
        """One camera's frame: ``live_ids`` are its tracker's person tracks; those seen in this frame get their
        region (and skeleton); the tracked list of all cameras is republished."""
        objects, track_ids = outputs.objects, outputs.track_ids
        header = outputs.header
        height, width = outputs.segmentation.class_map.shape[:2]
        people = [] if objects is None or track_ids is None else \
            np.flatnonzero(np.isin(objects.class_ids, self._person_ids)).tolist()
        now = time.monotonic()
        self._by_camera[camera_topic] = (now, list(live_ids))
        for topic in [t for t, (seen, _) in self._by_camera.items() if now - seen > STALE_CAMERA_S]:
            del self._by_camera[topic]
        self._retire_gone()
        skeletons = {}
        if outputs.pose is not None and outputs.posed is not None:
            skeletons = {int(index): person for person, index in enumerate(outputs.posed)}
        for index in people:
            roi_pub, skeleton_pub = self._publishers(track_ids[index])
            roi_pub.publish(roi_message(header, objects.boxes[index], width, height))
            person = skeletons.get(index)
            if person is not None:
                skeleton_pub.publish(skeleton_message(header, outputs.pose.keypoints[person],
                                                      outputs.pose.scores[person], width, height))
        self._tracked_pub.publish(ids_list_message(header, self.tracked))

    def _publishers(self, body: str) -> tuple:
        if body not in self._bodies:
            self._bodies[body] = (
                self._node.create_publisher(NormalizedRegionOfInterest2D, f"{BODIES}/{body}/roi", BODY_QOS),
                self._node.create_publisher(Skeleton2D, f"{BODIES}/{body}/skeleton2d", BODY_QOS))
        return self._bodies[body]

    def _retire_gone(self) -> None:
        """Destroy the publishers of bodies no camera tracks any more."""
        live = set(self.tracked)
        for body in [b for b in self._bodies if b not in live]:
            for publisher in self._bodies.pop(body):
                self._node.destroy_publisher(publisher)

    def clear(self) -> None:
        """Nobody tracked (deactivate): the bodies' publishers go, and an empty list says so."""
        self._by_camera.clear()
        self._retire_gone()
        self._tracked_pub.publish(IdsList())

    def destroy(self) -> None:
        """Every publisher gone (cleanup)."""
        self._by_camera.clear()
        self._retire_gone()
        self._node.destroy_publisher(self._tracked_pub)
