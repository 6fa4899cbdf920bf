"""Shape rules of the simpler fork layers: Interp, BN, Upsample, ShuffleChannel, Axpy,
ReLU6 and the depthwise convolutions (their settings read in params/forks.py)."""
from __future__ import annotations

import dataclasses

from ..params.forks import (axpy_top, bn_blob_shapes, bn_settings, convolution_depthwise_param, interp_settings,
                           interp_top, relu6_slope, shuffle_group, shuffle_top, upsample_settings, upsample_top)
from .base import rule, same_shape
from .learned import _convolution


@rule("Interp")
def _interp(v):
    return [interp_top(v, interp_settings(v))], []


@rule("BN")
def _bn(v):
    s = bn_settings(v)
    channel = (1, v.bottom_shapes[0][1], 1, 1)
    return [v.bottom_shapes[0]] + [channel] * (len(v.tops) - 1), list(bn_blob_shapes(v, s))


@rule("Upsample")
def _upsample(v):
    return [upsample_top(v, upsample_settings(v))], []


@rule("ShuffleChannel")
def _shuffle_channel(v):
    shuffle_group(v)
    return [shuffle_top(v)], []


@rule("Axpy")
def _axpy(v):
    return [axpy_top(v)], []


@rule("ReLU6")
def _relu6(v):
    relu6_slope(v)
    return same_shape(v)


@rule("DepthwiseConvolution")
def _depthwise_convolution(v):
    return _convolution(v)


@rule("ConvolutionDepthwise")
def _convolution_depthwise(v):
    return _convolution(dataclasses.replace(v, param=convolution_depthwise_param(v)))
