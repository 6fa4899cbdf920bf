"""BatchNorm, Scale, Bias, MVN, Softmax and Reduction against references written here
from Caffe's layer sources (loops over Caffe's outer/channel/inner indexing, Caffe's own
backward formulas), and their ONNX emitters run in onnxruntime."""
import numpy as np
import pytest
import torch

from caffe_compat.errors import CaffeCompatError
from layer_harness import build, onnx_and_module_tops, onnx_model, rel_err

RNG = np.random.default_rng(7)


def normal(*shape):
    return np.asarray(RNG.standard_normal(shape), np.float32)


def forward_backward(module, arrays, top_diff=None):
    """Top and bottom gradients (None where none flows) for float32 inputs."""
    bottoms = [torch.tensor(a, requires_grad=True) for a in arrays]
    top = module(*bottoms)
    seed = torch.tensor(normal(*top.shape) if top_diff is None else top_diff)
    top.backward(seed)
    return top.detach().numpy(), seed.numpy(), [None if b.grad is None else b.grad.numpy() for b in bottoms]


# ---------------------------------------------------------------- BatchNorm

def set_stats(module, mean, variance, factor):
    module.mean.copy_(torch.tensor(mean))
    module.variance.copy_(torch.tensor(variance))
    module.scale_factor.fill_(factor)


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 5), (2, 3, 4, 5), (1, 3, 2, 2, 2)])
@pytest.mark.parametrize("factor", [1.0, 2.5, 0.0])
def test_batch_norm_stored_statistics(shape, factor):
    bn = build("BatchNorm", "batch_norm_param { eps: 0.001 }", [shape])[1].module
    c = shape[1]
    mean, variance = normal(c), np.abs(normal(c)) + 0.1
    set_stats(bn, mean, variance, factor)
    x = normal(*shape)
    y, dy, (dx,) = forward_backward(bn, [x])
    scale = 0.0 if factor == 0 else np.float32(1) / np.float32(factor)
    view = (c,) + (1,) * (len(shape) - 2)
    std = np.sqrt(variance * np.float32(scale) + np.float32(0.001)).reshape(view)
    assert rel_err(y, (x - (mean * np.float32(scale)).reshape(view)) / std) < 1e-6
    assert rel_err(dx, dy / std) < 1e-6
    assert all(b.grad is None for b in bn.caffe_blobs())
    assert bn.scale_factor.item() == factor  # TEST leaves the statistics alone


def test_batch_norm_training_uses_batch_statistics_and_updates_caffes_sums():
    shape = (4, 3, 2, 5)
    bn = build("BatchNorm", "batch_norm_param { eps: 0.01 moving_average_fraction: 0.9 }",
               [shape], phase="TRAIN")[1].module
    old_mean, old_var = normal(3), np.abs(normal(3))
    set_stats(bn, old_mean, old_var, 2.0)
    x = normal(*shape) * 3 + 1
    y, dy, (dx,) = forward_backward(bn, [x])
    xd = x.astype(np.float64)
    m = x.size // 3
    batch_mean = xd.mean(axis=(0, 2, 3))
    batch_var = ((xd - batch_mean.reshape(3, 1, 1)) ** 2).mean(axis=(0, 2, 3))
    std = np.sqrt(batch_var + 0.01).reshape(3, 1, 1)
    expected = (xd - batch_mean.reshape(3, 1, 1)) / std
    assert rel_err(y, expected) < 1e-5
    # Caffe's backward: (dy - mean(dy) - mean(dy * y) * y) / std, means over all but axis 1
    mean_dy = dy.mean(axis=(0, 2, 3), keepdims=True)
    mean_dy_y = (dy * expected).mean(axis=(0, 2, 3), keepdims=True)
    assert rel_err(dx, (dy - mean_dy - mean_dy_y * expected) / std) < 1e-5
    assert bn.scale_factor.item() == pytest.approx(2.0 * 0.9 + 1)
    assert rel_err(bn.mean.numpy(), 0.9 * old_mean + batch_mean) < 1e-6
    assert rel_err(bn.variance.numpy(), 0.9 * old_var + batch_var * m / (m - 1)) < 1e-6


def test_batch_norm_one_value_per_channel_keeps_statistics_finite():
    bn = build("BatchNorm", "", [(1, 4)], phase="TRAIN")[1].module
    set_stats(bn, np.ones(4, np.float32), np.ones(4, np.float32), 1.0)
    y = bn(torch.tensor(normal(1, 4)))
    assert torch.all(y == 0)
    assert torch.all(torch.isfinite(bn.variance)) and rel_err(bn.variance.numpy(), np.full(4, 0.999)) < 1e-7


@pytest.mark.parametrize("phase,flag,uses_stored", [("TEST", "", True), ("TRAIN", "", False),
                                                    ("TEST", "use_global_stats: false", False),
                                                    ("TRAIN", "use_global_stats: true", True)])
def test_batch_norm_use_global_stats_follows_phase_unless_set(phase, flag, uses_stored):
    bn = build("BatchNorm", f"batch_norm_param {{ {flag} }}", phase=phase)[1].module
    assert bn.uses_global_stats() == uses_stored
    if not flag:  # unset: the module's own train/eval switch decides
        bn.train(not bn.training)
        assert bn.uses_global_stats() != uses_stored


def test_batch_norm_traces_with_fx_in_both_phases():
    for phase in ("TEST", "TRAIN"):
        bn = build("BatchNorm", "", [(2, 3, 4)], phase=phase)[1].module
        twin = build("BatchNorm", "", [(2, 3, 4)], phase=phase)[1].module
        for module in (bn, twin):
            set_stats(module, np.ones(3, np.float32), np.full(3, 2.0, np.float32), 1.0)
        traced = torch.fx.symbolic_trace(bn)
        x = torch.tensor(normal(5, 3, 4))
        assert torch.equal(traced(x), twin(x))
        assert all(torch.equal(a, b) for a, b in zip(bn.caffe_blobs(), twin.caffe_blobs()))


def test_batch_norm_blobs_and_errors():
    bn = build("BatchNorm")[1].module
    assert [tuple(b.shape) for b in bn.caffe_blobs()] == [(3,), (3,), (1,)]
    assert not list(bn.parameters())
    with pytest.raises(CaffeCompatError, match="lr_mult"):
        build("BatchNorm", "param { lr_mult: 1 }")
    with pytest.raises(CaffeCompatError, match="rank"):
        build("BatchNorm", "", [(5,)])


# ---------------------------------------------------------------- Scale and Bias

def caffe_broadcast_loop(x, operand, axis, op):
    """Caffe's Scale/Bias loop: for n < outer, d < operand count, inner elements."""
    outer = int(np.prod(x.shape[:axis]))
    count = operand.size
    inner = x.size // (outer * count)
    flat_x, flat_op = x.reshape(outer, count, inner), operand.reshape(-1)
    out = np.empty_like(flat_x)
    for n in range(outer):
        for d in range(count):
            out[n, d] = op(flat_x[n, d], flat_op[d])
    return out.reshape(x.shape)


LEARNED_LAYOUTS = [  # (params, shape, axis Caffe lines the blob up at, blob shape)
    ("", (2, 3, 4, 5), 1, (3,)),
    ("axis: 1 num_axes: 2", (2, 3, 4, 5), 1, (3, 4)),
    ("axis: -1", (2, 3, 4, 5), 3, (5,)),
    ("axis: 2 num_axes: -1", (2, 3, 4, 5), 2, (4, 5)),
    ("num_axes: 0", (2, 3, 4, 5), 0, ()),
    ("axis: 0 num_axes: 2", (2, 3, 4), 0, (2, 3)),
    ("", (6, 7), 1, (7,)),
]


@pytest.mark.parametrize("params,shape,axis,blob_shape", LEARNED_LAYOUTS)
def test_scale_learned_with_bias(params, shape, axis, blob_shape):
    layer = build("Scale", f"scale_param {{ {params} bias_term: true "
                           f"filler {{ type: 'uniform' min: -2 max: 2 }} "
                           f"bias_filler {{ type: 'gaussian' }} }}", [shape])[1].module
    assert layer.blob_names == ("weight", "bias")
    assert tuple(layer.weight.shape) == blob_shape and tuple(layer.bias.shape) == blob_shape
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    x = normal(*shape)
    y, dy, (dx,) = forward_backward(layer, [x])
    assert rel_err(y, caffe_broadcast_loop(caffe_broadcast_loop(x, w, axis, np.multiply), b, axis, np.add)) < 1e-6
    assert rel_err(dx, caffe_broadcast_loop(dy, w, axis, np.multiply)) < 1e-6
    outer = int(np.prod(shape[:axis]))
    per_operand = lambda t: t.reshape(outer, w.size, -1).sum(axis=(0, 2)).reshape(blob_shape)  # noqa: E731
    assert rel_err(layer.weight.grad.numpy(), per_operand(dy.astype(np.float64) * x)) < 1e-5
    assert rel_err(layer.bias.grad.numpy(), per_operand(dy.astype(np.float64))) < 1e-5


def test_scale_default_fillers_are_identity():
    layer = build("Scale", "scale_param { bias_term: true }")[1].module
    assert torch.all(layer.weight == 1) and torch.all(layer.bias == 0)
    layer = build("Bias")[1].module
    assert torch.all(layer.bias == 0)


@pytest.mark.parametrize("layer_type", ["Scale", "Bias"])
@pytest.mark.parametrize("params,shapes,axis", [
    ("axis: 1", [(2, 3, 4, 5), (3, 4)], 1),
    ("axis: 0", [(2, 3, 4, 5), (2, 3)], 0),
    ("axis: -2", [(2, 3, 4, 5), (4, 5)], 2),
    ("axis: 3", [(2, 3, 4, 5), ()], 0),  # a scalar: Caffe ignores axis
])
def test_scale_and_bias_from_a_second_bottom(layer_type, params, shapes, axis):
    field = "scale_param" if layer_type == "Scale" else "bias_param"
    layer = build(layer_type, f"{field} {{ {params} }}", shapes)[1].module
    assert layer.blob_names == ()
    x, operand = normal(*shapes[0]), normal(*shapes[1])
    y, dy, (dx, d_operand) = forward_backward(layer, [x, operand])
    op = np.multiply if layer_type == "Scale" else np.add
    assert rel_err(y, caffe_broadcast_loop(x, operand, axis, op)) < 1e-6
    outer = int(np.prod(shapes[0][:axis]))
    grad_terms = dy.astype(np.float64) * (x if layer_type == "Scale" else 1)
    expected = grad_terms.reshape(outer, operand.size, -1).sum(axis=(0, 2)).reshape(operand.shape)
    assert rel_err(d_operand, expected) < 1e-5
    expected_dx = caffe_broadcast_loop(dy, operand, axis, np.multiply) if layer_type == "Scale" else dy
    assert rel_err(dx, expected_dx) < 1e-6


def test_scale_with_second_bottom_and_bias_learns_only_the_bias():
    layer = build("Scale", "scale_param { axis: 1 bias_term: true bias_filler { type: 'constant' "
                           "value: 0.5 } }", [(2, 3, 4), (3,)])[1].module
    assert layer.blob_names == ("bias",) and tuple(layer.bias.shape) == (3,)
    x, s = normal(2, 3, 4), normal(3)
    assert rel_err(layer(torch.tensor(x), torch.tensor(s)).detach().numpy(), x * s[:, None] + 0.5) < 1e-6


@pytest.mark.parametrize("layer_type,params,shapes", [
    ("Scale", "scale_param { axis: 1 }", [(2, 3, 4), (4,)]),
    ("Bias", "bias_param { axis: 4 }", [(2, 3, 4, 5)]),
    ("Scale", "scale_param { axis: 2 num_axes: 3 }", [(2, 3, 4, 5)]),
    ("Bias", "bias_param { num_axes: -2 }", [(2, 3, 4, 5)]),
])
def test_scale_and_bias_reject_misaligned_operands(layer_type, params, shapes):
    with pytest.raises(CaffeCompatError, match="layer 'layer'"):
        build(layer_type, params, shapes)


# ---------------------------------------------------------------- MVN

def caffe_mvn(x, across_channels, normalize_variance, eps, top_diff):
    """Caffe's MVN forward and its backward formula on the 4-D view, in float64."""
    x4 = x.astype(np.float64).reshape(x.shape + (1,) * (4 - x.ndim))
    dy = top_diff.astype(np.float64)
    axes = (1, 2, 3) if across_channels else (2, 3)
    centered = x4 - x4.mean(axis=axes, keepdims=True)
    if not normalize_variance:
        return centered, dy - dy.mean(axis=axes, keepdims=True)
    std_eps = np.sqrt((centered ** 2).mean(axis=axes, keepdims=True)) + eps
    y = centered / std_eps
    dx = (dy - dy.mean(axis=axes, keepdims=True) - (dy * y).mean(axis=axes, keepdims=True) * y) / std_eps
    return y, dx


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 4), (3, 6)])
@pytest.mark.parametrize("across_channels", [False, True])
@pytest.mark.parametrize("normalize_variance", [True, False])
@pytest.mark.parametrize("eps", [1e-9, 0.5])  # a large eps tells Caffe's backward from the exact one
def test_mvn_forward_and_caffes_backward(shape, across_channels, normalize_variance, eps):
    params = (f"mvn_param {{ across_channels: {str(across_channels).lower()} "
              f"normalize_variance: {str(normalize_variance).lower()} eps: {eps} }}")
    layer = build("MVN", params, [shape])[1].module
    x = normal(*shape) * 2 + 1
    y, dy, (dx,) = forward_backward(layer, [x])
    assert y.shape == shape + (1,) * (4 - len(shape))  # Caffe's top is 4-D
    expected_y, expected_dx = caffe_mvn(x, across_channels, normalize_variance, np.float32(eps), dy)
    assert rel_err(y, expected_y) < 1e-5
    assert rel_err(dx, expected_dx.reshape(shape)) < 1e-5


def test_mvn_rejects_more_than_four_axes():
    with pytest.raises(CaffeCompatError, match="4 axes"):
        build("MVN", "", [(1, 2, 3, 4, 5)])


# ---------------------------------------------------------------- Softmax

@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -3])
def test_softmax_on_any_axis_with_caffes_backward(axis):
    shape = (2, 3, 4, 5)
    layer = build("Softmax", f"softmax_param {{ axis: {axis} }}", [shape])[1].module
    x = normal(*shape) * 10
    y, dy, (dx,) = forward_backward(layer, [x])
    xd = x.astype(np.float64)
    e = np.exp(xd - xd.max(axis=axis, keepdims=True))
    expected = e / e.sum(axis=axis, keepdims=True)
    assert rel_err(y, expected) < 1e-6
    # Caffe: (dy - sum(dy * y)) * y along the axis
    assert rel_err(dx, (dy - (dy * expected).sum(axis=axis, keepdims=True)) * expected) < 1e-5


def test_softmax_rejects_an_axis_out_of_range():
    with pytest.raises(CaffeCompatError, match="axis 4"):
        build("Softmax", "softmax_param { axis: 4 }")


# ---------------------------------------------------------------- Reduction

