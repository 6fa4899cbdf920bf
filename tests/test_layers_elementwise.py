"""Element-wise layers (neuron layers and Eltwise): Caffe's formulas, forward and
backward, written out here element by element, and the ONNX emitters."""
import math

import numpy as np
import pytest
import torch

from caffe_compat.errors import CaffeCompatError
from layer_harness import CallWithList, build, onnx_and_module_tops, onnx_model

RNG = np.random.default_rng(0)


def run(converted, *arrays, grad_seed=None):
    """Forward the module on float32 copies of `arrays`; with `grad_seed`, also backward
    and return the bottoms' gradients."""
    bottoms = [torch.tensor(np.asarray(a, np.float32), requires_grad=True) for a in arrays]
    top = converted.module(*bottoms)
    if grad_seed is None:
        return top.detach().numpy()
    top.backward(torch.tensor(np.asarray(grad_seed, np.float32)))
    grads = [b.grad.numpy() if b.grad is not None else np.zeros(b.shape, np.float32) for b in bottoms]
    return top.detach().numpy(), grads


def assert_close(ours, ref, tol=1e-6):
    ref = np.asarray(ref, np.float64)
    scale = max(np.abs(ref).max(), 1e-30)
    assert np.abs(np.asarray(ours, np.float64) - ref).max() / scale < tol


def randn(*shape, zeros=True):
    x = RNG.standard_normal(shape).astype(np.float32)
    if zeros:  # the corner where Caffe's backward rules pick a side
        x.flat[:: 7] = 0
    return x


def export_and_run(layer_type, params, shapes, opset=17):
    """Export one layer's emitter through a graph with a symbolic batch axis and compare
    onnxruntime with the module at batch sizes 1 and 5."""
    ctx, converted = build(layer_type, params, shapes)
    model = onnx_model(layer_type, ctx, converted, opset)
    for batch in (1, 5):
        for theirs, ours in onnx_and_module_tops(model, converted.module, [randn(batch, *s[1:]) for s in shapes]):
            assert_close(theirs, ours, 1e-5)


# ---------------------------------------------------------------- ReLU, PReLU, ELU

@pytest.mark.parametrize("slope", [0.0, 0.1, -0.3, 2.0])
def test_relu_matches_caffe_including_gradient_at_zero(slope):
    x, dy = randn(2, 3, 4, 5), randn(2, 3, 4, 5, zeros=False)
    _, layer = build("ReLU", f"relu_param {{ negative_slope: {slope} }}")
    y, (dx,) = run(layer, x, grad_seed=dy)
    assert_close(y, np.maximum(x, 0) + slope * np.minimum(x, 0))
    np.testing.assert_allclose(dx, dy * ((x > 0) + slope * (x <= 0)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 5), (2, 3, 4, 5), (1, 2, 2, 3, 2)])
@pytest.mark.parametrize("shared", [False, True])
def test_prelu_per_channel_or_shared(shape, shared):
    x, dy = randn(*shape), randn(*shape, zeros=False)
    _, layer = build("PReLU", f"prelu_param {{ channel_shared: {str(shared).lower()} "
                              f"filler {{ type: 'uniform' min: -1 max: 1 }} }}", [shape])
    slope_blob = layer.module.slope
    assert tuple(slope_blob.shape) == (() if shared else (shape[1],))
    y, (dx,) = run(layer, x, grad_seed=dy)
    slope = slope_blob.detach().numpy()
    expected_y, expected_dx = np.empty_like(x), np.empty_like(x)
    expected_dslope = np.zeros(1 if shared else shape[1], np.float64)
    for index in np.ndindex(*shape):
        c = 0 if shared else index[1]
        v = x[index]
        expected_y[index] = max(v, 0) + slope.reshape(-1)[c] * min(v, 0)
        expected_dx[index] = dy[index] * ((v > 0) + slope.reshape(-1)[c] * (v <= 0))
        expected_dslope[c] += dy[index] * v * (v <= 0)
    assert_close(y, expected_y)
    assert_close(dx, expected_dx)
    assert_close(slope_blob.grad.numpy().reshape(-1), expected_dslope, 1e-5)


