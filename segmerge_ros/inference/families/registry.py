"""The one place that picks a model family from a model name (``family_for``) and lists the families."""

from __future__ import annotations

from segmerge_ros.inference.families.base import ModelFamily
from segmerge_ros.inference.families.mask2former import Mask2FormerFamily
from segmerge_ros.inference.families.segformer import SegFormerFamily
from segmerge_ros.inference.families.vit import ViTFamily

# Asked in order; SegFormer claims every name (it refuses names that are no SegFormer size when loading).
FAMILIES: list[type[ModelFamily]] = [ViTFamily, Mask2FormerFamily, SegFormerFamily]


def family_for(model_name: str) -> type[ModelFamily]:
    """The family of ``model_name``: the first in ``FAMILIES`` that claims it."""
    return next(family for family in FAMILIES if family.claims(model_name))


def register_family(family: type[ModelFamily]) -> type[ModelFamily]:
    """Ask ``family`` first from now on (usable as a class decorator)."""
    FAMILIES.insert(0, family)
    return family
