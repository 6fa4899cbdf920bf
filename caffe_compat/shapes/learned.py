"""Shape rules of the layers that hold parameter blobs: their tops and, in Caffe's order,
their blobs."""
from __future__ import annotations

import math

from ..params.layer import conv_output, conv_window
from .base import LayerView, rule


@rule("Convolution", "Deconvolution")
def _convolution(v: LayerView):
    if len(v.bottoms) < 1 or len(v.bottoms) != len(v.tops):
        raise v.error("needs one top per bottom")
    cp = v.param.convolution_param
    shape = tuple(v.bottom_shapes[0])
    axis = v.canonical_axis(cp.axis, len(shape))  # the channel axis; the axes before it are all batch
    if not 1 <= len(shape) - axis - 1 <= 3:
        raise v.error(f"needs 1 to 3 spatial axes after channel axis {axis}, got shape {shape}")
    kernel, stride, pad, dilation = conv_window(v, len(shape) - axis - 1)
    channels, outputs, group = shape[axis], cp.num_output, cp.group
    if outputs <= 0:
        raise v.error("num_output must be positive")
    if group <= 0 or channels % group or outputs % group:
        raise v.error(f"group {group} must divide both the {channels} input channels and num_output {outputs}")
    transposed = v.type == "Deconvolution"
    weight = (channels, outputs // group) + kernel if transposed else (outputs, channels // group) + kernel
    out = conv_output(v, shape[axis + 1:], kernel, stride, pad, dilation, transposed)
    top = (*shape[:axis], outputs, *out)
    return [top] * len(v.tops), [weight] + ([(outputs,)] if cp.bias_term else [])


@rule("InnerProduct")
def _inner_product(v):
    v.expect_bottoms(1)
    ip = v.param.inner_product_param
    shape = v.bottom_shapes[0]
    axis = v.canonical_axis(ip.axis, len(shape))
    inputs, outputs = math.prod(shape[axis:]), ip.num_output
    if outputs <= 0:
        raise v.error("num_output must be positive")
    weight = (inputs, outputs) if ip.transpose else (outputs, inputs)
    return [tuple(shape[:axis]) + (outputs,)], [weight] + ([(outputs,)] if ip.bias_term else [])


@rule("Embed")
def _embed(v):
    ep = v.param.embed_param
    if ep.num_output <= 0 or ep.input_dim <= 0:
        raise v.error("num_output and input_dim must be positive")
    blobs = [(ep.input_dim, ep.num_output)] + ([(ep.num_output,)] if ep.bias_term else [])
    return [tuple(v.bottom_shapes[0]) + (ep.num_output,)], blobs


@rule("PReLU")
def _prelu(v):
    shape = v.bottom_shapes[0]
    if len(shape) < 2:
        raise v.error(f"needs a bottom of rank >= 2, got shape {shape}")
    return [shape], [() if v.param.prelu_param.channel_shared else (shape[1],)]


@rule("BatchNorm")
def _batch_norm(v):
    shape = v.bottom_shapes[0]
    if len(shape) < 2:
        raise v.error(f"needs a bottom with a channel axis, got shape {shape}")
    return [shape], [(shape[1],), (shape[1],), (1,)]  # mean, variance, their scale factor


def _operand(v, axis: int, num_axes: int):
    """The shape of Scale's/Bias's operand: the second bottom, else the learned blob."""
    shape = v.bottom_shapes[0]
    if len(v.bottoms) == 2:
        return tuple(v.bottom_shapes[1])
    start = v.canonical_axis(axis, len(shape))
    return tuple(shape[start:] if num_axes == -1 else shape[start:start + num_axes])


@rule("Scale")
def _scale(v):
    v.expect_bottoms(1, 2)
    p = v.param.scale_param
    operand = _operand(v, p.axis, p.num_axes)
    blobs = ([operand] if len(v.bottoms) == 1 else []) + ([operand] if p.bias_term else [])
    return [v.bottom_shapes[0]], blobs


@rule("Bias")
def _bias(v):
    v.expect_bottoms(1, 2)
    p = v.param.bias_param
    return [v.bottom_shapes[0]], [_operand(v, p.axis, p.num_axes)] if len(v.bottoms) == 1 else []


def _recurrent(v, states: int):
    """(hidden, input dim, static input dim or None, tops) of an RNN or LSTM layer."""
    param = v.param.recurrent_param
    hidden = param.num_output
    if hidden <= 0:
        raise v.error("recurrent_param.num_output must be positive")
    exposed = states if param.expose_hidden else 0
    x = v.bottom_shapes[0]
    if len(x) < 3 or len(v.bottoms) not in (2 + exposed, 3 + exposed):
        raise v.error(f"expects bottoms x (timesteps, streams, ...), cont[, x_static][, states], got {v.bottoms}")
    static = math.prod(v.bottom_shapes[2][1:]) if len(v.bottoms) == 3 + exposed else None
    tops = [(x[0], x[1], hidden)] + [(1, x[1], hidden)] * exposed
    return hidden, math.prod(x[2:]), static, tops


@rule("LSTM")
def _lstm(v):
    hidden, inputs, static, tops = _recurrent(v, 2)
    gates = 4 * hidden  # input, forget, output, candidate
    blobs = [(gates, inputs), (gates,)] + ([(gates, static)] if static is not None else []) + [(gates, hidden)]
    return tops, blobs


@rule("RNN")
def _rnn(v):
    hidden, inputs, static, tops = _recurrent(v, 1)
    blobs = [(hidden, inputs), (hidden,)] + ([(hidden, static)] if static is not None else [])
    return tops, blobs + [(hidden, hidden), (hidden, hidden), (hidden,)]


@rule("Parameter")
def _parameter(v):
    shape = tuple(int(d) for d in v.param.parameter_param.shape.dim)
    return [shape], [shape]
