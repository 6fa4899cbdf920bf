"""Vision layers (Convolution, Deconvolution, Pooling, LRN, InnerProduct, Embed, Crop):
each against a slow, literal transcription of Caffe's loops written here, forward and
backward, plus the build-time errors and the ONNX emitters run in onnxruntime."""
import itertools

import numpy as np
import pytest
import torch
import torch.fx
from hypothesis import given, settings
from hypothesis import strategies as st

from caffe_compat.errors import CaffeCompatError
from layer_harness import build, onnx_and_module_tops, onnx_model

FLT_MAX = float(np.finfo(np.float32).max)
RNG = np.random.default_rng(0)


def forward_backward(module, arrays, top_diffs=None, dtype=torch.float32):
    """Tops, and with `top_diffs` the bottoms' and parameters' gradients."""
    bottoms = [torch.tensor(np.asarray(a), dtype=dtype, requires_grad=True) for a in arrays]
    tops = module(*bottoms)
    tops = tops if isinstance(tops, tuple) else (tops,)
    if top_diffs is None:
        return [t.detach().numpy() for t in tops]
    module.zero_grad()
    torch.autograd.backward(tops[:len(top_diffs)], [torch.tensor(d, dtype=dtype) for d in top_diffs])
    grads = [None if b.grad is None else b.grad.numpy() for b in bottoms]
    params = [None if p.grad is None else p.grad.numpy() for p in module.caffe_blobs()]
    return [t.detach().numpy() for t in tops], grads, params


def assert_rel(ours, ref, tol=1e-5):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    finite = ~np.isnan(ref)
    scale = max(np.abs(ref[finite]).max(initial=0.0), 1e-30)
    assert np.abs(ours[finite] - ref[finite]).max(initial=0.0) / scale < tol


# ---------------------------------------------------------------- Caffe's loops, transcribed

def caffe_pool_size(size, kernel, stride, pad, clip, ceil=True):
    rounded = np.ceil if ceil else np.floor
    pooled = int(rounded(np.float32(size + 2 * pad - kernel) / np.float32(stride))) + 1
    if clip and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


def caffe_pool(x, method, kernel, stride, pad, ceil=True):
    """PoolingLayer::Forward_cpu: (top, mask); mask only for MAX. `ceil`: round_mode CEIL."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, height, width = x.shape
    clip = ph or pw
    out_h = caffe_pool_size(height, kh, sh, ph, clip, ceil)
    out_w = caffe_pool_size(width, kw, sw, pw, clip, ceil)
    top = np.zeros((n, c, out_h, out_w), np.float32)
    mask = np.full(top.shape, -1, np.int64)
    for i, j, oh, ow in itertools.product(range(n), range(c), range(out_h), range(out_w)):
        hstart, wstart = oh * sh - ph, ow * sw - pw
        if method == "MAX":
            hend, wend = min(hstart + kh, height), min(wstart + kw, width)
            hstart, wstart = max(hstart, 0), max(wstart, 0)
            best = np.float32(-FLT_MAX)
            for h in range(hstart, hend):
                for w in range(wstart, wend):
                    if x[i, j, h, w] > best:
                        best, mask[i, j, oh, ow] = x[i, j, h, w], h * width + w
            top[i, j, oh, ow] = best
        else:
            hend, wend = min(hstart + kh, height + ph), min(wstart + kw, width + pw)
            pool_size = (hend - hstart) * (wend - wstart)
            hstart, wstart = max(hstart, 0), max(wstart, 0)
            hend, wend = min(hend, height), min(wend, width)
            total = np.float32(x[i, j, hstart:hend, wstart:wend].astype(np.float64).sum())
            with np.errstate(divide="ignore", invalid="ignore"):
                top[i, j, oh, ow] = total / np.float32(pool_size)
    return top, mask


def caffe_pool_backward(x_shape, top_diff, method, kernel, stride, pad, mask):
    """PoolingLayer::Backward_cpu (a MAX window with no maximum, mask -1, routes nowhere)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, height, width = x_shape
    diff = np.zeros(x_shape, np.float64)
    for i, j, oh, ow in itertools.product(range(n), range(c), *map(range, top_diff.shape[2:])):
        if method == "MAX":
            index = mask[i, j, oh, ow]
            if index >= 0:
                diff[i, j, index // width, index % width] += top_diff[i, j, oh, ow]
            continue
        hstart, wstart = oh * sh - ph, ow * sw - pw
        hend, wend = min(hstart + kh, height + ph), min(wstart + kw, width + pw)
        pool_size = (hend - hstart) * (wend - wstart)
        hstart, wstart = max(hstart, 0), max(wstart, 0)
        hend, wend = min(hend, height), min(wend, width)
        if hend > hstart and wend > wstart:
            diff[i, j, hstart:hend, wstart:wend] += top_diff[i, j, oh, ow] / pool_size
    return diff


def conv_reference(x, w, b, stride, pad, dilation, group):
    """Direct N-D grouped, dilated convolution."""
    n, channels = x.shape[:2]
    outputs, kernel = w.shape[0], w.shape[2:]
    padded = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(p, p) for p in pad])
    spatial = [(s + 2 * p - (d * (k - 1) + 1)) // st + 1
               for s, p, d, k, st in zip(x.shape[2:], pad, dilation, kernel, stride)]
    out = np.zeros((n, outputs, *spatial))
    cin, cout = channels // group, outputs // group
    for g in range(group):
        for offset in itertools.product(*map(range, kernel)):
            window = tuple(slice(o * d, o * d + st * (m - 1) + 1, st)
                           for o, d, st, m in zip(offset, dilation, stride, spatial))
            patch = padded[(slice(None), slice(g * cin, (g + 1) * cin)) + window]
            taps = w[(slice(g * cout, (g + 1) * cout), slice(None)) + offset]
            out[:, g * cout:(g + 1) * cout] += np.einsum("nc...,oc->no...", patch, taps)
    if b is not None:
        out += b.reshape((1, -1) + (1,) * len(kernel))
    return out


