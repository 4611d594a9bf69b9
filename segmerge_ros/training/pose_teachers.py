"""Pose teachers by file: ``segmerge-train pose --teacher FILE [--teacher-kind KIND]`` builds MoveNet or BlazePose.

A teacher is any object with ``on_image(square_rgb) -> (17, 3)`` normalised (y, x, score) in COCO-17 order (the
augmented pipeline needs only that); the classes here also have ``on_boxes`` / ``on_regions`` (the plain pipeline).
``teacher_identity`` names a teacher for cache keys: its class, file and file size.
"""

from __future__ import annotations

from pathlib import Path

TEACHER_KINDS = ("auto", "movenet", "blazepose")


def teacher_kind(path: str | Path, kind: str = "auto") -> str:
    """"movenet" or "blazepose": ``kind`` when given, else from the file name (``movenet*`` or
    ``pose_landmark*`` / ``*blazepose*``)."""
    if kind not in TEACHER_KINDS:
        raise ValueError(f"unknown teacher kind {kind!r}; use one of {TEACHER_KINDS}")
    if kind != "auto":
        return kind
    name = Path(path).name.lower()
    if "movenet" in name:
        return "movenet"
    if "pose_landmark" in name or "blazepose" in name:
        return "blazepose"
    raise ValueError(f"cannot tell the teacher kind of {Path(path).name} from its name; give --teacher-kind")


def build_teacher(path: str | Path, kind: str = "auto", threads: int = 1):
    """The teacher of ``path``: ``MoveNetTeacher`` or ``BlazePoseTeacher`` (see ``teacher_kind``)."""
    if teacher_kind(path, kind) == "movenet":
        from segmerge_ros.training.movenet import MoveNetTeacher
        return MoveNetTeacher(path, threads=threads)
    from segmerge_ros.training.blazepose import BlazePoseTeacher
    return BlazePoseTeacher(path, threads=threads)


def teacher_identity(teacher) -> dict:
    """{name, file, bytes} of a teacher: its ``name`` (else its class name) and its ``path`` when it has one."""
    path = getattr(teacher, "path", None)
    name = getattr(teacher, "name", None) or type(teacher).__name__
    if path is None:
        return {"name": name, "file": None, "bytes": None}
    path = Path(path).resolve()
    return {"name": name, "file": str(path), "bytes": path.stat().st_size if path.is_file() else None}
