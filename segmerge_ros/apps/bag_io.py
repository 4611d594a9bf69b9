"""Reading and writing rosbag2 files for segmerge-bag: ``InputBag`` (raw CDR in log-time order), ``OutputBag`` (the
input's connections copied, outputs added), the camera topics to process, and ``write_messages`` (a bag from rclpy
messages: the benchmark's and the tests' inputs).

``rosbags`` reads and writes the files (MCAP and SQLite, with the standard message definitions); rclpy serializes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from rclpy.serialization import serialize_message
from rosbags.highlevel import AnyReader
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin, Writer, WriterError
from rosbags.typesys import Stores, get_typestore
from sensor_msgs.msg import CompressedImage, Image

from segmerge_ros.ros.parameter_policy import topics_refusal

IMAGE_TYPES = {"sensor_msgs/msg/Image": Image, "sensor_msgs/msg/CompressedImage": CompressedImage}
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
# Output message definitions and type hashes: the ROS 2 Jazzy ones (equal to what rosidl installs, tested).
OUTPUT_TYPESTORE = get_typestore(Stores.ROS2_JAZZY)
_NO_TIME = QosTime(sec=0, nsec=0)
# Played back, the labels topic is latched as the node's is, so a late RViz still gets the palette.
LATCHED_QOS = Qos(history=QosHistory.KEEP_LAST, depth=1, reliability=QosReliability.RELIABLE,
                  durability=QosDurability.TRANSIENT_LOCAL, deadline=_NO_TIME, lifespan=_NO_TIME,
                  liveliness=QosLiveliness.AUTOMATIC, liveliness_lease_duration=_NO_TIME,
                  avoid_ros_namespace_conventions=False)


class BagError(Exception):
    """Input the tool cannot work with; the message says what and how to fix it (shown without a traceback)."""


def ros_type_name(message) -> str:
    """``sensor_msgs/msg/Image`` for a sensor_msgs.msg.Image instance or class."""
    cls = message if isinstance(message, type) else type(message)
    return f"{cls.__module__.split('.')[0]}/msg/{cls.__name__}"


# -- reading ------------------------------------------------------------------------------------------------------
class InputBag:
    """A rosbag2 (folder, bare .mcap or bare .db3), opened with rosbags; messages come as raw CDR in log-time order."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise BagError(f"input bag {self.path} does not exist")
        if self.path.is_dir() and not (self.path / "metadata.yaml").is_file():
            files = sorted(p.name for p in self.path.iterdir() if p.suffix in (".mcap", ".db3"))
            hint = (f"; it holds {', '.join(files)}: pass that file itself" if files
                    else "; give a rosbag2 folder, or a .mcap or .db3 file")
            raise BagError(f"{self.path} has no metadata.yaml{hint}")
        if self.path.is_file() and self.path.suffix not in (".mcap", ".db3"):
            raise BagError(f"{self.path}: not a rosbag2 (expected a folder with metadata.yaml, or a .mcap or .db3 "
                           "file)")
        # Bags without embedded definitions (older .db3) fall back to the standard ROS 2 ones.
        self.reader = AnyReader([self.path], default_typestore=OUTPUT_TYPESTORE)
        try:
            self.reader.open()
        except Exception as error:  # noqa: BLE001 - rosbags, apsw, lz4, zstd: whatever a damaged file raises
            raise BagError(damaged_message(self.path, error)) from None

    @property
    def connections(self):
        return self.reader.connections

    def topic_types(self) -> dict[str, str]:
        return {c.topic: c.msgtype for c in self.connections}

    def count(self, topics) -> int:
        return sum(c.msgcount for c in self.connections if c.topic in topics)

    def messages(self) -> Iterator[tuple[object, int, bytes]]:
        """Every message as (connection, log time ns, raw CDR); damage found on the way raises BagError."""
        iterator = self.reader.messages()
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except Exception as error:  # noqa: BLE001 - only reading happens here (our processing is outside)
                raise BagError(damaged_message(self.path, error)) from None
            yield item

    def close(self) -> None:
        self.reader.close()


def damaged_message(path: Path, error: Exception) -> str:
    return (f"cannot read {path}: the bag is truncated or corrupt ({type(error).__name__}: {error}). A recording "
            "cut off mid-write can often be repaired: `ros2 bag reindex` (.db3) or `mcap recover` (.mcap)")


