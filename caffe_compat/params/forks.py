"""The simpler fork layers' settings read as each fork's LayerSetUp and Reshape read
them, without torch: what the builders (layers/interp.py, bn.py, upsample.py,
relu6.py, shuffle_channel.py, axpy.py, depthwise.py) and the shape rules
(shapes/forks.py) share. The forks' CHECK failures become one-line errors naming the
layer and the field."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from ..io.schema import dialect_of
from .layer import LayerFacts, Shape


def fork_param(layer: LayerFacts, field: str):
    """The layer's `field` message, or None where the net's dialect has no such field
    (a prototxt that never sets it is read in a dialect without it): the fork's defaults
    apply then."""
    if field not in layer.param.DESCRIPTOR.fields_by_name:
        return None
    return getattr(layer.param, field)


def _has(param, name: str) -> bool:
    return param is not None and name in param.DESCRIPTOR.fields_by_name and param.HasField(name)


def expect_rank(layer: LayerFacts, index: int, rank: int) -> Shape:
    shape = tuple(layer.bottom_shapes[index])
    if len(shape) != rank:
        raise layer.error(f"bottom '{layer.bottoms[index]}' has shape {shape}, expected {rank} axes "
                          f"(num, channels, height, width)")
    return shape


# ---------------------------------------------------------------- Interp (PSPNet)

@dataclass(frozen=True)
class InterpSettings:
    crop: int  # -pad_beg: the first row and column read
    height_in: int  # the cropped input's size
    width_in: int
    height_out: int
    width_out: int


def interp_settings(layer: LayerFacts) -> InterpSettings:
    """InterpLayer::LayerSetUp and Reshape (hszhao/PSPNet interp_layer.cpp)."""
    layer.expect_bottoms(1)
    _, _, height, width = expect_rank(layer, 0, 4)
    p = fork_param(layer, "interp_param")
    pad_beg = p.pad_beg if _has(p, "pad_beg") else 0
    pad_end = p.pad_end if _has(p, "pad_end") else 0
    for name, value in (("pad_beg", pad_beg), ("pad_end", pad_end)):
        if value > 0:
            raise layer.error(f"interp_param.{name} is {value}: only pads <= 0 (cropping) are supported")
    height_eff, width_eff = height + pad_beg + pad_end, width + pad_beg + pad_end
    shrink, zoom = _has(p, "shrink_factor"), _has(p, "zoom_factor")
    for name, given in (("shrink_factor", shrink), ("zoom_factor", zoom)):
        if given and getattr(p, name) < 1:
            raise layer.error(f"interp_param.{name} is {getattr(p, name)}, must be >= 1")
    if shrink:
        height_out, width_out = (height_eff - 1) // p.shrink_factor + 1, (width_eff - 1) // p.shrink_factor + 1
    if zoom and not shrink:
        height_out, width_out = height_eff, width_eff
    if zoom:
        height_out += (height_out - 1) * (p.zoom_factor - 1)
        width_out += (width_out - 1) * (p.zoom_factor - 1)
    elif not shrink:
        if not (_has(p, "height") and _has(p, "width")):
            raise layer.error("interp_param needs zoom_factor, shrink_factor, or both height and width")
        height_out, width_out = p.height, p.width
    if height_eff <= 0 or width_eff <= 0:
        raise layer.error(f"pad_beg {pad_beg} and pad_end {pad_end} crop the whole {height}x{width} input")
    if height_out <= 0 or width_out <= 0:
        raise layer.error(f"the output size {height_out}x{width_out} must be positive")
    return InterpSettings(-pad_beg, height_eff, width_eff, height_out, width_out)


def interp_top(layer: LayerFacts, s: InterpSettings) -> Shape:
    num, channels = layer.bottom_shapes[0][:2]
    return (num, channels, s.height_out, s.width_out)


# ---------------------------------------------------------------- BN (PSPNet / TSN, SegNet)

@dataclass(frozen=True)
class BNSettings:
    segnet: bool  # SegNet's 2-blob BN; else the 4-blob BN of PSPNet and yjxiong's TSN fork
    inference: bool  # SegNet's bn_mode INFERENCE: scale * x + shift
    frozen: bool  # 4-blob: the stored statistics, and no parameter gradients
    momentum: float
    eps: float
    flat_blobs: bool = False  # TSN's blobs are (1, C), PSPNet's and SegNet's (1, C, 1, 1)


SEGNET_FIELDS = ("bn_mode", "scale_filler", "shift_filler")
PSPNET_FIELDS = ("frozen", "momentum", "eps", "slope_filler", "bias_filler")
SEGNET_BN_MODES = {0: "LEARN", 1: "INFERENCE"}


def bn_settings(layer: LayerFacts) -> BNSettings:
    """Which BN the layer is, by the dialect the net is read in: SegNet's when its
    bn_param has bn_mode, else the 4-blob BN (TSN's blobs flat)."""
    layer.expect_bottoms(1)
    expect_rank(layer, 0, 4)
    p = fork_param(layer, "bn_param")
    fields = set() if p is None else set(p.DESCRIPTOR.fields_by_name)
    segnet = "bn_mode" in fields
    if segnet:
        if p.bn_mode not in SEGNET_BN_MODES:
            raise layer.error(f"unknown bn_param.bn_mode {p.bn_mode}")
        inference = SEGNET_BN_MODES[p.bn_mode] == "INFERENCE"
        if len(layer.tops) > (1 if inference else 3):
            raise layer.error(f"{len(layer.tops)} tops: SegNet's BN writes its batch mean and variance to "
                              f"tops 2 and 3 in bn_mode LEARN only")
        return BNSettings(True, inference, False, 0.0, 1e-9)
    if len(layer.tops) != 1:
        raise layer.error(f"expects 1 top, got {len(layer.tops)}")
    if p is None:  # a dialect without bn_param: the 4-blob BN's defaults
        return BNSettings(False, False, False, 0.9, 1e-5)
    return BNSettings(False, False, p.frozen, p.momentum, p.eps, dialect_of(layer.param) == "tsn")


def bn_blob_shapes(layer: LayerFacts, s: BNSettings) -> Tuple[Shape, ...]:
    channels = layer.bottom_shapes[0][1]
    return ((1, channels) if s.flat_blobs else (1, channels, 1, 1),) * (2 if s.segnet else 4)


# ---------------------------------------------------------------- Upsample (SegNet, YOLOv3 forks)

@dataclass(frozen=True)
class UpsampleSettings:
    height_out: int
    width_out: int
    scale: int  # the nearest kind's factor; 0 for SegNet's unpooling


def upsample_settings(layer: LayerFacts) -> UpsampleSettings:
    """Two bottoms: SegNet's unpooling by the pooling mask (caffe-segnet
    upsample_layer.cpp); one: the YOLOv3 forks' nearest-neighbour upsampling
    (eric612/MobileNet-YOLO upsample_layer.cpp)."""
    layer.expect_bottoms(1, 2)
    if len(layer.tops) != 1:
        raise layer.error(f"expects 1 top, got {len(layer.tops)}")
    p = fork_param(layer, "upsample_param")
    if len(layer.bottoms) == 1:
        num, channels, height, width = expect_rank(layer, 0, 4)
        scale = p.scale if p is not None else 1
        if scale < 1:
            raise layer.error(f"upsample_param.scale is {scale}, must be >= 1")
        return UpsampleSettings(height * scale, width * scale, scale)
    shape = expect_rank(layer, 0, 4)
    if expect_rank(layer, 1, 4) != shape:
        raise layer.error(f"the mask '{layer.bottoms[1]}' has shape {tuple(layer.bottom_shapes[1])}, "
                          f"the data '{layer.bottoms[0]}' {shape}: they must match")
    if p is None or "upsample_h" not in p.DESCRIPTOR.fields_by_name:
        raise layer.error("a two-bottom Upsample is SegNet's: its upsample_param needs the segnet dialect "
                          "(--dialect segnet)")
    height, width = shape[2:]
    if p.HasField("upsample_h") and p.HasField("upsample_w"):
        for name in ("upsample_h", "upsample_w"):
            if getattr(p, name) <= 1:
                raise layer.error(f"upsample_param.{name} is {getattr(p, name)}, must be > 1")
        return UpsampleSettings(p.upsample_h, p.upsample_w, 0)
    if p.HasField("scale_h") != p.HasField("scale_w") or (p.HasField("scale") and p.HasField("scale_h")):
        raise layer.error("upsample_param needs upsample_h and upsample_w, else scale, or both scale_h and scale_w")
    scale_h, scale_w = (p.scale_h, p.scale_w) if p.HasField("scale_h") else (p.scale, p.scale)
    for name, value in (("scale_h", scale_h), ("scale_w", scale_w)):
        if value <= 1:
            raise layer.error(f"upsample_param {name if p.HasField('scale_h') else 'scale'} is {value}, must be > 1")
    for name, scale in (("pad_out_h", scale_h), ("pad_out_w", scale_w)):
        if getattr(p, name) and scale != 2:
            raise layer.error(f"upsample_param.{name} needs a scale of 2, got {scale}")
    return UpsampleSettings(height * scale_h - int(p.pad_out_h), width * scale_w - int(p.pad_out_w), 0)


def upsample_top(layer: LayerFacts, s: UpsampleSettings) -> Shape:
    num, channels = layer.bottom_shapes[0][:2]
    return (num, channels, s.height_out, s.width_out)


# ---------------------------------------------------------------- ConvolutionDepthwise

def convolution_depthwise_param(layer: LayerFacts):
    """The layer's LayerParameter as the Convolution that ConvolutionDepthwise
    (farmingyard/caffe-mobilenet conv_dw_layer.cpp) computes: 2-D, one filter per channel,
    num_output and group the bottom's channels whatever the prototxt says."""
    layer.expect_bottoms(1)
    channels = expect_rank(layer, 0, 4)[1]
    param = type(layer.param)()
    param.CopyFrom(layer.param)
    conv = param.convolution_param
    conv.num_output = conv.group = channels
    conv.ClearField("axis")
    return param


# ---------------------------------------------------------------- ShuffleChannel, Axpy, ReLU6

def shuffle_group(layer: LayerFacts) -> int:
    """ShuffleChannelLayer's group (farmingyard/ShuffleNet shuffle_channel_layer.cpp)."""
    layer.expect_bottoms(1)
    shape = tuple(layer.bottom_shapes[0])
    if not 2 <= len(shape) <= 4:
        raise layer.error(f"bottom '{layer.bottoms[0]}' has shape {shape}: needs 2 to 4 axes "
                          f"(num, channels, height, width)")
    p = fork_param(layer, "shuffle_channel_param")
    group = p.group if p is not None else 1
    if group <= 0:
        raise layer.error(f"shuffle_channel_param.group is {group}, must be > 0")
    if shape[1] % group:
        raise layer.error(f"shuffle_channel_param.group {group} does not divide the {shape[1]} channels")
    return group


def shuffle_top(layer: LayerFacts) -> Shape:
    """Reshape's top: (num, channels, height, width), 1 for the axes a smaller bottom lacks."""
    shape = tuple(layer.bottom_shapes[0])
    return shape + (1,) * (4 - len(shape)) if len(shape) < 4 else shape


def axpy_top(layer: LayerFacts) -> Shape:
    """AxpyLayer::Reshape (hujie-frank/SENet axpy_layer.cpp): a (N, C, 1, 1) scale per
    channel of x, y of x's shape."""
    layer.expect_bottoms(3)
    scale, x, y = (tuple(s) for s in layer.bottom_shapes)
    if len(x) < 2 or len(scale) < 2 or scale[:2] != x[:2] or any(d != 1 for d in scale[2:]):
        raise layer.error(f"the scale '{layer.bottoms[0]}' has shape {scale}: it must be (N, C) or (N, C, 1, 1) "
                          f"for '{layer.bottoms[1]}' of shape {x}")
    if y != x:
        raise layer.error(f"'{layer.bottoms[2]}' has shape {y}, '{layer.bottoms[1]}' {x}: they must match")
    return x


def relu6_slope(layer: LayerFacts) -> float:
    layer.expect_bottoms(1)
    p = fork_param(layer, "relu6_param")
    return p.negative_slope if p is not None else 0.0
