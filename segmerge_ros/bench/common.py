"""What segmerge-bench's model families share: the default frame, finding images, and its one-line refusals."""

from __future__ import annotations

import sys
from pathlib import Path

from segmerge_ros.merging.segformerpp import MAX_MERGE_RATE
from segmerge_ros.inference.sources import IMAGE_SUFFIXES, shared_data_dir

DEFAULT_FRAME = "segformerpp_cityscapes_frame/berlin_000543_000019_leftImg8bit.png"
MASK2FORMER_DEFAULT_SIZES = ("576x768", "512x1024")


def is_mask2former(model: str) -> bool:
    """Whether ``--model`` names a Mask2Former (``mask2former-<backbone>[-proscale]``): rows per knob setting."""
    return model.lower().startswith("mask2former")


def refuse(message: str) -> None:
    """One line on stderr and exit status 2 (argparse's for a bad command line), no traceback."""
    print(f"segmerge-bench: {message}", file=sys.stderr)
    raise SystemExit(2)


def merge_rates(text: str) -> list[float]:
    """The comma-separated merge rates of ``text``, each in [0, MAX_MERGE_RATE] (else exit with a message)."""
    values = [float(v) for v in text.split(",") if v.strip()]
    for value in values:
        if not 0.0 <= value <= MAX_MERGE_RATE:
            raise SystemExit(f"segmerge-bench: rate {value} outside [0, {MAX_MERGE_RATE}]")
    return values


def find_images(image: str | None) -> list[Path]:
    """``--image``'s files (a file or a folder's images), or the shared Cityscapes frame, or none."""
    if image is None:
        shared = shared_data_dir()
        default = shared / DEFAULT_FRAME if shared else None
        if default is None or not default.is_file():
            return []
        return [default]
    path = Path(image)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not path.is_file():
        raise SystemExit(f"segmerge-bench: image {path} does not exist")
    return [path]


def known_names(text: str, known) -> list[str]:
    """The comma-separated names of ``text``, each one of ``known`` (else exit with a message naming them)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise SystemExit(f"segmerge-bench: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(known)}")
    return names


def node_param_overrides(items: list[str]) -> dict:
    """``--param name=value`` options of the node benchmarks (values in JSON where they parse: 3, true, 0.5)."""
    from segmerge_ros.training.arguments import parse_key_values

    try:
        return parse_key_values(items, "--param")
    except ValueError as error:
        raise SystemExit(str(error)) from None
