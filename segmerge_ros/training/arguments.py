"""Command-line values shared by ``segmerge-train``'s subcommands (frame ranges, training crop sizes, ``key=value``
options), and by the benchmarks' ``--param``."""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from segmerge_ros.inference.engine import parse_size


def parse_range(text: str) -> tuple[int, int | None, int]:
    """``"0:640:2"`` -> (0, 640, 2); ``"100:"`` -> (100, None, 1)."""
    parts = (text.split(":") + ["", ""])[:3]
    start = int(parts[0] or 0)
    stop = int(parts[1]) if parts[1] else None
    step = int(parts[2] or 1)
    return start, stop, step


def parse_crop(text: str) -> tuple[int, int]:
    """``--crop`` for argparse's ``type=``: ``"256x320"`` (height x width) or ``"256"`` (a square).

    The size rules are the engine's ``parse_size`` (at least 32x32); a bad value becomes an argparse error that
    names the option instead of a traceback.
    """
    text = text.strip()
    if text.isdigit():  # the square shorthand segmerge-train has always taken; parse_size wants both sides
        text = f"{text}x{text}"
    try:
        size = parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if size is None:  # parse_size reads "" as "the frame's own size", which a training crop cannot be
        raise argparse.ArgumentTypeError("a crop size is required, e.g. 256x320 (HEIGHTxWIDTH)")
    return size


def parse_key_values(items: Sequence[str], option: str) -> dict:
    """``key=value`` pairs of a repeatable ``option``; values parsed as JSON when possible (numbers, booleans,
    lists, null), else kept as strings. ValueError names the option for a pair without ``=``."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} expects key=value, got {item!r}")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed
