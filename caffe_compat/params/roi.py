"""The two-stage detectors' layers read as their forks read them, without torch: the
settings and checks that the builders (layers/roi_pooling.py, layers/proposal.py) and
the shape rules (shapes/roi.py) share.

ROIPooling: rbgirshick/caffe-fast-rcnn 4115385d (roi_pooling_layer.cpp). PSROIPooling:
daijifeng001/caffe-rfcn 543f8f6a (psroi_pooling_layer.cu; Microsoft's fork is the same
layer at another field number). The proposal layer: rbgirshick/py-faster-rcnn's
lib/rpn/proposal_layer.py with generate_anchors.py and fast_rcnn/config.py."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from .layer import LayerFacts, Shape

PROPOSAL_LAYER = "rpn.proposal_layer.ProposalLayer"  # python_param module.layer


def _f32(value: float) -> float:
    return float(np.float32(value))


def _roi_count(layer: LayerFacts) -> int:
    """bottom[1]->num(), after the forks' check that each roi is 5 numbers."""
    shape = layer.bottom_shapes[1]
    if not shape or math.prod(shape[1:]) != 5:
        raise layer.error(f"bottom '{layer.bottoms[1]}' has shape {shape}; each roi must be 5 numbers "
                          f"(batch index, x1, y1, x2, y2)")
    return shape[0]


def _feature_shape(layer: LayerFacts) -> Shape:
    shape = layer.bottom_shapes[0]
    if len(shape) != 4:
        raise layer.error(f"bottom '{layer.bottoms[0]}' has shape {shape}, expected rank 4 (N, C, H, W)")
    return shape


@dataclass(frozen=True)
class ROIPoolingSettings:
    pooled_h: int
    pooled_w: int
    spatial_scale: float  # the float32 value the fork multiplies by


def roi_pooling_settings(layer: LayerFacts) -> ROIPoolingSettings:
    layer.expect_bottoms(2)
    p = layer.param.roi_pooling_param
    if p.pooled_h <= 0 or p.pooled_w <= 0:
        raise layer.error(f"roi_pooling_param.pooled_h and pooled_w must be > 0, got {p.pooled_h} and {p.pooled_w}")
    return ROIPoolingSettings(p.pooled_h, p.pooled_w, _f32(p.spatial_scale))


def roi_pooling_top(layer: LayerFacts, s: ROIPoolingSettings) -> Shape:
    channels = _feature_shape(layer)[1]
    return (_roi_count(layer), channels, s.pooled_h, s.pooled_w)


@dataclass(frozen=True)
class PSROIPoolingSettings:
    output_dim: int
    group_size: int  # the pooled height and width too
    spatial_scale: float  # float32 value


def psroi_pooling_settings(layer: LayerFacts) -> PSROIPoolingSettings:
    layer.expect_bottoms(2)
    p = layer.param.psroi_pooling_param
    # all three are `required` in the forks' caffe.proto
    missing = [name for name in ("spatial_scale", "output_dim", "group_size") if not p.HasField(name)]
    if missing:
        raise layer.error(f"psroi_pooling_param.{missing[0]} is required")
    if p.output_dim <= 0 or p.group_size <= 0:
        raise layer.error(f"psroi_pooling_param.output_dim and group_size must be > 0, "
                          f"got {p.output_dim} and {p.group_size}")
    s = PSROIPoolingSettings(p.output_dim, p.group_size, _f32(p.spatial_scale))
    channels = _feature_shape(layer)[1]
    if channels != s.output_dim * s.group_size ** 2:
        raise layer.error(f"bottom '{layer.bottoms[0]}' has {channels} channels; output_dim {s.output_dim} "
                          f"x group_size {s.group_size}^2 = {s.output_dim * s.group_size ** 2} are needed")
    return s


def psroi_pooling_top(layer: LayerFacts, s: PSROIPoolingSettings) -> Shape:
    return (_roi_count(layer), s.output_dim, s.group_size, s.group_size)


# py-faster-rcnn's fast_rcnn/config.py, by the net's phase (the layer reads cfg[phase]).
@dataclass(frozen=True)
class RPNConfig:
    pre_nms_top_n: int
    post_nms_top_n: int
    nms_thresh: float
    min_size: int


RPN_CONFIG = {"TEST": RPNConfig(6000, 300, 0.7, 16), "TRAIN": RPNConfig(12000, 2000, 0.7, 16)}


@dataclass(frozen=True)
class ProposalSettings:
    feat_stride: float  # an int in the prototxts; YAML may give a float, which the layer takes too
    anchors: Tuple[Tuple[float, float, float, float], ...]  # generate_anchors(scales=...), (x1, y1, x2, y2)
    config: RPNConfig


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _yaml_number(text: str, layer: LayerFacts, key: str):
    if not _NUMBER.match(text):
        raise layer.error(f"python_param.param_str: '{key}' must be a number, got {text!r}")
    value = float(text)
    return int(value) if re.fullmatch(r"[-+]?\d+", text) else value


