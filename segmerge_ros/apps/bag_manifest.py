"""The many-bag run's record and resume rules: ``DIR/segmerge-manifest.json``, one entry per input.

An entry says what became of one input: ``status`` (``complete``, ``failed``, or ``running``: started and not
finished, e.g. interrupted), its frames, persons and failures, timings, each camera's merge-rate trace, and the output's
``checksum`` (sha256 over the output folder's files). An output is written under ``DIR/.segmerge-partial/`` and moved
into ``DIR`` whole, and its entry says ``complete`` only after that move, so no half-written output is ever marked
complete. The manifest itself is replaced atomically (temporary file, then ``os.replace``) after every change.

On a re-run (``decide``):
- complete, its output's checksum still matching and its input unchanged: skipped;
- complete but the output is missing or changed, or the input changed (its files' names, sizes and times): redone;
- running (interrupted) or without an entry: redone, a leftover output removed first;
- failed because of the input (unreadable, no camera, no frame processable): kept as failed while the input's files
  are unchanged (``--retry-failed`` redoes it); failed for another reason (a worker lost, frames that raised): redone.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from segmerge_ros.apps.bag_io import BagError
from segmerge_ros.apps.bag_run import BagSummary
from segmerge_ros.apps.demo import percentile

MANIFEST_NAME = "segmerge-manifest.json"
PARTIAL_DIR = ".segmerge-partial"  # outputs being written: moved into DIR when complete, cleared at each start
LOCK_NAME = ".segmerge-lock"
COMPLETE, FAILED, RUNNING = "complete", "failed", "running"
INPUT_ERROR, RUN_ERROR = "input", "run"  # a failure of the bag itself (kept), or of the run (redone)
DO, SKIP, KEEP = "do", "skip", "keep"  # decide's actions: process it; done earlier; failed earlier, not retried
BAG_FILES = (".mcap", ".db3", ".yaml")  # what fingerprints a bag folder


def output_name(path: Path) -> str:
    """The output's name for the input ``path``: a bag folder's name, a bare file's stem."""
    return path.name if path.is_dir() else path.stem


def checksum(folder: Path) -> str:
    """sha256 over every file under ``folder``: relative names, sizes and contents, in name order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(folder).as_posix()}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def fingerprint(path: Path) -> str:
    """The input as it is now, cheaply: its bag files' names, sizes and modification times (a copy, a repair or a
    new recording under the same name changes it)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BAG_FILES)
    else:
        files = [path] if path.is_file() else []
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path).as_posix() if path.is_dir() else file.name}\0{stat.st_size}\0"
                      f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _finite(value: float, digits: int = 3) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


def merge_rate_trace(timeline) -> list[list]:
    """A camera's merge rates as ``[frame index, time s, rate]`` where the rate changes (first frame included);
    ``None`` for a preset's frames (no single rate)."""
    trace: list[list] = []
    for index, point in enumerate(timeline):
        rate = _finite(point.merge_rate, 4)
        if not trace or trace[-1][2] != rate:
            trace.append([index, round(point.time_s, 3), rate])
    return trace


def summary_entry(summary: BagSummary) -> dict:
    """What a finished bag's run says about it: status, counts, timings, the cameras' traces (no checksum yet)."""
    problems = summary.problems()
    entry = {"status": FAILED if problems else COMPLETE, "error": "; ".join(problems),
             "error_kind": (INPUT_ERROR if summary.error or summary.processed == 0 else RUN_ERROR) if problems else "",
             "frames": summary.total("frames"), "processed": summary.processed, "bad": summary.bad,
             "failed_frames": summary.failed, "persons": summary.total("persons"),
             "messages_in": summary.messages_in, "messages_out": summary.messages_out,
             "wall_s": round(summary.wall_s, 3),
             "fps": round(summary.processed / summary.wall_s, 2) if summary.wall_s > 0 else None,
             "backend": summary.backend, "cameras": {}}
    for tally in summary.cameras.values():
        ms = tally.processing_ms
        entry["cameras"][tally.topic] = {
            "type": tally.msgtype, "frames": tally.frames, "processed": tally.processed, "bad": tally.bad,
            "failed": tally.failed, "persons": tally.persons, "bad_reasons": dict(tally.bad_reasons),
            "processing_ms_p50": _finite(percentile(ms, 50)), "processing_ms_p90": _finite(percentile(ms, 90)),
            "merge_rate_trace": merge_rate_trace(tally.timeline)}
    return entry