def select_cameras(topic_types: dict[str, str], wanted: list[str] | None) -> list[str]:
    """The image topics to process: ``wanted`` (each checked to be an image topic of the bag), else every image
    topic, a raw topic taking precedence over its own ``/compressed`` (both are one camera, with one output)."""
    images = {topic: msgtype for topic, msgtype in topic_types.items() if msgtype in IMAGE_TYPES}
    if wanted:
        for topic in wanted:
            if topic not in topic_types:
                listing = ", ".join(sorted(images)) or "none"
                raise BagError(f"topic {topic} is not in the bag; its image topics: {listing}")
            if topic not in images:
                raise BagError(f"topic {topic} is a {topic_types[topic]}, not a sensor_msgs/Image or CompressedImage")
        topics = list(dict.fromkeys(wanted))
    else:
        if not images:
            listing = ", ".join(f"{t} ({m})" for t, m in sorted(topic_types.items())) or "no topics at all"
            raise BagError(f"no sensor_msgs/Image or CompressedImage topic in the bag: {listing}")
        topics = [t for t in sorted(images) if not (t.endswith("/compressed") and t[: -len("/compressed")] in images)]
    topics, reason = topics_refusal(topics)  # the node's own check: two cameras must not share their outputs
    if reason:
        raise BagError(f"{reason}; choose the cameras with --topics")
    return topics


# -- writing ------------------------------------------------------------------------------------------------------
class OutputBag:
    """OUT: the input's connections copied as they are, plus output topics added on first use."""

    def __init__(self, path: str | Path, storage: str, source: InputBag, replaced: set[str]):
        """``replaced``: input topics this run writes anew (outputs recorded earlier, e.g. with the node running);
        their recorded messages are left out, so each output topic holds one run's messages."""
        self.path = Path(path)
        check_output_path(self.path, storage)
        self.writer = Writer(self.path, version=Writer.VERSION_LATEST, storage_plugin=STORAGES[storage])
        try:
            self.writer.open()
        except (WriterError, OSError) as error:
            raise BagError(f"cannot create {self.path}: {error}") from None
        self.source = source
        self.replaced = {topic: 0 for topic in sorted(replaced)}  # topic -> recorded messages left out
        self._copies: dict[int, object] = {}  # input connection id -> output connection
        self._outputs: dict[str, object] = {}  # output topic -> connection
        self.skipped_topics: dict[str, str] = {}
        self.written = 0

    def copy(self, connection, log_time_ns: int, raw: bytes) -> None:
        """An input message, unchanged."""
        if connection.topic in self.replaced:
            self.replaced[connection.topic] += 1
            return
        out = self._copies.get(connection.id)
        if out is None:
            if connection.topic in self.skipped_topics:
                return
            out = self._copy_connection(connection)
            if out is None:
                return
        self.writer.write(out, log_time_ns, raw)
        self.written += 1

    def _copy_connection(self, connection):
        for out in self._copies.values():  # split bags repeat a connection per file
            if (out.topic, out.msgtype) == (connection.topic, connection.msgtype):
                self._copies[connection.id] = out
                return out
        msgdef, digest = connection.msgdef.data, connection.digest
        if not msgdef or not digest:
            typestore = self.source.reader.typestore
            try:
                msgdef = msgdef or typestore.generate_msgdef(connection.msgtype, ros_version=2)[0]
                digest = digest or typestore.hash_rihs01(connection.msgtype)
            except Exception as error:  # noqa: BLE001 - the type is unknown: keep going without this topic
                self.skipped_topics[connection.topic] = f"no definition of {connection.msgtype} ({error})"
                return None
        out = self.writer.add_connection(connection.topic, connection.msgtype, msgdef=msgdef, rihs01=digest,
                                         serialization_format=connection.ext.serialization_format,
                                         offered_qos_profiles=connection.ext.offered_qos_profiles)
        self._copies[connection.id] = out
        return out

    def write(self, topic: str, message, log_time_ns: int, qos: Qos | None = None) -> None:
        """An rclpy message, serialized with rclpy."""
        out = self._outputs.get(topic)
        if out is None:
            out = self.writer.add_connection(topic, ros_type_name(message), typestore=OUTPUT_TYPESTORE,
                                             offered_qos_profiles=[qos] if qos else ())
            self._outputs[topic] = out
        self.writer.write(out, log_time_ns, serialize_message(message))
        self.written += 1

    def close(self) -> None:
        self.writer.close()


def check_output_path(path: Path, storage: str) -> None:
    if path.exists():
        raise BagError(f"output {path} exists already: give a new path (a rosbag2 folder is created there)")
    if path.suffix in (".mcap", ".db3"):
        raise BagError(f"output {path}: give a folder name (like `ros2 bag record -o`); the "
                       f"{'.db3' if storage == 'sqlite3' else '.mcap'} file is created inside it")



def write_messages(path: str | Path, storage: str, messages: Iterable[tuple[str, int, object]]) -> Path:
    """A new rosbag2 folder holding ``(topic, log time ns, rclpy message)``, serialized by rclpy, in the given order."""
    path = Path(path)
    writer = Writer(path, version=Writer.VERSION_LATEST, storage_plugin=STORAGES[storage])
    writer.open()
    connections = {}
    try:
        for topic, log_time, message in messages:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, ros_type_name(message), typestore=OUTPUT_TYPESTORE)
            writer.write(connections[topic], log_time, serialize_message(message))
    finally:
        writer.close()
    return path