def test_prelu_default_filler_and_rank_check():
    _, layer = build("PReLU", "", [(2, 4, 3)])
    assert torch.equal(layer.module.slope.detach(), torch.full((4,), 0.25))
    assert layer.module.blob_names == ("slope",)
    with pytest.raises(CaffeCompatError, match="rank >= 2"):
        build("PReLU", "", [(6,)])


@pytest.mark.parametrize("alpha", [1.0, 0.7, 2.5])
def test_elu(alpha):
    x, dy = randn(3, 4, 5) * 3, randn(3, 4, 5, zeros=False)
    _, layer = build("ELU", f"elu_param {{ alpha: {alpha} }}", [x.shape])
    y, (dx,) = run(layer, x, grad_seed=dy)
    x64 = x.astype(np.float64)
    top = np.maximum(x64, 0) + alpha * (np.exp(np.minimum(x64, 0)) - 1)
    assert_close(y, top)
    assert_close(dx, dy * ((x > 0) + (alpha + top) * (x <= 0)))


# ---------------------------------------------------------------- fixed functions

def test_sigmoid_tanh_absval():
    x, dy = randn(2, 3, 4) * 4, randn(2, 3, 4, zeros=False)
    x64 = x.astype(np.float64)
    sig = 0.5 * np.tanh(0.5 * x64) + 0.5
    for layer_type, top, slope in [("Sigmoid", sig, sig * (1 - sig)),
                                   ("TanH", np.tanh(x64), 1 - np.tanh(x64) ** 2),
                                   ("AbsVal", np.abs(x64), np.sign(x64))]:
        _, layer = build(layer_type, shapes=[x.shape])
        y, (dx,) = run(layer, x, grad_seed=dy)
        assert_close(y, top)
        assert_close(dx, dy * slope)


def test_bnll_is_stable_at_extremes():
    x = np.array([-200, -80, -30, -1, -1e-4, 0, 1e-4, 1, 30, 49, 51, 80, 200], np.float32)
    dy = np.ones_like(x)
    _, layer = build("BNLL", shapes=[x.shape])
    y, (dx,) = run(layer, x, grad_seed=dy)
    x64 = x.astype(np.float64)
    top = np.where(x64 > 0, x64 + np.log1p(np.exp(-x64)), np.log1p(np.exp(x64)))
    np.testing.assert_allclose(y, top, rtol=1e-6, atol=1e-30)
    expval = np.exp(np.minimum(x64, 50))
    np.testing.assert_allclose(dx, expval / (expval + 1), rtol=1e-6, atol=1e-30)


# ---------------------------------------------------------------- Power, Exp, Log

@pytest.mark.parametrize("power,scale,shift", [
    (2, 0.5, 1), (3, -1.5, 0.25), (0.5, 2, 10), (-1, 1, 5), (1, 3, -2), (1, 1, 0), (2.5, 1, 0),
])
def test_power(power, scale, shift):
    x, dy = RNG.uniform(0.1, 2, (2, 3, 4)).astype(np.float32), randn(2, 3, 4, zeros=False)
    _, layer = build("Power", f"power_param {{ power: {power} scale: {scale} shift: {shift} }}", [x.shape])
    y, (dx,) = run(layer, x, grad_seed=dy)
    base = shift + scale * x.astype(np.float64)
    assert_close(y, base ** power)
    assert_close(dx, dy * power * scale * base ** (power - 1), 1e-5)


