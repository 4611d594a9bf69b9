"""The on-disk cache of compiled engines (TensorRT engines, OpenVINO models), shared by the compiled backends.

An entry's file name is a readable prefix (model, input shape, rung, precision) and a digest of its whole key:
everything the engine depends on (weights hash, the rung's exact configuration, a digest of the code that defines
the network, runtime versions, the device, the exporter). Another key is another file, so entries for other
weights or another OpenVINO version never overwrite each other; a JSON sidecar, written last, records the key, and
an entry is used only when its sidecar matches. A build runs under a file lock (a second process waits and then
reuses what the first built), into temporary files renamed into place. The cache is bounded
(``max_mb``, default ``DEFAULT_MAX_MB`` or ``$SEGMERGE_ENGINE_CACHE_MAX_MB``): after each build the least recently
used entries are deleted until it fits. Pure: testable without any of the runtimes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from segmerge_ros.merging.segformerpp import MergeConfig

LOG = logging.getLogger(__name__)

def pixel_shape(input_shape: Sequence[int]) -> tuple[int, int, int, int]:
    """(H, W) or (N, 3, H, W) -> (N, 3, H, W): the network input the engine feeds."""
    shape = tuple(int(v) for v in input_shape)
    if len(shape) == 2:
        return (1, 3) + shape
    if len(shape) == 4 and shape[1] == 3:
        return shape  # type: ignore[return-value]
    raise ValueError(f"input shape must be (H, W) or (N, 3, H, W), got {input_shape}")


def config_fingerprint(config: MergeConfig) -> str:
    """A short digest of a merge configuration's exact settings (a rung renamed or retuned gets a new one)."""
    return hashlib.sha256(repr(config).encode()).hexdigest()[:16]



IDENTITY_FIELDS = ("model", "input_shape", "rung", "precision")
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # segmerge_ros/
# what an exported engine computes: the networks, the merge operations, the model families and the export code
ENGINE_SOURCES = ("models", "merging", "inference/families", "inference/backends")


@lru_cache(maxsize=4)
def code_fingerprint(root: Path = PACKAGE_ROOT) -> str:
    """A digest of the source files in ``ENGINE_SOURCES`` under ``root``: an engine exported by other code is stale,
    even under the same package version (a development checkout, a patched install, an upgrade)."""
    digest = hashlib.sha256()
    for folder in ENGINE_SOURCES:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


DEFAULT_MAX_MB = 4096  # a whole OpenVINO ladder at 576x768 is about 100 MB of IR; TensorRT engines are larger


def default_cache_max_mb() -> float:
    """$SEGMERGE_ENGINE_CACHE_MAX_MB, else ``DEFAULT_MAX_MB``."""
    value = os.environ.get("SEGMERGE_ENGINE_CACHE_MAX_MB", "")
    try:
        return float(value) if value else float(DEFAULT_MAX_MB)
    except ValueError:
        LOG.warning("SEGMERGE_ENGINE_CACHE_MAX_MB=%r is not a number; using %d", value, DEFAULT_MAX_MB)
        return float(DEFAULT_MAX_MB)


