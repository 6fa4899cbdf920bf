"""Shape rules of the SSD fork's layers: Normalize, Permute, PriorBox, DetectionOutput."""
from __future__ import annotations

from ..params.ssd import detection_settings, normalize_blob_shape, permute_order, prior_box_settings, prior_box_top
from .base import rule, same_shape


@rule("Normalize")
def _normalize(v):
    return same_shape(v)[0], [normalize_blob_shape(v)]


@rule("Permute")
def _permute(v):
    shape = v.bottom_shapes[0]
    return [tuple(shape[axis] for axis in permute_order(v))], []


@rule("PriorBox")
def _prior_box(v):
    return [prior_box_top(v, prior_box_settings(v))], []


@rule("DetectionOutput")
def _detection_output(v):
    detection_settings(v)
    # Caffe's Reshape says one row; Forward gives one per detection (or per image if none)
    return [(1, 1, 1, 7)], []