@pytest.mark.parametrize("power,scale,shift,value", [(0, 2, 3, 1.0), (2, 0, 3, 9.0), (0.5, 0, -1, math.nan)])
def test_power_constant_when_power_or_scale_is_zero(power, scale, shift, value):
    x = np.array([[-np.inf, 0, 2, np.nan]], np.float32)
    _, layer = build("Power", f"power_param {{ power: {power} scale: {scale} shift: {shift} }}", [x.shape])
    y = run(layer, x)
    np.testing.assert_array_equal(y, np.full(x.shape, value, np.float32))


@pytest.mark.parametrize("base,scale,shift", [(-1, 1, 0), (-1, 0.5, 0.3), (2, 0.5, 0.1), (10, -1, 2), (0.5, 1, 0)])
def test_exp(base, scale, shift):
    x, dy = randn(2, 3, 4), randn(2, 3, 4, zeros=False)
    _, layer = build("Exp", f"exp_param {{ base: {base} scale: {scale} shift: {shift} }}", [x.shape])
    y, (dx,) = run(layer, x, grad_seed=dy)
    ln_base = 1.0 if base == -1 else math.log(base)
    top = np.exp(ln_base * (shift + scale * x.astype(np.float64)))
    assert_close(y, top)
    assert_close(dx, dy * top * ln_base * scale)


@pytest.mark.parametrize("base,scale,shift", [(-1, 1, 0), (10, 2, 1), (2, -1, 3), (0.5, 1, 0)])
def test_log(base, scale, shift):
    x, dy = RNG.uniform(0.1, 2, (2, 3, 4)).astype(np.float32), randn(2, 3, 4, zeros=False)
    _, layer = build("Log", f"log_param {{ base: {base} scale: {scale} shift: {shift} }}", [x.shape])
    y, (dx,) = run(layer, x, grad_seed=dy)
    ln_base = 1.0 if base == -1 else math.log(base)
    inner = shift + scale * x.astype(np.float64)
    assert_close(y, np.log(inner) / ln_base)
    assert_close(dx, dy * scale / (inner * ln_base))


@pytest.mark.parametrize("layer_type", ["Exp", "Log"])
@pytest.mark.parametrize("base", [0, -2])
def test_exp_log_refuse_bad_bases(layer_type, base):
    with pytest.raises(CaffeCompatError, match="strictly positive"):
        build(layer_type, f"{layer_type.lower()}_param {{ base: {base} }}")


def test_log_refuses_base_one():
    with pytest.raises(CaffeCompatError, match="base 1"):
        build("Log", "log_param { base: 1 }")


# ---------------------------------------------------------------- Threshold, Dropout

def test_threshold_is_strict_and_has_no_gradient():
    x = np.array([[-1, 0.2, 0.2000001, 5, 0.1999999]], np.float32)
    _, layer = build("Threshold", "threshold_param { threshold: 0.2 }", [x.shape])
    top = layer.module(torch.tensor(x, requires_grad=True))
    np.testing.assert_array_equal(top.numpy(), (x > np.float32(0.2)).astype(np.float32))
    assert not top.requires_grad


@pytest.mark.parametrize("layer_type,params,phase", [
    ("Dropout", "dropout_param { dropout_ratio: 0.3 }", "TEST"),
    ("Dropout", "dropout_param { dropout_ratio: 0 }", "TRAIN"),
    ("Power", "", "TEST"),
])
def test_identities_give_a_distinct_top(layer_type, params, phase):
    """The top is a tensor of its own, so that its gradient is told apart from the bottom's."""
    x = randn(2, 3, 4)
    _, layer = build(layer_type, params, [x.shape], phase=phase)
    bottom = torch.tensor(x, requires_grad=True)
    top = layer.module(bottom)
    assert top is not bottom
    np.testing.assert_array_equal(top.detach().numpy(), x)


@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_dropout_train_phase_scales_kept_values(ratio):
    x = RNG.uniform(1, 2, (64, 100)).astype(np.float32)
    _, layer = build("Dropout", f"dropout_param {{ dropout_ratio: {ratio} }}", [x.shape], phase="TRAIN")
    y, (dx,) = run(layer, x, grad_seed=np.ones_like(x))
    kept = y != 0
    assert_close(y[kept], x[kept] / (1 - ratio))
    assert_close(dx, kept / (1 - ratio))
    assert abs(1 - kept.mean() - ratio) < 0.03