@pytest.mark.parametrize("operation", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis", [0, 1, 3, -2])
@pytest.mark.parametrize("coeff", [1.0, -0.5])
def test_reduction(operation, axis, coeff):
    shape = (2, 3, 4, 5)
    layer = build("Reduction", f"reduction_param {{ operation: {operation} axis: {axis} "
                               f"coeff: {coeff} }}", [shape])[1].module
    x = normal(*shape)
    x.flat[::9] = 0  # ASUM's gradient is sign(x): 0 at 0
    y, dy, (dx,) = forward_backward(layer, [x])
    start = axis % 4
    rows = x.astype(np.float64).reshape(int(np.prod(shape[:start])), -1)
    dim = rows.shape[1]
    values = {"SUM": rows.sum(1), "ASUM": np.abs(rows).sum(1), "SUMSQ": (rows ** 2).sum(1),
              "MEAN": rows.sum(1) / dim}[operation] * coeff
    assert y.shape == shape[:start]
    assert rel_err(y, values.reshape(shape[:start])) < 1e-6
    top = dy.astype(np.float64).reshape(-1, 1) * coeff
    grads = {"SUM": top * np.ones_like(rows), "ASUM": top * np.sign(rows), "SUMSQ": 2 * top * rows,
             "MEAN": top * np.ones_like(rows) / dim}[operation]
    assert rel_err(dx, grads.reshape(shape)) < 1e-6


# ---------------------------------------------------------------- ONNX

def export(layer_type, params, shapes, batched, opset, phase="TEST", prepare=None):
    """(module, model): the layer's emitter in a checked ONNX model whose inputs marked
    in `batched` have a symbolic first axis, the batch."""
    ctx, converted = build(layer_type, params, shapes, phase=phase)
    if prepare is not None:
        prepare(converted.module)
    input_dims = [["N", *shape[1:]] if flag else list(shape) for shape, flag in zip(shapes, batched)]
    return converted.module, onnx_model(layer_type, ctx, converted, opset, input_dims=input_dims)


def random_stats(module):
    with torch.no_grad():
        module.mean.copy_(torch.randn(module.mean.shape))
        module.variance.copy_(torch.rand(module.variance.shape) + 0.5)
        module.scale_factor.fill_(1.7)


ONNX_CASES = [  # (type, params, shapes, which inputs are batched, phase, prepare)
    ("BatchNorm", "batch_norm_param { eps: 0.001 }", [(2, 3, 4, 5)], [True], "TEST", random_stats),
    ("BatchNorm", "", [(2, 3)], [True], "TEST", random_stats),
    ("BatchNorm", "batch_norm_param { use_global_stats: false }", [(2, 3, 4, 5)], [True], "TEST", None),
    ("Scale", "scale_param { bias_term: true filler { type: 'gaussian' } bias_filler { type: 'gaussian' } }",
     [(2, 3, 4, 5)], [True], "TEST", None),
    ("Scale", "scale_param { axis: 2 num_axes: 2 filler { type: 'gaussian' } }", [(2, 3, 4, 5)], [True], "TEST", None),
    ("Scale", "scale_param { num_axes: 0 filler { type: 'gaussian' } }", [(2, 3)], [True], "TEST", None),
    ("Scale", "scale_param { axis: 1 }", [(2, 3, 4, 5), (3, 4)], [True, False], "TEST", None),
    ("Scale", "scale_param { axis: 0 }", [(2, 3, 4, 5), (2, 3)], [True, True], "TEST", None),
    ("Scale", "scale_param { bias_term: true bias_filler { type: 'gaussian' } }", [(2, 3, 4), (3,)],
     [True, False], "TEST", None),
    ("Bias", "bias_param { filler { type: 'gaussian' } }", [(2, 3, 4, 5)], [True], "TEST", None),
    ("Bias", "bias_param { axis: 2 }", [(2, 3, 4, 5), (4, 5)], [True, False], "TEST", None),
    ("Bias", "", [(2, 3, 4), ()], [True, False], "TEST", None),
    ("Softmax", "", [(2, 3, 4, 5)], [True], "TEST", None),
    ("Softmax", "softmax_param { axis: -2 }", [(2, 3, 4, 5)], [True], "TEST", None),
    ("Softmax", "softmax_param { axis: 0 }", [(2, 3)], [True], "TEST", None),
    ("MVN", "", [(2, 3, 4, 5)], [True], "TEST", None),
    ("MVN", "mvn_param { across_channels: true eps: 0.1 }", [(2, 3, 4)], [True], "TEST", None),
    ("MVN", "mvn_param { normalize_variance: false }", [(2, 6)], [True], "TEST", None),
] + [("Reduction", f"reduction_param {{ operation: {op} axis: {axis} coeff: {coeff} }}", [(2, 3, 4, 5)],
      [True], "TEST", None)
     for op in ("SUM", "ASUM", "SUMSQ", "MEAN") for axis, coeff in ((1, 1.0), (0, 2.5), (-1, -1.0))]


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("layer_type,params,shapes,batched,phase,prepare", ONNX_CASES)
def test_onnx_emitter_matches_module(layer_type, params, shapes, batched, phase, prepare, opset):
    module, model = export(layer_type, params, shapes, batched, opset, phase, prepare)
    for batch in (1, 5):
        arrays = [normal(*((batch, *s[1:]) if flag else s)) for s, flag in zip(shapes, batched)]
        ((theirs, ours),) = onnx_and_module_tops(model, module, arrays)
        assert rel_err(theirs, ours) < 1e-5


def test_onnx_batch_norm_is_caffes_sub_then_div():
    module, model = export("BatchNorm", "", [(2, 3, 4, 5)], [True], 17, prepare=random_stats)
    ((theirs, ours),) = onnx_and_module_tops(model, module, [normal(3, 3, 4, 5)])
    np.testing.assert_array_equal(theirs, ours)
