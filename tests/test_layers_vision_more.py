"""Pooling's round_mode FLOOR, SPP, Im2col and convolutions on a channel axis other than
1, against Caffe's loops (the pooling and convolution references of test_layers_vision,
SPPLayer's choice of kernel and padding, im2col_nd_cpu transcribed here), forward and
backward, and their ONNX emitters."""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from caffe_compat.errors import CaffeCompatError
from layer_harness import build
from test_layers_vision import (RNG, assert_rel, caffe_pool, caffe_pool_backward, conv_reference, deconv_reference,
                                export_and_compare, forward_backward, pooling_params)


# ---------------------------------------------------------------- round_mode FLOOR

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 2), st.integers(4, 9), st.sampled_from(["MAX", "AVE"]))
def test_floor_pooling_matches_caffe_loops(kernel, stride, pad, size, method):
    pad = min(pad, kernel - 1)
    shape = (2, 2, size, size + 1)
    params = pooling_params(method, (kernel, kernel), (stride, stride), (pad, pad))[:-1] + "round_mode: FLOOR }"
    _, converted = build("Pooling", params, [shape])
    x = RNG.standard_normal(shape).astype(np.float32)
    ref, mask = caffe_pool(x, method, (kernel,) * 2, (stride,) * 2, (pad,) * 2, ceil=False)
    assert converted.top_shapes[0] == ref.shape
    top_diff = RNG.standard_normal(ref.shape).astype(np.float32)
    tops, grads, _ = forward_backward(converted.module, [x], [top_diff])
    assert_rel(tops[0], ref, 1e-6)
    ref_grad = caffe_pool_backward(shape, top_diff, method, (kernel,) * 2, (stride,) * 2, (pad,) * 2, mask)
    assert_rel(grads[0], ref_grad, 1e-6)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_floor_pooling_onnx(method):
    params = pooling_params(method, (3, 3), (2, 2), (1, 1))[:-1] + "round_mode: FLOOR }"
    export_and_compare("Pooling", params, [(2, 3, 10, 9)])


# ---------------------------------------------------------------- SPP

def caffe_spp(x, height, method):
    """SPPLayer: per level l, pooling with kernel = stride = ceil(size / 2^l) and pad
    (kernel 2^l - size + 1) / 2; flattened and concatenated (one level: unflattened)."""
    tops = []
    for level in range(height):
        bins = 2 ** level
        kernel = tuple(-(-n // bins) for n in x.shape[2:])
        pad = tuple((k * bins - n + 1) // 2 for k, n in zip(kernel, x.shape[2:]))
        tops.append((caffe_pool(x, method, kernel, kernel, pad)[0], kernel, pad))
    if height == 1:
        return tops[0][0], tops
    return np.concatenate([t.reshape(x.shape[0], -1) for t, _, _ in tops], axis=1), tops


@pytest.mark.parametrize("height", [1, 2, 3])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 13, 11), (2, 1, 12, 9)])
def test_spp_matches_caffe(height, method, shape):
    _, converted = build("SPP", f"spp_param {{ pyramid_height: {height} pool: {method} }}", [shape])
    x = RNG.standard_normal(shape).astype(np.float32)
    ref, levels = caffe_spp(x, height, method)
    assert converted.top_shapes[0] == ref.shape
    top_diff = RNG.standard_normal(ref.shape).astype(np.float32)
    tops, grads, _ = forward_backward(converted.module, [x], [top_diff])
    assert_rel(tops[0], ref, 1e-6)
    # The bottom's gradient sums the levels' (Caffe's split layer).
    ref_grad = np.zeros(shape)
    offset = 0
    for top, kernel, pad in levels:
        diff = top_diff.reshape(shape[0], -1)[:, offset:offset + top[0].size]
        offset += top[0].size
        mask = caffe_pool(x, method, kernel, kernel, pad)[1]
        ref_grad += caffe_pool_backward(shape, diff.reshape(top.shape), method, kernel, kernel, pad, mask)
    assert_rel(grads[0], ref_grad, 1e-6)


def test_spp_errors():
    with pytest.raises(CaffeCompatError, match="pyramid_height"):
        build("SPP", "spp_param { }", [(1, 1, 4, 4)])
    with pytest.raises(CaffeCompatError, match="STOCHASTIC"):
        build("SPP", "spp_param { pyramid_height: 2 pool: STOCHASTIC }", [(1, 1, 4, 4)])
    with pytest.raises(CaffeCompatError, match="pad"):  # Caffe's pooling refuses pad >= kernel too
        build("SPP", "spp_param { pyramid_height: 3 }", [(1, 1, 8, 5)])


@pytest.mark.parametrize("height", [1, 3])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_spp_onnx(height, method):
    export_and_compare("SPP", f"spp_param {{ pyramid_height: {height} pool: {method} }}", [(2, 3, 13, 11)])


# ---------------------------------------------------------------- Im2col