@pytest.mark.parametrize("ratio", [1.0, -0.1])
def test_dropout_refuses_ratios_outside_0_1(ratio):
    with pytest.raises(CaffeCompatError, match="dropout_ratio"):
        build("Dropout", f"dropout_param {{ dropout_ratio: {ratio} }}")


# ---------------------------------------------------------------- Eltwise

def caffe_eltwise_max(bottoms):
    """Caffe's CPU loop: bottom 1 beats bottom 0 unless 0 is strictly greater, each later
    bottom must be strictly greater than the running maximum. Returns (top, mask)."""
    top = np.empty_like(bottoms[0])
    mask = np.empty(top.shape, np.int64)
    for index in np.ndindex(*top.shape):
        a, b = bottoms[0][index], bottoms[1][index]
        top[index], mask[index] = (a, 0) if a > b else (b, 1)
        for k in range(2, len(bottoms)):
            if bottoms[k][index] > top[index]:
                top[index], mask[index] = bottoms[k][index], k
    return top, mask


def test_eltwise_max_routes_gradient_as_caffe_on_ties():
    # small integers give many ties between the three bottoms
    bottoms = [RNG.integers(-2, 3, (4, 3, 5)).astype(np.float32) for _ in range(3)]
    dy = randn(4, 3, 5, zeros=False)
    _, layer = build("Eltwise", "eltwise_param { operation: MAX }", [b.shape for b in bottoms])
    y, grads = run(layer, *bottoms, grad_seed=dy)
    top, mask = caffe_eltwise_max(bottoms)
    np.testing.assert_array_equal(y, top)
    for k, grad in enumerate(grads):
        np.testing.assert_array_equal(grad, np.where(mask == k, dy, 0))


def test_eltwise_sum_with_coefficients_and_prod():
    bottoms = [randn(2, 3, 4) for _ in range(3)]
    dy = randn(2, 3, 4, zeros=False)
    coeffs = [0.5, -2, 1]
    _, layer = build("Eltwise", "eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1 }",
                     [b.shape for b in bottoms])
    y, grads = run(layer, *bottoms, grad_seed=dy)
    assert_close(y, sum(c * b.astype(np.float64) for c, b in zip(coeffs, bottoms)))
    for c, grad in zip(coeffs, grads):
        assert_close(grad, c * dy)

    _, layer = build("Eltwise", "eltwise_param { operation: SUM }", [b.shape for b in bottoms])
    assert_close(run(layer, *bottoms), sum(b.astype(np.float64) for b in bottoms))

    _, layer = build("Eltwise", "eltwise_param { operation: PROD }", [b.shape for b in bottoms])
    y, grads = run(layer, *bottoms, grad_seed=dy)
    assert_close(y, np.prod(np.stack(bottoms).astype(np.float64), axis=0))
    for k, grad in enumerate(grads):
        others = [b for j, b in enumerate(bottoms) if j != k]
        assert_close(grad, dy * others[0] * others[1])


def test_eltwise_prod_without_stable_grad_divides_the_top_as_caffe():
    bottoms = [randn(2, 3, 4, zeros=False) for _ in range(3)]
    bottoms[1][0, 0, 0] = 0  # there Caffe's top / bottom is 0 / 0
    dy = randn(2, 3, 4, zeros=False)
    _, layer = build("Eltwise", "eltwise_param { operation: PROD stable_prod_grad: false }",
                     [b.shape for b in bottoms])
    y, grads = run(layer, *bottoms, grad_seed=dy)
    top = np.prod(np.stack(bottoms), axis=0)
    np.testing.assert_array_equal(y, top)
    for bottom, grad in zip(bottoms, grads):
        with np.errstate(invalid="ignore", divide="ignore"):
            expected = dy * (top / bottom)
        np.testing.assert_array_equal(np.isnan(grad), np.isnan(expected))
        finite = ~np.isnan(expected)
        assert_close(grad[finite], expected[finite])
    assert np.isnan(grads[1][0, 0, 0]) and not np.isnan(grads[0][0, 0, 0])