def failed_entry(error: str, kind: str) -> dict:
    return {"status": FAILED, "error": error, "error_kind": kind, "frames": 0, "processed": 0, "bad": 0,
            "failed_frames": 0, "persons": 0}


class Manifest:
    """``DIR/segmerge-manifest.json``: the options the outputs were made with, and an entry per input name."""

    def __init__(self, out_dir: Path, options: dict):
        self.out_dir, self.path = out_dir, out_dir / MANIFEST_NAME
        self.options = json.loads(json.dumps(options))  # as it reads back
        self.bags: dict[str, dict] = {}

    @classmethod
    def load(cls, out_dir: Path, options: dict) -> Manifest:
        """The manifest in ``out_dir`` (a new one if there is none); BagError if its outputs were made with other
        options: mixing them in one folder would hide which is which."""
        manifest = cls(out_dir, options)
        if not manifest.path.is_file():
            return manifest
        try:
            data = json.loads(manifest.path.read_text(encoding="utf-8"))
            recorded, bags = data["options"], data["bags"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BagError(f"cannot read {manifest.path} ({error}): move it away to start {out_dir} over") from None
        changed = sorted(option_differences(recorded, manifest.options))
        if changed:
            raise BagError(f"{out_dir} holds outputs made with other options ({'; '.join(changed)}): give another "
                           f"--out-dir, or the same options")
        manifest.bags = bags
        return manifest

    def save(self) -> None:
        """Atomically: a reader (or a crash) sees the old manifest or the new one, never a part."""
        data = {"tool": "segmerge-bag", "version": 1, "options": self.options, "bags": self.bags}
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=1)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, self.path)

    def record(self, name: str, entry: dict) -> None:
        self.bags[name] = entry
        self.save()


def option_differences(recorded: dict, current: dict, prefix: str = "") -> Iterator[str]:
    """``name: recorded -> current`` for each option set in both that differs (options added since are not)."""
    for key in recorded.keys() & current.keys():
        old, new = recorded[key], current[key]
        if isinstance(old, dict) and isinstance(new, dict):
            yield from option_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            yield f"{prefix}{key}: {old!r} -> {new!r}"


@dataclass
class Decision:
    """What a run does with one input: ``action`` DO, SKIP or KEEP, and why (said in the plan and the table)."""

    name: str
    path: Path
    action: str
    reason: str


def decide(manifest: Manifest, name: str, path: Path, retry_failed: bool = False, verify: bool = False) -> Decision:
    """The resume rules of the module docstring for the input ``path`` with the output name ``name``. A complete
    output's checksum is read again only where its files' names, sizes or modification times differ from those
    recorded (``output_fingerprint``), or with ``verify``: a fleet's outputs are terabytes."""
    entry = manifest.bags.get(name)
    output = manifest.out_dir / name
    if entry is None:
        return Decision(name, path, DO, "not recorded: its output is redone" if output.exists() else "new")
    changed = entry.get("fingerprint") != fingerprint(path)
    status = entry.get("status")
    if status == COMPLETE:
        if changed:
            return Decision(name, path, DO, "its input changed since it was done")
        if not output.is_dir():
            return Decision(name, path, DO, "its output is missing")
        recorded = entry.get("output_fingerprint")
        if verify or recorded is None or recorded != fingerprint(output):
            if checksum(output) != entry.get("checksum"):
                return Decision(name, path, DO, "its output changed since (checksum)")
        return Decision(name, path, SKIP, "done earlier" + (" (checksum verified)" if verify else ""))
    if status == FAILED:
        if retry_failed:
            return Decision(name, path, DO, "failed earlier: retried (--retry-failed)")
        if entry.get("error_kind") != INPUT_ERROR:
            return Decision(name, path, DO, "failed earlier in the run, not the input: retried")
        if changed:
            return Decision(name, path, DO, "failed earlier; its input changed since: retried")
        return Decision(name, path, KEEP, "failed earlier on these same files: not retried (--retry-failed)")
    return Decision(name, path, DO, "interrupted before it finished: redone")


@contextmanager
def out_dir_lock(out_dir: Path) -> Iterator[None]:
    """One run at a time per DIR (two would redo each other's outputs); BagError if another holds it."""
    with open(out_dir / LOCK_NAME, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BagError(f"another segmerge-bag is writing {out_dir}: wait for it, or give another --out-dir") \
                from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
