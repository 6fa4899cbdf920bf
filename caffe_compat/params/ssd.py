"""The SSD fork's layers (weiliu89/caffe, branch ssd) read as its LayerSetUp and Reshape
read them, without torch: the settings and checks that the builders (layers/ssd.py,
layers/permute.py, layers/l2_normalize.py) and the shape rules (shapes/ssd.py) share.
Float fields are kept as the float32 values the fork stores them in."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from ..io.schema import is_repeated
from .layer import LayerFacts, Shape

CODE_TYPES = {1: "CORNER", 2: "CENTER_SIZE", 3: "CORNER_SIZE"}  # PriorBoxParameter.CodeType


def _f32(value: float) -> float:
    return float(np.float32(value))


@dataclass(frozen=True)
class PriorBoxSettings:
    min_sizes: Tuple[float, ...]
    max_sizes: Tuple[float, ...]  # empty, or one per min size
    aspect_ratios: Tuple[float, ...]  # 1 first, then each new ratio and (flip) its inverse
    clip: bool
    variances: Tuple[float, ...]  # one for all four coordinates, or four
    img_h: int  # 0: the second bottom's height
    img_w: int
    step_h: float  # 0: image size / feature map size
    step_w: float
    offset: float

    @property
    def num_priors(self) -> int:
        return len(self.aspect_ratios) * len(self.min_sizes) + len(self.max_sizes)


def _refuse_extensions(layer: LayerFacts, param, message: str, fields: Tuple[str, ...]) -> None:
    """Fields other schemas (OpenCV's) add to these messages, which the SSD fork's
    layers do not compute: refused when set rather than ignored."""
    for name in fields:
        field = param.DESCRIPTOR.fields_by_name.get(name)
        if field is not None and (len(getattr(param, name)) if is_repeated(field) else param.HasField(name)):
            raise layer.error(f"{message}.{name} is not a field of the SSD fork's layer; "
                              f"caffe-compat computes the fork's {layer.type} only")


def prior_box_settings(layer: LayerFacts) -> PriorBoxSettings:
    p = layer.param.prior_box_param
    _refuse_extensions(layer, p, "prior_box_param", ("offset_h", "offset_w", "width", "height"))
    if not len(p.min_size):
        raise layer.error("prior_box_param.min_size must be given")
    min_sizes = tuple(_f32(s) for s in p.min_size)
    if any(not s > 0 for s in min_sizes):
        raise layer.error(f"prior_box_param.min_size must be positive, got {list(min_sizes)}")
    ratios = [1.0]
    for value in p.aspect_ratio:
        ratio = np.float32(value)
        # duplicates within 1e-6 of a ratio already listed (inverses included) are skipped
        if any(float(abs(ratio - np.float32(r))) < 1e-6 for r in ratios):  # float difference, double bound
            continue
        ratios.append(float(ratio))
        if p.flip:
            ratios.append(_f32(1.0 / float(ratio)))  # 1./ar in double, stored as float
    max_sizes = tuple(_f32(s) for s in p.max_size)
    if max_sizes:
        if len(max_sizes) != len(min_sizes):
            raise layer.error(f"prior_box_param.max_size must be given once per min_size ({len(min_sizes)}), "
                              f"got {len(max_sizes)}")
        for low, high in zip(min_sizes, max_sizes):
            if not high > low:
                raise layer.error(f"prior_box_param.max_size {high:g} must be greater than min_size {low:g}")
    variances = tuple(_f32(v) for v in p.variance) or (_f32(0.1),)
    if len(variances) not in (1, 4):
        raise layer.error(f"prior_box_param.variance must be given once or 4 times, got {len(variances)}")
    if any(not v > 0 for v in variances):
        raise layer.error(f"prior_box_param.variance must be positive, got {list(variances)}")
    img_h = img_w = 0
    if p.HasField("img_h") or p.HasField("img_w"):
        if p.HasField("img_size"):
            raise layer.error("give either prior_box_param.img_size or img_h/img_w, not both")
        img_h, img_w = p.img_h, p.img_w
        if img_h <= 0 or img_w <= 0:
            raise layer.error(f"prior_box_param.img_h and img_w must be positive, got {img_h} and {img_w}")
    elif p.HasField("img_size"):
        if p.img_size <= 0:
            raise layer.error("prior_box_param.img_size must be positive")
        img_h = img_w = p.img_size
    step_h = step_w = 0.0
    if p.HasField("step_h") or p.HasField("step_w"):
        if p.HasField("step"):
            raise layer.error("give either prior_box_param.step or step_h/step_w, not both")
        step_h, step_w = _f32(p.step_h), _f32(p.step_w)
        if not (step_h > 0 and step_w > 0):
            raise layer.error(f"prior_box_param.step_h and step_w must be positive, got {step_h:g} and {step_w:g}")
    elif p.HasField("step"):
        step_h = step_w = _f32(p.step)
        if not step_h > 0:
            raise layer.error(f"prior_box_param.step must be positive, got {step_h:g}")
    return PriorBoxSettings(min_sizes, max_sizes, tuple(ratios), bool(p.clip), variances, img_h, img_w,
                            step_h, step_w, _f32(p.offset))


def prior_box_top(layer: LayerFacts, settings: PriorBoxSettings) -> Shape:
    """(1, 2, H * W * priors * 4): the boxes, then their variances; one set for the batch."""
    if len(layer.bottoms) < (1 if settings.img_h else 2):
        raise layer.error("needs the image as second bottom, or prior_box_param.img_size or img_h/img_w")
    shape = tuple(layer.bottom_shapes[0])
    if not 2 <= len(shape) <= 4:
        raise layer.error(f"bottom '{layer.bottoms[0]}' has shape {shape}, expected rank 2 to 4")
    if not settings.img_h and len(layer.bottom_shapes[1]) > 4:
        raise layer.error(f"bottom '{layer.bottoms[1]}' has shape {tuple(layer.bottom_shapes[1])}, "
                          f"expected rank up to 4")
    count = legacy_hw(shape)[0] * legacy_hw(shape)[1] * settings.num_priors * 4
    if count <= 0:
        raise layer.error(f"bottom '{layer.bottoms[0]}' of shape {shape} gives no prior boxes")
    return (1, 2, count)


def legacy_hw(shape: Shape) -> Tuple[int, int]:
    """Caffe's legacy height() and width(): axes 2 and 3, 1 where the blob has none."""
    return (shape[2] if len(shape) > 2 else 1, shape[3] if len(shape) > 3 else 1)


def permute_order(layer: LayerFacts) -> Tuple[int, ...]:
    """permute_param.order, completed with the axes it leaves out in their order."""
    layer.expect_bottoms(1)
    rank = len(layer.bottom_shapes[0])
    order = []
    for axis in layer.param.permute_param.order:
        if axis >= rank:
            raise layer.error(f"permute_param.order {axis} is out of range for bottom "
                              f"'{layer.bottoms[0]}' of rank {rank}")
        if axis in order:
            raise layer.error(f"permute_param.order {list(layer.param.permute_param.order)} repeats axis {axis}")
        order.append(axis)
    return tuple(order + [axis for axis in range(rank) if axis not in order])


def normalize_blob_shape(layer: LayerFacts) -> Shape:
    """The scale blob: one value (channel_shared) or one per channel."""
    layer.expect_bottoms(1)
    shape = tuple(layer.bottom_shapes[0])
    if not 2 <= len(shape) <= 4:
        raise layer.error(f"bottom '{layer.bottoms[0]}' has shape {shape}, expected rank 2 to 4")
    return () if layer.param.norm_param.channel_shared else (shape[1],)


@dataclass(frozen=True)
class DetectionSettings:
    num_classes: int
    share_location: bool
    background_label_id: int
    code_type: str  # a CODE_TYPES value
    variance_encoded_in_target: bool
    keep_top_k: int  # -1: all
    confidence_threshold: float  # -FLT_MAX when not given
    nms_threshold: float
    eta: float
    top_k: int  # -1: all
    num_priors: int

    @property
    def num_loc_classes(self) -> int:
        return 1 if self.share_location else self.num_classes


def detection_settings(layer: LayerFacts) -> DetectionSettings:
    """DetectionOutput's settings, checked against its bottoms (locations, confidences,
    priors; a fourth, the images it would draw on, is accepted and unused)."""
    layer.expect_bottoms(3, 4)
    p = layer.param.detection_output_param
    _refuse_extensions(layer, p, "detection_output_param", ("normalized_bbox",))
    if not p.HasField("num_classes"):
        raise layer.error("detection_output_param.num_classes must be given")
    nms = p.nms_param
    nms_threshold, eta = _f32(nms.nms_threshold), _f32(nms.eta)
    if not nms_threshold >= 0:
        raise layer.error(f"detection_output_param.nms_param.nms_threshold must be non-negative, got {nms_threshold:g}")
    if not 0 < eta <= 1:
        raise layer.error(f"detection_output_param.nms_param.eta must be in (0, 1], got {eta:g}")
    if p.code_type not in CODE_TYPES:
        raise layer.error(f"detection_output_param.code_type {p.code_type} is unknown")
    threshold = _f32(p.confidence_threshold) if p.HasField("confidence_threshold") else -float(np.finfo(np.float32).max)
    loc, conf, prior = (tuple(s) for s in layer.bottom_shapes[:3])
    if len(prior) < 3 or len(loc) < 2 or len(conf) < 2:
        raise layer.error(f"expects locations and confidences of rank >= 2 and priors of rank >= 3, "
                          f"got {loc}, {conf}, {prior}")
    if math.prod(prior) < 8 * (prior[2] // 4):
        raise layer.error(f"bottom '{layer.bottoms[2]}' of shape {prior} holds no variances after its boxes")
    if p.share_location and p.background_label_id == -1:
        # the fork skips the shared locations as if they were the background's, then finds none
        raise layer.error("detection_output_param.background_label_id -1 with share_location leaves no "
                          "location predictions")
    if loc[0] != conf[0]:
        raise layer.error(f"bottoms '{layer.bottoms[0]}' and '{layer.bottoms[1]}' have batch sizes "
                          f"{loc[0]} and {conf[0]}")
    settings = DetectionSettings(p.num_classes, bool(p.share_location), p.background_label_id,
                                 CODE_TYPES[p.code_type], bool(p.variance_encoded_in_target), p.keep_top_k,
                                 threshold, nms_threshold, eta, nms.top_k if nms.HasField("top_k") else -1,
                                 prior[2] // 4)
    # Caffe reads the legacy channels(): axis 1 alone, whatever follows it
    if settings.num_priors * settings.num_loc_classes * 4 != loc[1]:
        raise layer.error(f"detection_output_param.num_classes: bottom '{layer.bottoms[0]}' has {loc[1]} "
                          f"location values, expected {settings.num_priors} priors x "
                          f"{settings.num_loc_classes} location classes x 4")
    if settings.num_priors * settings.num_classes != conf[1]:
        raise layer.error(f"detection_output_param.num_classes: bottom '{layer.bottoms[1]}' has {conf[1]} "
                          f"confidences, expected {settings.num_priors} priors x {settings.num_classes} classes")
    if math.prod(loc[2:]) != 1 or math.prod(conf[2:]) != 1:
        raise layer.error(f"expects locations and confidences flattened to (num, values), got {loc} and {conf}")
    return settings