@pytest.mark.parametrize("params,shapes,message", [
    ("", [(2, 3)], "at least 2 bottoms"),
    ("", [(2, 3), (2, 4)], "same shape"),
    ("eltwise_param { coeff: 1 }", [(2, 3), (2, 3)], "one coefficient per bottom"),
    ("eltwise_param { operation: PROD coeff: 1 coeff: 2 }", [(2, 3), (2, 3)], "only for SUM"),
])
def test_eltwise_refuses_bad_configurations(params, shapes, message):
    with pytest.raises(CaffeCompatError, match=message):
        build("Eltwise", params, shapes)


# ---------------------------------------------------------------- tracing and ONNX

TRACED = [
    ("ReLU", "relu_param { negative_slope: 0.1 }", [(2, 3, 4)]),
    ("ReLU", "", [(2, 3, 4)]),
    ("PReLU", "", [(2, 3, 4)]),
    ("PReLU", "prelu_param { channel_shared: true }", [(2, 3, 4)]),
    ("ELU", "elu_param { alpha: 0.7 }", [(2, 3, 4)]),
    ("Sigmoid", "", [(2, 3, 4)]),
    ("TanH", "", [(2, 3, 4)]),
    ("AbsVal", "", [(2, 3, 4)]),
    ("BNLL", "", [(2, 3, 4)]),
    ("Power", "power_param { power: 2 scale: 0.5 shift: 1 }", [(2, 3, 4)]),
    ("Power", "power_param { power: 3 scale: -1.5 }", [(2, 3, 4)]),
    ("Power", "power_param { power: 1 scale: 2 shift: -1 }", [(2, 3, 4)]),
    ("Power", "power_param { power: 0 }", [(2, 3, 4)]),
    ("Power", "power_param { power: 2 scale: 0 shift: 3 }", [(2, 3, 4)]),
    ("Exp", "exp_param { base: 2 scale: 0.5 shift: 0.1 }", [(2, 3, 4)]),
    ("Exp", "", [(2, 3, 4)]),
    ("Log", "log_param { base: 10 scale: 2 shift: 10 }", [(2, 3, 4)]),
    ("Threshold", "threshold_param { threshold: 0.2 }", [(2, 3, 4)]),
    ("Dropout", "", [(2, 3, 4)]),
    ("Eltwise", "eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1 }", [(2, 3, 4)] * 3),
    ("Eltwise", "eltwise_param { operation: PROD }", [(2, 3, 4)] * 3),
    ("Eltwise", "eltwise_param { operation: MAX }", [(2, 3, 4)] * 3),
]


@pytest.mark.parametrize("layer_type,params,shapes", TRACED)
def test_fx_trace_matches_eager(layer_type, params, shapes):
    _, layer = build(layer_type, params, shapes)
    traced = torch.fx.symbolic_trace(CallWithList(layer.module, len(shapes)))
    arrays = [torch.tensor(randn(*s)) for s in shapes]
    torch.testing.assert_close(traced(arrays), layer.module(*arrays), equal_nan=True)


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("layer_type,params,shapes", TRACED)
def test_onnx_emitter_matches_module(layer_type, params, shapes, opset):
    if layer_type == "Log":  # keep the argument of the logarithm positive
        params = "log_param { base: 10 scale: 0.5 shift: 10 }"
    export_and_run(layer_type, params, shapes, opset=opset)


def test_onnx_prelu_per_channel_on_rank_2():
    export_and_run("PReLU", "prelu_param { filler { type: 'uniform' min: 0 max: 1 } }", [(2, 6)])