def deconv_reference(x, w, b, stride, pad, dilation, group):
    """Direct transposed convolution: each input scatters its kernel (Caffe's col2im)."""
    n, channels = x.shape[:2]
    cout, kernel = w.shape[1], w.shape[2:]
    full = [st * (s - 1) + d * (k - 1) + 1 for s, st, d, k in zip(x.shape[2:], stride, dilation, kernel)]
    out = np.zeros((n, cout * group, *full))
    cin = channels // group
    for g in range(group):
        for offset in itertools.product(*map(range, kernel)):
            window = tuple(slice(o * d, o * d + st * (s - 1) + 1, st)
                           for o, d, st, s in zip(offset, dilation, stride, x.shape[2:]))
            taps = w[(slice(g * cin, (g + 1) * cin), slice(None)) + offset]
            out[(slice(None), slice(g * cout, (g + 1) * cout)) + window] += np.einsum(
                "nc...,co->no...", x[:, g * cin:(g + 1) * cin].astype(np.float64), taps)
    out = out[(slice(None), slice(None)) + tuple(slice(p, f - p) for p, f in zip(pad, full))]
    if b is not None:
        out += b.reshape((1, -1) + (1,) * len(kernel))
    return out


def lrn_reference(x, size, alpha, beta, k, region):
    x = x.astype(np.float64)
    pre = (size - 1) // 2
    if region == "ACROSS_CHANNELS":
        channels = x.shape[1]
        scale = np.full(x.shape, k, np.float64)
        for c in range(channels):
            for other in range(max(0, c - pre), min(channels, c + pre + 1)):
                scale[:, c] += alpha / size * x[:, other] ** 2
        return x * scale ** -beta
    # Caffe's composition: square, AVE pool (kernel size, pad pre, stride 1), power, product.
    pooled, _ = caffe_pool((x ** 2).astype(np.float32), "AVE", (size, size), (1, 1), (pre, pre))
    return x * (1 + alpha * pooled.astype(np.float64)) ** -beta


# ---------------------------------------------------------------- Pooling

def pooling_params(method, kernel, stride, pad, global_pooling=False):
    if global_pooling:
        return f"pooling_param {{ pool: {method} global_pooling: true }}"
    return (f"pooling_param {{ pool: {method} kernel_h: {kernel[0]} kernel_w: {kernel[1]} "
            f"stride_h: {stride[0]} stride_w: {stride[1]} pad_h: {pad[0]} pad_w: {pad[1]} }}")


def check_pooling(method, shape, kernel, stride, pad, x=None, tops=1):
    _, converted = build("Pooling", pooling_params(method, kernel, stride, pad), [shape], tops=tops)
    x = RNG.standard_normal(shape).astype(np.float32) if x is None else x
    ref_top, ref_mask = caffe_pool(x, method, kernel, stride, pad)
    assert converted.top_shapes[0] == ref_top.shape
    top_diff = RNG.standard_normal(ref_top.shape).astype(np.float32)
    results, grads, _ = forward_backward(converted.module, [x], [top_diff])
    assert_rel(results[0], ref_top, 1e-6)
    assert_rel(grads[0], caffe_pool_backward(shape, top_diff, method, kernel, stride, pad, ref_mask), 1e-6)
    if tops == 2:
        np.testing.assert_array_equal(results[1], ref_mask.astype(np.float32))
    return converted.module