def _split_top_level(text: str, separators: str):
    """`text` split at the separators that are outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(char, 0)
        if char in separators and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def parse_param_str(layer: LayerFacts, text: str) -> Dict[str, object]:
    """The YAML mappings py-faster-rcnn's prototxts write in param_str: `'feat_stride': 16`,
    one key per line or in `{...}`, lists as `[8, 16, 32]` (tagged `!!python/tuple` or not)."""
    body = text.strip()
    if body.startswith("{") and body.endswith("}"):
        entries = _split_top_level(body[1:-1], ",")
    else:
        entries = body.splitlines()
    result: Dict[str, object] = {}
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        key, colon, value = entry.partition(":")
        key = key.strip().strip("'\"")
        if not colon or not key:
            raise layer.error(f"python_param.param_str {text!r}: expected 'key': value entries")
        value = value.strip()
        if value.startswith("!!python/tuple"):
            value = value[len("!!python/tuple"):].strip()
        if value[:1] in "[(" and value[-1:] in "])":
            result[key] = [_yaml_number(v.strip(), layer, key) for v in value[1:-1].split(",") if v.strip()]
        else:
            result[key] = _yaml_number(value, layer, key)
    return result


def generate_anchors(scales, base_size: int = 16, ratios=(0.5, 1, 2)) -> np.ndarray:
    """py-faster-rcnn's generate_anchors: a (0, 0, 15, 15) window's aspect ratios (np.round,
    half to even, in float64), each at every scale; (len(ratios) * len(scales), 4)."""
    ratios = np.asarray(ratios, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    size = float(base_size * base_size)
    center = 0.5 * (base_size - 1)  # of the (0, 0, base_size - 1, base_size - 1) window
    widths = np.round(np.sqrt(size / ratios))
    heights = np.round(widths * ratios)
    rows = []
    for w, h in zip(widths, heights):
        # each ratio's window has the same center (its corners are symmetric about it)
        scaled_w, scaled_h = w * scales, h * scales
        rows.append(np.stack([center - 0.5 * (scaled_w - 1), center - 0.5 * (scaled_h - 1),
                              center + 0.5 * (scaled_w - 1), center + 0.5 * (scaled_h - 1)], axis=1))
    return np.concatenate(rows)


def proposal_settings(layer: LayerFacts, phase: str) -> ProposalSettings:
    layer.expect_bottoms(3)
    if len(layer.tops) not in (1, 2):
        raise layer.error(f"{PROPOSAL_LAYER} writes 1 or 2 tops (rois, scores), got {len(layer.tops)}")
    params = parse_param_str(layer, layer.param.python_param.param_str)
    unread = sorted(set(params) - {"feat_stride", "scales"})
    if unread:
        raise layer.error(f"python_param.param_str sets {', '.join(unread)}, which py-faster-rcnn's "
                          f"{PROPOSAL_LAYER} does not read (it reads feat_stride and scales)")
    if "feat_stride" not in params:
        raise layer.error("python_param.param_str must set 'feat_stride'")
    stride = params["feat_stride"]
    scales = params.get("scales", [8, 16, 32])
    if not isinstance(scales, list):
        scales = [scales]
    if isinstance(stride, list) or not stride > 0 or not scales or any(not s > 0 for s in scales):
        raise layer.error(f"python_param.param_str: feat_stride must be a positive number and scales "
                          f"positive numbers, got {stride!r} and {scales!r}")
    anchors = generate_anchors(scales)
    settings = ProposalSettings(stride, tuple(map(tuple, anchors.tolist())), RPN_CONFIG[phase])
    count = len(settings.anchors)
    scores, deltas, _ = layer.bottom_shapes
    for name, shape, per_anchor in ((layer.bottoms[0], scores, 2), (layer.bottoms[1], deltas, 4)):
        if len(shape) != 4 or shape[0] != 1 or shape[1] != per_anchor * count:
            raise layer.error(f"bottom '{name}' has shape {shape}; with {count} anchors it must be "
                              f"(1, {per_anchor * count}, H, W) (the layer takes one image)")
    if scores[2:] != deltas[2:]:
        raise layer.error(f"bottoms '{layer.bottoms[0]}' {scores} and '{layer.bottoms[1]}' {deltas} "
                          f"differ in height or width")
    info = layer.bottom_shapes[2]
    if not info or math.prod(info[1:]) < 3:
        raise layer.error(f"bottom '{layer.bottoms[2]}' has shape {info}; its first row must hold "
                          f"(image height, image width, scale)")
    return settings


def proposal_tops(layer: LayerFacts):
    """What the layer's setup reshapes its tops to; forward gives one row per proposal."""
    return [(1, 5), (1, 1, 1, 1)][:len(layer.tops)]