def default_cache_dir() -> Path:
    """$SEGMERGE_ENGINE_CACHE, else $XDG_CACHE_HOME/segmerge_ros/engines (~/.cache/segmerge_ros/engines)."""
    if os.environ.get("SEGMERGE_ENGINE_CACHE"):
        return Path(os.environ["SEGMERGE_ENGINE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "segmerge_ros" / "engines"


def weights_hash(weights: str | Path | Mapping[str, torch.Tensor]) -> str:
    """sha256 of the weights: a file's bytes, a hub folder's weight and config files, or a state dict's tensors
    (names, dtypes, shapes and bytes, in sorted order: the same weights always give the same hash)."""
    digest = hashlib.sha256()
    if isinstance(weights, Mapping):
        for name in sorted(weights):
            tensor = weights[name].detach().cpu().contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()
    path = Path(weights)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and _is_weight_file(p))
    if not files:
        raise FileNotFoundError(f"no weight files at {path}")
    for file in files:
        if len(files) > 1:
            digest.update(file.name.encode() + b"\0")
        with file.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _is_weight_file(path: Path) -> bool:
    return path.suffix in (".safetensors", ".bin", ".pth", ".pt") or path.name == "config.json"



def engine_key_fields(
    model_name: str,
    weights_digest: str,
    input_shape: Sequence[int],
    config: MergeConfig,
    precision: str,
    environment: Mapping[str, str],
) -> dict[str, str]:
    """Everything one engine depends on, as strings (JSON round-trips them unchanged)."""
    fields = {
        "model": model_name,
        "weights": weights_digest,
        "input_shape": "x".join(str(v) for v in pixel_shape(input_shape)),
        "rung": config.name,
        "rung_config": config_fingerprint(config),
        "precision": precision,
        "code": code_fingerprint(),
    }
    fields.update({name: str(value) for name, value in environment.items()})
    return fields


def engine_cache_key(fields: Mapping[str, object]) -> str:
    """A digest of every key field: any change in any field gives another key."""
    canonical = json.dumps({name: str(value) for name, value in fields.items()}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass
class EngineIO:
    """How engines are built and loaded (each compiled backend has its default; tests pass fakes)."""

    build: Callable[[nn.Module, torch.Tensor, torch.dtype, Path], None]
    load: Callable[[Path], Callable[[torch.Tensor], torch.Tensor]]


class EngineCache:
    """Engines on disk: ``<prefix>_<key digest><suffix>`` (with companion files of the same stem, e.g. OpenVINO's
    ``.bin`` beside its ``.xml``) plus ``<...><suffix>.json`` holding the key fields it was built for. ``max_mb``
    bounds the folder's entries (None: ``default_cache_max_mb()``)."""

    def __init__(
        self, cache_dir: str | Path, log: logging.Logger = LOG, suffix: str = ".ep", companions: Sequence[str] = (),
        max_mb: float | None = None,
    ):
        self.cache_dir = Path(cache_dir)
        self.log = log
        self.suffix = suffix
        self.companions = tuple(companions)
        self.max_mb = default_cache_max_mb() if max_mb is None else float(max_mb)

    def companions_of(self, path: Path) -> list[Path]:
        return [path.with_suffix(companion) for companion in self.companions]

    @staticmethod
    def prefix_for(fields: Mapping[str, object]) -> str:
        """The readable part of an entry's name: what was asked for (model, input shape, rung, precision)."""
        return "_".join(re.sub(r"[^A-Za-z0-9.=+-]+", "-", str(fields.get(name, ""))) for name in IDENTITY_FIELDS)

    def path_for(self, fields: Mapping[str, object]) -> Path:
        wanted = {name: str(value) for name, value in fields.items()}
        return self.cache_dir / f"{self.prefix_for(fields)}_{engine_cache_key(wanted)[:16]}{self.suffix}"

    @staticmethod
    def sidecar_for(path: Path) -> Path:
        return path.with_name(path.name + ".json")

    def lookup(self, fields: Mapping[str, object]) -> Path | None:
        """The cached engine for ``fields``, or None when there is none or it was built for something else; a hit
        counts as a use (least-recently-used eviction)."""
        path = self.path_for(fields)
        if not path.is_file():
            return None
        missing = [companion.name for companion in self.companions_of(path) if not companion.is_file()]
        if missing:
            self.log.warning("cached engine %s lacks %s; rebuilding it", path.name, ", ".join(missing))
            return None
        sidecar = self.sidecar_for(path)
        try:
            recorded = json.loads(sidecar.read_text())
            recorded_fields = {name: str(value) for name, value in recorded["fields"].items()}
        except (OSError, ValueError, KeyError, AttributeError) as error:
            self.log.warning("cached engine %s has no readable metadata (%s); rebuilding it", path.name, error)
            return None
        wanted = {name: str(value) for name, value in fields.items()}
        if recorded_fields != wanted or recorded.get("key") != engine_cache_key(wanted):
            changes = describe_mismatch(recorded_fields, wanted)
            self.log.warning("cached engine %s is stale (%s); rebuilding it", path.name, changes)
            return None
        with contextlib.suppress(OSError):
            os.utime(sidecar)  # the entry's last use
        return path

    def _explain_miss(self, fields: Mapping[str, object]) -> None:
        """Say why an entry for the same model, shape, rung and precision does not serve (other weights, an
        upgrade): the newest such entry's differences, logged as the reason for the build."""
        wanted = {name: str(value) for name, value in fields.items()}
        pattern = f"{glob_escape(self.prefix_for(fields))}_*{self.suffix}.json"
        others = sorted(self.cache_dir.glob(pattern), key=_mtime, reverse=True) if self.cache_dir.is_dir() else []
        for sidecar in others[:1]:
            try:
                recorded = {k: str(v) for k, v in json.loads(sidecar.read_text())["fields"].items()}
            except (OSError, ValueError, KeyError, AttributeError):
                continue
            self.log.warning("cached engine %s is stale for this run (%s); building another beside it",
                             sidecar.name[: -len(".json")], describe_mismatch(recorded, wanted))

    @contextlib.contextmanager
    def _locked(self, path: Path):
        """An exclusive lock on ``path``'s entry across processes (a builder's partner waits, then reuses)."""
        lock_path = path.with_name(f".{path.name}.lock")
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def store(self, fields: Mapping[str, object], builder: Callable[[Path], object]) -> Path:
        """Build with ``builder(path)`` into temporary files, then move engine, companions and (last) metadata into
        place; whatever mapping ``builder`` returns is recorded in the metadata (e.g. the exporter used)."""
        path = self.path_for(fields)
        path.parent.mkdir(parents=True, exist_ok=True)
        sidecar = self.sidecar_for(path)
        sidecar.unlink(missing_ok=True)  # an engine without matching metadata is never trusted, even half-written
        temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{self.suffix}")  # keeps the suffix for savers
        try:
            details = builder(temporary)
            if not temporary.is_file():
                raise RuntimeError(f"the engine builder wrote nothing to {temporary}")
            for written, final in zip(self.companions_of(temporary), self.companions_of(path)):
                if not written.is_file():
                    raise RuntimeError(f"the engine builder wrote no {written.suffix} file beside {temporary.name}")
                os.replace(written, final)
            os.replace(temporary, path)
        finally:
            for leftover in [temporary, *self.companions_of(temporary)]:
                leftover.unlink(missing_ok=True)
        wanted = {name: str(value) for name, value in fields.items()}
        record = {"key": engine_cache_key(wanted), "fields": wanted, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if isinstance(details, Mapping):
            record["built_with"] = {name: str(value) for name, value in details.items()}
        sidecar_temporary = sidecar.with_name(sidecar.name + f".{os.getpid()}.tmp")
        sidecar_temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(sidecar_temporary, sidecar)
        try:
            self.evict(keep=path)
        except OSError as error:  # the entry is built and valid: a failed clean-up must not undo that
            self.log.warning("engine cache: eviction failed (%s); the cache may exceed %.0f MB", error, self.max_mb)
        return path

    def built_with(self, path: Path) -> dict[str, str]:
        """What the builder recorded for the entry at ``path`` (empty when nothing)."""
        try:
            return dict(json.loads(self.sidecar_for(path).read_text()).get("built_with", {}))
        except (OSError, ValueError, AttributeError):
            return {}

    def entries(self) -> list[tuple[Path, int, float]]:
        """(engine path, bytes with companions and metadata, last use) of every complete entry."""
        found = []
        if not self.cache_dir.is_dir():
            return found
        for sidecar in self.cache_dir.glob(f"*{self.suffix}.json"):
            path = sidecar.with_name(sidecar.name[: -len(".json")])
            files = [path, sidecar, *self.companions_of(path)]
            found.append((path, sum(_size(f) for f in files), _mtime(sidecar)))
        return found

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete the least recently used entries (never ``keep``) until the folder's entries fit ``max_mb``;
        returns what was deleted (each logged)."""
        entries = sorted(self.entries(), key=lambda entry: entry[2])
        total = sum(size for _, size, _ in entries)
        limit = self.max_mb * 1e6
        deleted = []
        for path, size, _ in entries:
            if total <= limit:
                break
            if path == keep:
                continue
            for file in [self.sidecar_for(path), path, *self.companions_of(path)]:  # metadata first: never a torn hit
                file.unlink(missing_ok=True)
            total -= size
            deleted.append(path)
            self.log.info("engine cache over %.0f MB: deleted the least recently used %s (%.1f MB)",
                          self.max_mb, path.name, size / 1e6)
        return deleted

    def get_or_build(self, fields: Mapping[str, object], builder: Callable[[Path], object]) -> tuple[Path, str]:
        """(path, "reused") for a matching entry, else build it under the entry's lock: (path, "built"). A process
        that waited for another's build of the same entry reuses it."""
        path = self.lookup(fields)
        if path is not None:
            return path, "reused"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with self._locked(self.path_for(fields)):
            path = self.lookup(fields)
            if path is not None:
                return path, "reused"
            self._explain_miss(fields)
            return self.store(fields, builder), "built"

    def load_or_build(
        self, fields: Mapping[str, object], builder: Callable[[Path], object], load: Callable[[Path], object]
    ) -> tuple[object, Path, str]:
        """``(load(path), path, "reused" | "built")``; a cached file that fails to load (truncated, corrupt, foreign)
        is rebuilt once with a log line rather than given up on."""
        path, status = self.get_or_build(fields, builder)
        try:
            return load(path), path, status
        except Exception as error:
            self.log.warning("cannot load cached engine %s (%s: %s); rebuilding it", path.name, type(error).__name__, error)
            with self._locked(path):
                path = self.store(fields, builder)
            return load(path), path, "built"


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _size(path: Path) -> int:
    """Bytes of ``path``; 0 when it is gone (another process may evict an entry while this one counts)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def describe_mismatch(recorded: Mapping[str, str], wanted: Mapping[str, str]) -> str:
    """"tensorrt 10.3.0 -> 10.7.0, gpu Orin -> Thor": the fields that differ, old value first."""
    names = sorted(set(recorded) | set(wanted))
    changes = [
        f"{name} {recorded.get(name, '(none)')} -> {wanted.get(name, '(none)')}"
        for name in names
        if recorded.get(name) != wanted.get(name)
    ]
    return ", ".join(changes) or "key digest differs"

