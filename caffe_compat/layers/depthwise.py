"""The depthwise convolutions of the MobileNet forks, built as grouped Convolutions.

ConvolutionDepthwise (farmingyard/caffe-mobilenet conv_dw_layer.cpp, BVLC PR 5665):
one 2-D filter per channel, so the top has the bottom's channels whatever num_output
and group say; weights (C, 1, kh, kw), bias (C). DepthwiseConvolution
(yonghenglh6/DepthwiseConvolution depthwise_conv_layer.cpp): on the CPU it is Caffe's
Convolution as written (its own kernel is for the GPU), so num_output and group count."""
from __future__ import annotations

import dataclasses

from ..params.forks import convolution_depthwise_param
from .convolution import _build, convolution_to_onnx, convolution_to_source
from .registry import LayerContext, register, register_onnx, register_source


@register("ConvolutionDepthwise")
def build_convolution_depthwise(ctx: LayerContext):
    return _build(dataclasses.replace(ctx, param=convolution_depthwise_param(ctx)), transposed=False)


@register("DepthwiseConvolution")
def build_depthwise_convolution(ctx: LayerContext):
    return _build(ctx, transposed=False)


@register_onnx("ConvolutionDepthwise", "DepthwiseConvolution")
def depthwise_to_onnx(g, ctx, module, inputs, outputs):
    convolution_to_onnx(g, ctx, module, inputs, outputs)  # a grouped Conv


@register_source("ConvolutionDepthwise", "DepthwiseConvolution")
def depthwise_to_source(src, ctx, module, inputs, outputs):
    convolution_to_source(src, ctx, module, inputs, outputs)  # an nn.Conv2d with groups