@st.composite
def pool_cases(draw):
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    pad = (draw(st.integers(0, kernel[0] - 1)), draw(st.integers(0, kernel[1] - 1)))
    stride = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    shape = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    shape += [draw(st.integers(max(1, k - 2 * p), 10)) for k, p in zip(kernel, pad)]
    return draw(st.sampled_from(["MAX", "AVE"])), tuple(shape), kernel, stride, pad


@settings(max_examples=200, deadline=None)
@given(pool_cases(), st.booleans())
def test_pooling_matches_caffe_loops(case, ties):
    method, shape, kernel, stride, pad = case
    x = RNG.standard_normal(shape).astype(np.float32)
    if ties:  # few distinct values: the first maximum in Caffe's scan order must win
        x = np.round(x).astype(np.float32)
    check_pooling(method, shape, kernel, stride, pad, x, tops=2 if method == "MAX" else 1)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("shape,kernel,stride,pad,native", [
    ((2, 3, 112, 112), (3, 3), (2, 2), (0, 0), True),  # GoogLeNet's ceil-rounded pools
    ((2, 3, 7, 7), (7, 7), (1, 1), (0, 0), True),  # GoogLeNet's 7x7 average
    ((2, 3, 10, 10), (3, 3), (2, 2), (1, 1), True),  # AVE divisor at the padded border
    ((1, 2, 4, 4), (2, 2), (3, 3), (1, 1), True),  # last window would start in the padding
    ((2, 2, 9, 8), (3, 3), (2, 2), (2, 2), False),  # pad over half the kernel: torch refuses
    ((2, 2, 5, 6), (1, 2), (3, 3), (0, 0), False),  # a last window past the input, kept by Caffe
    ((2, 2, 6, 9), (2, 3), (1, 2), (1, 0), True),  # rectangular
])
def test_pooling_corners(method, shape, kernel, stride, pad, native):
    module = check_pooling(method, shape, kernel, stride, pad)
    assert module.native == native


def test_pooling_empty_windows():
    # kernel 1, stride 2 on 4 rows, pad 0: Caffe's ceil gives 3 windows; the last starts
    # at row 4, outside the input. MAX: -FLT_MAX, mask -1; AVE: 0/0 = NaN in Caffe.
    x = RNG.standard_normal((1, 2, 4, 5)).astype(np.float32)
    module = check_pooling("MAX", x.shape, (1, 1), (2, 2), (0, 0), x, tops=2)
    assert not module.native
    (top, mask) = forward_backward(module, [x])
    assert (top[:, :, 2] == -FLT_MAX).all() and (mask[:, :, 2] == -1).all()
    module = check_pooling("AVE", x.shape, (1, 1), (2, 2), (0, 0), x)
    (top,) = forward_backward(module, [x])
    assert np.isnan(top[:, :, 2]).all()


@pytest.mark.parametrize("pad, native", [((0, 0), True), ((2, 2), False)])
def test_max_pooling_keeps_the_bottoms_layout(pad, native):
    # A channels-last net (training's default on CPU) pools without converting to NCHW
    # and back; an NCHW bottom still gives an NCHW top. Values and gradients are the same.
    shape, kernel, stride = (2, 5, 9, 8), (3, 3), (2, 2)
    module = check_pooling("MAX", shape, kernel, stride, pad)
    assert module.native == native
    x = torch.tensor(RNG.standard_normal(shape), dtype=torch.float32)
    nchw = module(x.clone().requires_grad_())
    nhwc_bottom = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    nhwc = module(nhwc_bottom)
    assert nchw.is_contiguous()
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    assert torch.equal(nchw, nhwc)
    top_diff = torch.tensor(RNG.standard_normal(nchw.shape), dtype=torch.float32)
    nhwc.backward(top_diff.contiguous(memory_format=torch.channels_last))
    nchw_bottom = x.clone().requires_grad_()
    module(nchw_bottom).backward(top_diff)
    assert torch.equal(nhwc_bottom.grad, nchw_bottom.grad)


def test_global_pooling():
    shape = (2, 3, 5, 6)
    x = RNG.standard_normal(shape).astype(np.float32)
    for method in ("MAX", "AVE"):
        _, converted = build("Pooling", pooling_params(method, None, None, None, global_pooling=True), [shape])
        (top,) = forward_backward(converted.module, [x])
        ref, _ = caffe_pool(x, method, (5, 6), (1, 1), (0, 0))
        assert_rel(top, ref, 1e-6)