def caffe_im2col(x, kernel, pad, stride, dilation):
    """im2col_nd_cpu for one example x (C, *spatial): row (c, kernel offset) in row-major
    order, zero where the tap falls in the padding."""
    channels, spatial = x.shape[0], x.shape[1:]
    out = [(n + 2 * p - (d * (k - 1) + 1)) // s + 1 for n, k, p, s, d in zip(spatial, kernel, pad, stride, dilation)]
    taps = int(np.prod(kernel))
    col = np.zeros((channels * taps, *out), np.float64)
    for c in range(channels):
        for tap, offset in enumerate(itertools.product(*map(range, kernel))):
            for position in itertools.product(*map(range, out)):
                source = [o * s - p + k * d for o, s, p, k, d in zip(position, stride, pad, offset, dilation)]
                if all(0 <= i < n for i, n in zip(source, spatial)):
                    col[(c * taps + tap, *position)] = x[(c, *source)]
    return col


@pytest.mark.parametrize("shape,body,kernel,pad,stride,dilation", [
    ((2, 3, 7, 6), "kernel_size: 3 pad: 1 stride: 2", (3, 3), (1, 1), (2, 2), (1, 1)),
    ((1, 2, 6, 8), "kernel_h: 2 kernel_w: 3 pad_h: 1 pad_w: 0 stride_h: 1 stride_w: 2 dilation: 2",
     (2, 3), (1, 0), (1, 2), (2, 2)),
    ((2, 2, 9), "kernel_size: 3 stride: 2 pad: 2", (3,), (2,), (2,), (1,)),
    ((1, 2, 4, 5, 4), "kernel_size: 2 kernel_size: 3 kernel_size: 2 pad: 1", (2, 3, 2), (1, 1, 1), (1, 1, 1),
     (1, 1, 1)),
])
def test_im2col_matches_caffe(shape, body, kernel, pad, stride, dilation):
    _, converted = build("Im2col", f"convolution_param {{ {body} }}", [shape])
    x = RNG.standard_normal(shape).astype(np.float32)
    ref = np.stack([caffe_im2col(example, kernel, pad, stride, dilation) for example in x])
    assert converted.top_shapes[0] == ref.shape
    np.testing.assert_array_equal(forward_backward(converted.module, [x])[0], ref)  # copies only
    module = converted.module
    assert torch.autograd.gradcheck(module, (torch.tensor(x, dtype=torch.float64, requires_grad=True),))


def test_im2col_channel_axis_2_keeps_the_leading_axes():
    _, converted = build("Im2col", "convolution_param { kernel_size: 2 axis: 2 }", [(2, 3, 4, 5)])
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    ref = np.stack([caffe_im2col(x[i, j], (2,), (0,), (1,), (1,))
                    for i in range(2) for j in range(3)]).reshape(2, 3, 8, 4)
    assert converted.top_shapes[0] == (2, 3, 8, 4)
    np.testing.assert_array_equal(forward_backward(converted.module, [x])[0], ref)  # copies only


def test_im2col_errors():
    with pytest.raises(CaffeCompatError, match="kernel_size is required"):
        build("Im2col", "convolution_param { }", [(1, 1, 4, 4)])
    with pytest.raises(CaffeCompatError, match="does not fit"):
        build("Im2col", "convolution_param { kernel_size: 5 }", [(1, 1, 4, 4)])
    with pytest.raises(CaffeCompatError, match="2-D"):
        build("Im2col", "convolution_param { kernel_h: 2 kernel_w: 2 }", [(1, 1, 4)])


@pytest.mark.parametrize("shape,body", [
    ((2, 3, 7, 6), "kernel_size: 3 pad: 1 stride: 2"),
    ((1, 2, 6, 8), "kernel_h: 2 kernel_w: 3 pad_h: 1 stride_h: 1 stride_w: 2 dilation: 2"),
    ((2, 2, 9), "kernel_size: 3 stride: 2 pad: 2"),
])
def test_im2col_onnx(shape, body):
    export_and_compare("Im2col", f"convolution_param {{ {body} }}", [shape])


# ---------------------------------------------------------------- Convolution's channel axis

@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("shape,axis", [((2, 2, 4, 5, 4), 2), ((2, 2, 4, 5, 4), -3), ((4, 5, 4), 0)])
def test_convolution_on_another_channel_axis_folds_the_leading_axes_into_the_batch(layer_type, shape, axis):
    body = f"num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 axis: {axis}"
    _, converted = build(layer_type, f'convolution_param {{ {body} weight_filler {{ type: "gaussian" std: 1 }} '
                                     f'bias_filler {{ type: "gaussian" std: 1 }} }}', [shape])
    channel = axis % len(shape)
    x = RNG.standard_normal(shape).astype(np.float32)
    module = converted.module
    batched = x.reshape((-1,) + shape[channel:])
    w, b = (p.detach().numpy() for p in module.caffe_blobs())
    reference = deconv_reference if layer_type == "Deconvolution" else conv_reference
    ref = reference(batched, w, b, (2, 2), (1, 1), (1, 1), 2)
    ref = ref.reshape(shape[:channel] + ref.shape[1:])
    assert converted.top_shapes[0] == ref.shape
    assert_rel(forward_backward(module, [x])[0], ref, 1e-5)
    x64 = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module.double(), (x64,), fast_mode=True)


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
def test_convolution_on_channel_axis_2_onnx(layer_type):
    export_and_compare(layer_type, 'convolution_param { num_output: 4 kernel_size: 3 axis: 2 '
                                   'weight_filler { type: "gaussian" std: 1 } }', [(2, 3, 4, 6, 5)])