def test_max_pooling_gradient_goes_to_first_maximum():
    x = np.zeros((1, 1, 3, 3), np.float32)  # all ties: Caffe takes each window's top-left
    _, converted = build("Pooling", pooling_params("MAX", (2, 2), (1, 1), (0, 0)), [x.shape])
    _, (grad,), _ = forward_backward(converted.module, [x], [np.ones((1, 1, 2, 2), np.float32)])
    np.testing.assert_array_equal(grad[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("params,message", [
    ("pooling_param { pool: STOCHASTIC kernel_size: 2 }", "STOCHASTIC"),
    ("pooling_param { pool: MAX kernel_size: 2 pad: 2 }", "smaller than the kernel"),
    ("pooling_param { pool: MAX global_pooling: true kernel_size: 2 }", "global_pooling"),
    ("pooling_param { pool: MAX global_pooling: true stride: 2 }", "global_pooling"),
    ("pooling_param { pool: MAX }", "kernel_size"),
    ("pooling_param { pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 3 }", "kernel_size"),
    ("pooling_param { pool: MAX kernel_size: 2 pad_h: 1 }", "pad"),
    ("pooling_param { pool: MAX kernel_size: 9 }", "does not fit"),
])
def test_pooling_errors(params, message):
    with pytest.raises(CaffeCompatError, match=message):
        build("Pooling", params, [(1, 2, 4, 4)])


def test_pooling_errors_on_rank_and_tops():
    with pytest.raises(CaffeCompatError, match="rank"):
        build("Pooling", "pooling_param { pool: MAX kernel_size: 2 }", [(1, 2, 4)])
    with pytest.raises(CaffeCompatError, match="top"):
        build("Pooling", "pooling_param { pool: AVE kernel_size: 2 }", [(1, 2, 4, 4)], tops=2)


# ---------------------------------------------------------------- Convolution, Deconvolution

CONV_CASES = [
    # (bottom shape, convolution_param body, weight shape)
    ((2, 3, 9, 11), "num_output: 5 kernel_size: 3 pad: 1", (5, 3, 3, 3)),
    ((2, 3, 7, 8), "num_output: 4 kernel_size: 1 stride: 2", (4, 3, 1, 1)),
    ((2, 6, 13, 10), "num_output: 6 group: 3 kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 1 stride_h: 2 stride_w: 1 "
                     "dilation: 2 bias_term: false", (6, 2, 3, 2)),
    ((2, 4, 9, 10), "num_output: 2 kernel_size: 3 kernel_size: 2 stride: 2 stride: 3 pad: 0 pad: 2 "
                    "dilation: 1 dilation: 3 group: 2", (2, 2, 3, 2)),
    ((2, 3, 11), "num_output: 4 kernel_size: 3 stride: 2 pad: 1", (4, 3, 3)),
    ((1, 4, 5, 6, 7), "num_output: 4 group: 2 kernel_size: 3 kernel_size: 2 kernel_size: 3 pad: 1 "
                      "stride: 1 stride: 2 stride: 1", (4, 2, 3, 2, 3)),
]


def conv_arrays(module):
    weight = module.weight.detach().numpy().astype(np.float64)
    bias = None if module.bias is None else module.bias.detach().numpy().astype(np.float64)
    return weight, bias


def random_filler(body):
    return body + ' weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "uniform" min: -1 max: 1 }'


@pytest.mark.parametrize("shape,body,weight_shape", CONV_CASES)
def test_convolution_matches_direct_sum(shape, body, weight_shape):
    _, converted = build("Convolution", f"convolution_param {{ {random_filler(body)} }}", [shape])
    module = converted.module
    assert tuple(module.weight.shape) == weight_shape
    weight, bias = conv_arrays(module)
    g = module.geometry
    x = RNG.standard_normal(shape).astype(np.float32)
    ref = conv_reference(x, weight, bias, g.stride, g.pad, g.dilation, g.group)
    (top,) = forward_backward(module, [x])
    assert converted.top_shapes[0] == ref.shape
    assert_rel(top, ref, 1e-5)


@pytest.mark.parametrize("shape,body,weight_shape", CONV_CASES)
def test_deconvolution_matches_direct_scatter(shape, body, weight_shape):
    _, converted = build("Deconvolution", f"convolution_param {{ {random_filler(body)} }}", [shape])
    module = converted.module
    g = module.geometry
    # Caffe's deconvolution weight is (in, out / group, *kernel).
    assert tuple(module.weight.shape) == (shape[1], weight_shape[0] // g.group) + weight_shape[2:]
    weight, bias = conv_arrays(module)
    x = RNG.standard_normal(shape).astype(np.float32)
    ref = deconv_reference(x, weight, bias, g.stride, g.pad, g.dilation, g.group)
    (top,) = forward_backward(module, [x])
    assert converted.top_shapes[0] == ref.shape
    assert_rel(top, ref, 1e-5)


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
def test_convolution_gradients(layer_type):
    body = random_filler("num_output: 4 group: 2 kernel_h: 3 kernel_w: 2 stride: 2 pad: 1 dilation: 2")
    _, converted = build(layer_type, f"convolution_param {{ {body} }}", [(1, 4, 4, 3)])
    module = converted.module.double()
    x = torch.tensor(RNG.standard_normal((1, 4, 4, 3)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: module(x), (x, module.weight, module.bias))


def test_convolution_applies_its_weights_to_each_bottom():
    body = random_filler("num_output: 2 kernel_size: 3")
    _, converted = build("Convolution", f"convolution_param {{ {body} }}", [(1, 3, 5, 5)] * 2, tops=2)
    a, b = (RNG.standard_normal((1, 3, 5, 5)).astype(np.float32) for _ in range(2))
    top_a, top_b = forward_backward(converted.module, [a, b])
    np.testing.assert_array_equal(top_a, forward_backward(converted.module, [a])[0])
    np.testing.assert_array_equal(top_b, forward_backward(converted.module, [b])[0])
    assert converted.top_shapes == [(1, 2, 3, 3)] * 2 and top_a.shape == (1, 2, 3, 3)


@pytest.mark.parametrize("params,shapes,message", [
    ("convolution_param { num_output: 2 kernel_size: 3 axis: 4 }", [(1, 2, 4, 4)], "axis 4 is out of range"),
    ("convolution_param { num_output: 2 kernel_size: 3 axis: 3 }", [(1, 2, 4, 4)], "1 to 3 spatial axes"),
    ("convolution_param { num_output: 2 }", [(1, 2, 4, 4)], "kernel_size is required"),
    ("convolution_param { num_output: 2 kernel_h: 3 kernel_w: 3 }", [(1, 2, 4, 4, 4)], "2-D"),
    ("convolution_param { num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3 }", [(1, 2, 4, 4)], "not both"),
    ("convolution_param { num_output: 2 kernel_size: 1 kernel_size: 2 kernel_size: 3 }", [(1, 2, 4, 4)],
     "once per spatial axis"),
    ("convolution_param { num_output: 3 kernel_size: 1 group: 2 }", [(1, 2, 4, 4)], "group"),
    ("convolution_param { num_output: 0 kernel_size: 1 }", [(1, 2, 4, 4)], "num_output"),
    ("convolution_param { num_output: 2 kernel_size: 5 }", [(1, 2, 4, 4)], "empty output"),
    ("convolution_param { num_output: 2 kernel_size: 1 stride: 0 }", [(1, 2, 4, 4)], "positive"),
    ("convolution_param { num_output: 2 kernel_size: 1 }", [(1, 2)], "spatial"),
    ("convolution_param { num_output: 2 kernel_size: 1 }", [(1, 2, 4, 4), (1, 2, 4, 5)], "same shape"),
])
def test_convolution_errors(params, shapes, message):
    with pytest.raises(CaffeCompatError, match=message):
        build("Convolution", params, shapes, tops=len(shapes))


# ---------------------------------------------------------------- LRN

@pytest.mark.parametrize("region,size,alpha,beta,k,shape", [
    ("ACROSS_CHANNELS", 5, 0.01, 0.75, 2.0, (2, 7, 5, 5)),
    ("ACROSS_CHANNELS", 3, 1.5, 0.5, 1.0, (2, 2, 3, 4)),  # window wider than the channels
    ("ACROSS_CHANNELS", 1, 0.3, 1.2, 0.5, (1, 3, 2, 2)),
    ("WITHIN_CHANNEL", 3, 0.5, 0.75, 7.0, (2, 3, 6, 7)),  # k plays no part within a channel
    ("WITHIN_CHANNEL", 5, 2.0, 0.6, 1.0, (1, 2, 3, 2)),  # window larger than the image
])
def test_lrn_matches_caffe(region, size, alpha, beta, k, shape):
    params = f"lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} k: {k} norm_region: {region} }}"
    _, converted = build("LRN", params, [shape])
    x = RNG.standard_normal(shape).astype(np.float32)
    alpha32, beta32, k32 = (float(np.float32(v)) for v in (alpha, beta, k))
    (top,) = forward_backward(converted.module, [x])
    assert_rel(top, lrn_reference(x, size, alpha32, beta32, k32, region), 1e-5)
    module = converted.module.double()
    x = torch.tensor(x[:1, :, :3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))


def test_lrn_errors():
    with pytest.raises(CaffeCompatError, match="odd"):
        build("LRN", "lrn_param { local_size: 4 }", [(1, 4, 3, 3)])
    with pytest.raises(CaffeCompatError, match="rank"):
        build("LRN", "lrn_param { local_size: 3 }", [(4, 3, 3)])


# ---------------------------------------------------------------- InnerProduct, Embed

@pytest.mark.parametrize("shape,axis,transpose,bias", [
    ((4, 10), 1, False, True),
    ((2, 3, 4, 6), 2, False, True),
    ((2, 3, 4, 6), -1, True, False),
    ((2, 3, 4), 0, False, True),
    ((4, 10), 1, True, True),
])
def test_inner_product(shape, axis, transpose, bias):
    params = (f"inner_product_param {{ num_output: 5 axis: {axis} transpose: {str(transpose).lower()} "
              f"bias_term: {str(bias).lower()} weight_filler {{ type: 'gaussian' }} "
              f"bias_filler {{ type: 'gaussian' }} }}")
    _, converted = build("InnerProduct", params, [shape])
    module = converted.module
    axis = axis % len(shape)
    inputs = int(np.prod(shape[axis:]))
    assert tuple(module.weight.shape) == ((inputs, 5) if transpose else (5, inputs))
    x = RNG.standard_normal(shape).astype(np.float32)
    weight = module.weight.detach().numpy().astype(np.float64)
    weight = weight if transpose else weight.T
    ref = x.reshape(int(np.prod(shape[:axis])), inputs) @ weight
    if bias:
        ref += module.bias.detach().numpy()
    ref = ref.reshape(shape[:axis] + (5,))
    top_diff = RNG.standard_normal(ref.shape).astype(np.float32)
    (top,), (grad,), params_grad = forward_backward(module, [x], [top_diff])
    assert converted.top_shapes[0] == ref.shape
    assert_rel(top, ref)
    flat_diff = top_diff.reshape(-1, 5).astype(np.float64)
    assert_rel(grad, (flat_diff @ weight.T).reshape(shape))
    weight_grad = x.reshape(-1, inputs).T.astype(np.float64) @ flat_diff  # (K, N)
    assert_rel(params_grad[0], weight_grad if transpose else weight_grad.T)
    if bias:
        assert_rel(params_grad[1], flat_diff.sum(0))


def test_embed():
    params = ("embed_param { input_dim: 7 num_output: 3 weight_filler { type: 'gaussian' } "
              "bias_filler { type: 'gaussian' } }")
    _, converted = build("Embed", params, [(2, 4)])
    module = converted.module
    x = np.array([[0, 6, 2.7, 2], [3, 0, 6, 5]], np.float32)  # 2.7 truncates to 2, as static_cast does
    index = x.astype(np.int64)
    weight, bias = module.weight.detach().numpy(), module.bias.detach().numpy()
    top_diff = RNG.standard_normal((2, 4, 3)).astype(np.float32)
    (top,), (grad,), (weight_grad, bias_grad) = forward_backward(module, [x], [top_diff])
    assert converted.top_shapes[0] == (2, 4, 3)
    assert_rel(top, weight[index] + bias)
    assert grad is None  # the indices get no gradient
    ref_weight_grad = np.zeros((7, 3))
    np.add.at(ref_weight_grad, index.ravel(), top_diff.reshape(-1, 3))
    assert_rel(weight_grad, ref_weight_grad)
    assert_rel(bias_grad, top_diff.reshape(-1, 3).sum(0))


def test_fillers_shape_the_blobs_as_caffe():
    _, converted = build("Embed", "embed_param { input_dim: 7 num_output: 3 bias_term: false }", [(5,)])
    assert converted.module.blob_names == ("weight",) and tuple(converted.module.weight.shape) == (7, 3)
    params = "inner_product_param { num_output: 4 weight_filler { type: 'gaussian' sparse: 2 } }"
    _, converted = build("InnerProduct", params, [(3, 8)])
    assert (converted.module.weight != 0).sum() < 32  # sparse: about half the weights stay
    with pytest.raises(CaffeCompatError, match="sparsity"):
        build("InnerProduct", "inner_product_param { num_output: 4 weight_filler { type: 'xavier' sparse: 2 } }",
              [(3, 8)])


# ---------------------------------------------------------------- Crop

@pytest.mark.parametrize("data,reference,axis,offsets", [
    ((2, 3, 9, 9), (2, 3, 5, 6), 2, [1, 2]),
    ((2, 3, 9, 9), (7, 2, 5, 6), 1, [1]),
    ((2, 3, 9, 9), (2, 3, 5, 6), -2, []),
    ((5, 3, 4), (3, 1, 2), 0, [1, 2, 2]),
])
def test_crop(data, reference, axis, offsets):
    params = f"crop_param {{ axis: {axis} " + " ".join(f"offset: {o}" for o in offsets) + " }"
    _, converted = build("Crop", params, [data, reference])
    start = axis % len(data)
    per_axis = offsets if len(offsets) > 1 else (offsets or [0]) * (len(data) - start)
    window = tuple(slice(None) for _ in range(start)) + tuple(
        slice(o, o + s) for o, s in zip(per_axis, reference[start:]))
    x = RNG.standard_normal(data).astype(np.float32)
    ref = x[window]
    top_diff = RNG.standard_normal(ref.shape).astype(np.float32)
    (top,), (grad, reference_grad), _ = forward_backward(
        converted.module, [x, np.zeros(reference, np.float32)], [top_diff])
    assert converted.top_shapes[0] == ref.shape
    np.testing.assert_array_equal(top, ref)
    expected = np.zeros(data, np.float32)
    expected[window] = top_diff
    np.testing.assert_array_equal(grad, expected)
    assert reference_grad is None


def test_crop_errors():
    with pytest.raises(CaffeCompatError, match="out of bounds"):
        build("Crop", "crop_param { axis: 2 offset: 5 }", [(1, 1, 8, 8), (1, 1, 4, 4)])
    with pytest.raises(CaffeCompatError, match="one per cropped axis"):
        build("Crop", "crop_param { axis: 1 offset: 1 offset: 1 }", [(1, 2, 8, 8), (1, 1, 4, 4)])
    with pytest.raises(CaffeCompatError, match="axis"):
        build("Crop", "crop_param { axis: 4 }", [(1, 2, 8, 8), (1, 1, 4, 4)])


# ---------------------------------------------------------------- tracing

@pytest.mark.parametrize("layer_type,params,shapes", [
    ("Pooling", pooling_params("MAX", (3, 3), (2, 2), (2, 2)), [(1, 2, 7, 7)]),
    ("Pooling", pooling_params("AVE", (3, 3), (2, 2), (2, 2)), [(1, 2, 7, 7)]),
    ("Convolution", "convolution_param { num_output: 2 kernel_size: 3 }", [(1, 2, 7, 7)]),
    ("LRN", "lrn_param { local_size: 3 }", [(1, 2, 7, 7)]),
    ("LRN", "lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL }", [(1, 2, 7, 7)]),
    ("InnerProduct", "inner_product_param { num_output: 2 axis: 2 }", [(1, 2, 7, 7)]),
    ("Crop", "crop_param { axis: 0 offset: 1 }", [(3, 2, 7, 7), (2, 1, 5, 5)]),
])
def test_modules_trace_with_fx(layer_type, params, shapes):
    _, converted = build(layer_type, params, shapes)

    class Net(torch.nn.Module):  # as a net calls its layers: one positional tensor per bottom
        def __init__(self):
            super().__init__()
            self.layer = converted.module

        def forward(self, a, b=None):
            return self.layer(a) if b is None else self.layer(a, b)

    traced = torch.fx.symbolic_trace(Net(), concrete_args={"b": None} if len(shapes) == 1 else None)
    arrays = [torch.randn(s) for s in shapes]
    torch.testing.assert_close(traced(*arrays), converted.module(*arrays))


# ---------------------------------------------------------------- ONNX

def export_and_compare(layer_type, params, shapes, make_inputs=None, tops=1, opset=17):
    """Export one layer through a graph whose batch axes are symbolic, one name a bottom
    (a Crop of the batch axis reads two batch sizes), check it, and run it in
    onnxruntime at batch 1 and 5 against the module."""
    ctx, converted = build(layer_type, params, shapes, tops=tops)
    model = onnx_model(layer_type, ctx, converted, opset,
                       input_dims=[[f"batch{i}", *s[1:]] for i, s in enumerate(shapes)],
                       output_dims=[[f"top_batch{i}", *s[1:]] for i, s in enumerate(converted.top_shapes)])
    for batch in (1, 5):
        arrays = (make_inputs(batch) if make_inputs else
                  [RNG.standard_normal((batch, *s[1:])).astype(np.float32) for s in shapes])
        for theirs, ours in onnx_and_module_tops(model, converted.module, arrays):
            assert_rel(theirs, ours, 1e-5)


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("shape,kernel,stride,pad", [
    ((2, 3, 10, 11), (3, 3), (2, 2), (0, 0)),
    ((2, 3, 10, 10), (3, 3), (2, 2), (1, 1)),
    ((1, 2, 4, 4), (2, 2), (3, 3), (1, 1)),
    ((2, 2, 9, 8), (3, 3), (2, 2), (2, 2)),
    ((2, 2, 6, 9), (2, 3), (1, 2), (1, 0)),
    ((2, 2, 4, 5), (1, 1), (2, 2), (0, 0)),  # an empty last window: explicit Pad node
    ((2, 2, 5, 6), (5, 6), (1, 1), (0, 0)),
])
def test_pooling_onnx(method, shape, kernel, stride, pad, opset):
    export_and_compare("Pooling", pooling_params(method, kernel, stride, pad), [shape], opset=opset)


@pytest.mark.parametrize("shape,kernel,stride,pad", [
    ((2, 3, 10, 11), (3, 3), (2, 2), (0, 0)),
    ((2, 2, 9, 8), (3, 3), (2, 2), (2, 2)),
])
def test_pooling_mask_onnx(shape, kernel, stride, pad):
    export_and_compare("Pooling", pooling_params("MAX", kernel, stride, pad), [shape], tops=2)


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("shape,body,weight_shape", CONV_CASES)
def test_convolution_onnx(layer_type, shape, body, weight_shape):
    export_and_compare(layer_type, f"convolution_param {{ {random_filler(body)} }}", [shape])


@pytest.mark.parametrize("params", [
    "lrn_param { local_size: 5 alpha: 0.01 beta: 0.75 k: 2 }",
    "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL }",
])
def test_lrn_onnx(params):
    export_and_compare("LRN", params, [(2, 7, 5, 6)])


@pytest.mark.parametrize("shape,axis,transpose,bias", [
    ((4, 10), 1, False, True),
    ((2, 3, 4, 6), 1, True, False),
    ((2, 3, 4, 6), 2, False, True),
    ((2, 3, 4, 6), 3, True, True),
    ((2, 3, 4, 6), 2, True, False),
])
def test_inner_product_onnx(shape, axis, transpose, bias):
    params = (f"inner_product_param {{ num_output: 5 axis: {axis} transpose: {str(transpose).lower()} "
              f"bias_term: {str(bias).lower()} weight_filler {{ type: 'gaussian' }} "
              f"bias_filler {{ type: 'gaussian' }} }}")
    export_and_compare("InnerProduct", params, [shape])


def test_inner_product_axis_0_onnx():
    # Axis 0 folds the batch into the input vector, so only the built batch size runs.
    params = "inner_product_param { num_output: 3 axis: 0 weight_filler { type: 'gaussian' } }"
    ctx, converted = build("InnerProduct", params, [(2, 4)])
    model = onnx_model("InnerProduct", ctx, converted, 17, input_dims=[[2, 4]], output_dims=[[3]])
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    ((theirs, ours),) = onnx_and_module_tops(model, converted.module, [x])
    assert theirs.shape == (3,)
    assert_rel(theirs, ours)


@pytest.mark.parametrize("bias", ["true", "false"])
def test_embed_onnx(bias):
    params = f"embed_param {{ input_dim: 7 num_output: 3 bias_term: {bias} bias_filler {{ type: 'gaussian' }} " \
             f"weight_filler {{ type: 'gaussian' }} }}"
    export_and_compare("Embed", params, [(2, 4)],
                       make_inputs=lambda n: [RNG.integers(0, 7, (n, 4)).astype(np.float32) + 0.5])


@pytest.mark.parametrize("data,reference,axis,offsets", [
    ((2, 3, 9, 9), (2, 3, 5, 6), 2, [1, 2]),
    ((2, 3, 9, 9), (2, 2, 5, 6), 1, [1]),
])
def test_crop_onnx(data, reference, axis, offsets):
    params = f"crop_param {{ axis: {axis} " + " ".join(f"offset: {o}" for o in offsets) + " }"
    export_and_compare("Crop", params, [data, reference])


def test_crop_batch_axis_onnx():
    # Cropping the batch axis follows the reference's run-time batch size.
    params = "crop_param { axis: 0 offset: 1 offset: 0 offset: 2 }"
    export_and_compare("Crop", params, [(4, 3, 7), (2, 3, 4)],
                       make_inputs=lambda n: [RNG.standard_normal((n + 2, 3, 7)).astype(np.float32),
                                              RNG.standard_normal((n, 3, 4)).astype(np.float32)])
