"""Data-moving layers (Concat, Slice, Split, Flatten, Reshape, Tile, Silence, ArgMax):
shapes and values against Caffe's rules written out here, gradients, a batch size other
than the one built for, and the ONNX emitters."""
import numpy as np
import pytest
import torch

from caffe_compat.errors import CaffeCompatError
from caffe_compat.layers.onnx_graph import OnnxGraph
from caffe_compat.layers.registry import REGISTRY
from layer_harness import CallWithList, build, onnx_and_module_tops, onnx_model, tops_of

RNG = np.random.default_rng(1)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def check_against(converted, reference, shapes, batch_sizes=(None, 5)):
    """Run the module on bottoms of `shapes` (and with the batch size replaced), compare
    every top with `reference(*arrays)` and its declared shape, and the bottoms'
    gradients with those of the reference run on float64 tensors (it is written to work
    on both)."""
    for batch in batch_sizes:
        arrays = [randn(*((batch,) + s[1:] if batch else s)) for s in shapes]
        bottoms = [torch.tensor(a, requires_grad=True) for a in arrays]
        ours = tops_of(converted.module, *bottoms)
        theirs = reference(*arrays)
        assert len(ours) == len(theirs)
        for index, (a, b) in enumerate(zip(ours, theirs)):
            np.testing.assert_array_equal(a.detach().numpy(), b)
            if batch is None:
                assert tuple(a.shape) == tuple(converted.top_shapes[index])
        seeds = [torch.tensor(randn(*t.shape)) for t in ours]
        torch.autograd.backward(list(ours), seeds)
        ref_bottoms = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
        torch.autograd.backward(list(reference(*ref_bottoms)), [s.double() for s in seeds])
        for ours_bottom, ref_bottom in zip(bottoms, ref_bottoms):
            np.testing.assert_allclose(ours_bottom.grad.numpy(), ref_bottom.grad.numpy(), rtol=1e-6, atol=1e-6)


def export_and_run(layer_type, params, shapes, tops=1, opset=17, arrays_of=randn):
    """Export one layer's emitter through a graph with a symbolic batch axis and compare
    onnxruntime with the module at batch sizes 1 and 5, on bottoms from `arrays_of`."""
    ctx, converted = build(layer_type, params, shapes, tops)
    model = onnx_model(layer_type, ctx, converted, opset)
    for batch in (1, 5):
        arrays = [arrays_of(batch, *s[1:]) for s in shapes]
        for theirs, ours in onnx_and_module_tops(model, converted.module, arrays):
            np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- Concat, Slice, Split

def cat(parts, axis):
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts, axis)
    return np.concatenate(parts, axis)


@pytest.mark.parametrize("params,shapes,axis", [
    ("", [(2, 3, 4), (2, 1, 4), (2, 5, 4)], 1),
    ("concat_param { axis: -1 }", [(2, 3, 4), (2, 3, 2)], 2),
    ("concat_param { axis: 0 }", [(2, 3), (1, 3)], 0),
    ("concat_param { concat_dim: 2 }", [(2, 3, 4, 1), (2, 3, 2, 1)], 2),
])
def test_concat(params, shapes, axis):
    _, layer = build("Concat", params, shapes)
    batch_sizes = (None, 5) if axis != 0 else (None,)
    check_against(layer, lambda *bottoms: (cat(list(bottoms), axis),), shapes, batch_sizes)


def test_concat_of_one_bottom_is_a_new_tensor():
    _, layer = build("Concat", "", [(2, 3)])
    x = torch.randn(2, 3)
    (top,) = tops_of(layer.module, x)
    assert top is not x and torch.equal(top, x)


@pytest.mark.parametrize("params,shapes,message", [
    ("concat_param { axis: 1 concat_dim: 1 }", [(2, 3), (2, 3)], "not both"),
    ("concat_param { axis: 3 }", [(2, 3), (2, 3)], "out of range"),
    ("concat_param { concat_dim: 2 }", [(2, 3), (2, 3)], "out of range"),
    ("", [(2, 3, 4), (2, 3, 5)], "does not match"),
    ("", [(2, 3, 4), (2, 3)], "does not match"),
])
def test_concat_refuses_bad_configurations(params, shapes, message):
    with pytest.raises(CaffeCompatError, match=message):
        build("Concat", params, shapes)


@pytest.mark.parametrize("params,shape,tops,bounds,axis", [
    ("slice_param { axis: 1 slice_point: 1 slice_point: 3 }", (2, 4, 3), 3, [0, 1, 3, 4], 1),
    ("", (2, 6, 3), 3, [0, 2, 4, 6], 1),
    ("slice_param { axis: -1 }", (2, 3, 4), 2, [0, 2, 4], 2),
    ("slice_param { slice_dim: 2 slice_point: 3 }", (2, 3, 5), 2, [0, 3, 5], 2),
    ("slice_param { axis: 1 slice_point: 1 slice_point: 4 }", (2, 4, 3), 3, [0, 1, 4, 4], 1),
    ("", (2, 4), 1, [0, 4], 1),
])
def test_slice(params, shape, tops, bounds, axis):
    _, layer = build("Slice", params, [shape], tops)

    def reference(x):
        index = [slice(None)] * len(shape)
        parts = []
        for start, end in zip(bounds, bounds[1:]):
            index[axis] = slice(start, end)
            parts.append(x[tuple(index)])
        return tuple(parts)

    check_against(layer, reference, [shape])


@pytest.mark.parametrize("params,tops,message", [
    ("slice_param { slice_point: 2 }", 3, "one fewer"),
    ("slice_param { slice_point: 2 slice_point: 2 }", 3, "increase strictly"),
    ("slice_param { slice_point: 5 }", 2, "increase strictly"),
    ("", 3, "evenly"),
    ("slice_param { axis: 1 slice_dim: 1 }", 2, "not both"),
])
def test_slice_refuses_bad_configurations(params, tops, message):
    with pytest.raises(CaffeCompatError, match=message):
        build("Slice", params, [(2, 4)], tops)


def test_split_tops_are_separate_tensors_and_gradients_sum():
    _, layer = build("Split", "", [(2, 3)], tops=3)
    check_against(layer, lambda x: (x, x, x), [(2, 3)])
    x = torch.randn(2, 3)
    tops = tops_of(layer.module, x)
    assert len({id(t) for t in tops} | {id(x)}) == 4


@pytest.mark.parametrize("layer_type", ["Split", "Flatten", "Reshape"])
def test_refuse_in_place(layer_type):
    params = "reshape_param { shape { dim: 0 dim: -1 } }" if layer_type == "Reshape" else ""
    with pytest.raises(CaffeCompatError, match="in-place"):
        build(layer_type, params, [(2, 3, 4)], top_names=["b0"])


# ---------------------------------------------------------------- Flatten, Reshape

@pytest.mark.parametrize("params,shape,top", [
    ("", (2, 3, 4, 5), (2, 60)),
    ("flatten_param { axis: 2 }", (2, 3, 4, 5), (2, 3, 20)),
    ("flatten_param { axis: 1 end_axis: 2 }", (2, 3, 4, 5), (2, 12, 5)),
    ("flatten_param { axis: 0 }", (2, 3, 4), (24,)),
    ("flatten_param { axis: 0 end_axis: 1 }", (2, 3, 4), (6, 4)),
    ("flatten_param { axis: -2 end_axis: -1 }", (2, 3, 4, 5), (2, 3, 20)),
    ("flatten_param { axis: 2 end_axis: 1 }", (2, 3, 4), (2, 3, 1, 4)),  # Caffe inserts a unit axis
])
def test_flatten(params, shape, top):
    _, layer = build("Flatten", params, [shape])
    assert tuple(layer.top_shapes[0]) == top
    # at another batch size, the top's axis 0 scales with it
    check_against(layer, lambda x: (x.reshape((-1,) + top[1:]),), [shape])


def test_flatten_refuses_end_before_axis():
    with pytest.raises(CaffeCompatError, match="comes before"):
        build("Flatten", "flatten_param { axis: 2 end_axis: 0 }", [(2, 3, 4)])


# (reshape_param, bottom shape, top shape at that batch, top shape when the batch is 5)
RESHAPES = [
    ("shape { dim: 0 dim: -1 dim: 2 }", (2, 4, 3, 2), (2, 12, 2), (5, 12, 2)),
    ("shape { dim: -1 dim: 6 }", (2, 4, 3), (4, 6), (10, 6)),
    ("shape { dim: 0 dim: 0 dim: -1 }", (2, 4, 3, 2), (2, 4, 6), (5, 4, 6)),
    ("shape { dim: 2 dim: 2 } axis: 1 num_axes: 1", (2, 4, 3), (2, 2, 2, 3), (5, 2, 2, 3)),
    ("shape { dim: -1 } axis: -3", (2, 3, 4, 5), (2, 3, 20), (5, 3, 20)),
    ("shape { dim: 1 } axis: 0 num_axes: 0", (2, 3), (1, 2, 3), (1, 5, 3)),
    ("shape { dim: 1 dim: 1 } axis: -1 num_axes: 0", (2, 3), (2, 3, 1, 1), (5, 3, 1, 1)),
    ("shape { dim: 0 dim: 3 dim: -1 } axis: 1", (2, 4, 6), (2, 4, 3, 2), (5, 4, 3, 2)),
    ("shape { dim: 24 }", (2, 3, 4), (24,), None),
]


@pytest.mark.parametrize("params,shape,top,top_at_5", RESHAPES)
def test_reshape(params, shape, top, top_at_5):
    _, layer = build("Reshape", f"reshape_param {{ {params} }}", [shape])
    assert tuple(layer.top_shapes[0]) == top
    check_against(layer, lambda x: (x.reshape(top),), [shape], batch_sizes=(None,))
    if top_at_5:
        x = torch.randn((5,) + shape[1:])
        (y,) = tops_of(layer.module, x)
        assert tuple(y.shape) == top_at_5
        torch.testing.assert_close(y, x.reshape(top_at_5))


@pytest.mark.parametrize("params,message", [
    ("shape { dim: -1 dim: -1 }", "more than one -1"),
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 }", "lacks"),
    ("shape { dim: 5 dim: -1 }", "not divisible"),
    ("shape { dim: 2 dim: 5 }", "cannot be reshaped"),
    ("shape { dim: 2 } axis: 4", "out of range"),
    ("shape { dim: 2 } axis: 1 num_axes: 3", "out of range"),
    ("shape { dim: -2 dim: -3 }", "negative dimension"),
])
def test_reshape_refuses_bad_shapes(params, message):
    with pytest.raises(CaffeCompatError, match=message):
        build("Reshape", f"reshape_param {{ {params} }}", [(2, 3, 4)])


# ---------------------------------------------------------------- Tile, Silence

def caffe_tile(x, axis, tiles):
    """Caffe's loop: for each index before `axis`, the block from `axis` on, `tiles` times."""
    outer = int(np.prod(x.shape[:axis]))
    blocks = x.reshape(outer, -1)
    rows = [np.concatenate([blocks[i]] * tiles) for i in range(outer)]
    top_shape = list(x.shape)
    top_shape[axis] *= tiles
    return np.stack(rows).reshape(top_shape)


@pytest.mark.parametrize("params,shape,axis,tiles", [
    ("tile_param { axis: 1 tiles: 2 }", (2, 3, 4, 5), 1, 2),
    ("tile_param { tiles: 3 }", (2, 3), 1, 3),
    ("tile_param { axis: -1 tiles: 4 }", (2, 3, 2), 2, 4),
    ("tile_param { axis: 0 tiles: 2 }", (2, 3), 0, 2),
])
def test_tile(params, shape, axis, tiles):
    x = randn(*shape)
    _, layer = build("Tile", params, [shape])
    np.testing.assert_array_equal(tops_of(layer.module, torch.tensor(x))[0].numpy(), caffe_tile(x, axis, tiles))
    repeats = [1] * len(shape)
    repeats[axis] = tiles
    check_against(layer, lambda x: (x.repeat(*repeats) if isinstance(x, torch.Tensor) else np.tile(x, repeats),),
                  [shape])


@pytest.mark.parametrize("params", ["tile_param { axis: 1 }", "tile_param { tiles: 0 }"])
def test_tile_refuses_missing_or_bad_tiles(params):
    with pytest.raises(CaffeCompatError, match="tiles"):
        build("Tile", params, [(2, 3)])


def test_silence_has_no_tops():
    _, layer = build("Silence", "", [(2, 3), (4,)], tops=0)
    assert layer.top_shapes == [] and layer.tops == []
    assert layer.module(torch.zeros(2, 3), torch.zeros(4)) == ()


# ---------------------------------------------------------------- ArgMax

def caffe_argmax(x, axis, top_k, out_max_val):
    """Caffe's loop: per position, sort (value, index) pairs in descending order (larger
    index first among equal values) and write the first top_k indices or values."""
    if axis is None:
        flat = x.reshape(x.shape[0], -1)
        rows = []
        for row in flat:
            pairs = sorted(((v, j) for j, v in enumerate(row)), reverse=True)[:top_k]
            indices = [j for _, j in pairs]
            rows.append([indices, [v for v, _ in pairs]] if out_max_val else [indices])
        top = np.array(rows, np.float32)
        return top.reshape(top.shape + (1,) * (x.ndim - 3))
    moved = np.moveaxis(x, axis, -1)
    top = np.empty(moved.shape[:-1] + (top_k,), np.float32)
    for index in np.ndindex(*moved.shape[:-1]):
        pairs = sorted(((v, j) for j, v in enumerate(moved[index])), reverse=True)[:top_k]
        top[index] = [v if out_max_val else j for v, j in pairs]
    return np.moveaxis(top, -1, axis)


def small_integers(*shape):
    """Values with many ties."""
    return RNG.integers(-2, 3, shape).astype(np.float32)


@pytest.mark.parametrize("params,shape,axis,top_k,out_max_val,top", [
    ("argmax_param { top_k: 2 axis: 1 }", (3, 6, 2, 2), 1, 2, False, (3, 2, 2, 2)),
    ("argmax_param { axis: -1 out_max_val: true top_k: 3 }", (3, 2, 5), 2, 3, True, (3, 2, 3)),
    ("argmax_param { axis: 0 }", (4, 3), 0, 1, False, (1, 3)),
    ("", (3, 4, 2, 2), None, 1, False, (3, 1, 1, 1)),
    ("argmax_param { top_k: 3 out_max_val: true }", (3, 4, 2, 2), None, 3, True, (3, 2, 3, 1)),
    ("argmax_param { top_k: 2 }", (3, 5), None, 2, False, (3, 1, 2)),
    ("argmax_param { top_k: 2 out_max_val: true }", (4,), None, 1, True, (4, 2, 1)),
])
@pytest.mark.parametrize("values", [randn, small_integers])
def test_argmax(params, shape, axis, top_k, out_max_val, top, values):
    if shape == (4,):  # top_k 2 exceeds the one entry per example
        with pytest.raises(CaffeCompatError, match="top_k"):
            build("ArgMax", params, [shape])
        return
    x = values(*shape)
    _, layer = build("ArgMax", params, [shape])
    assert tuple(layer.top_shapes[0]) == top
    bottom = torch.tensor(x, requires_grad=True)
    (y,) = tops_of(layer.module, bottom)
    assert not y.requires_grad
    np.testing.assert_array_equal(y.numpy(), caffe_argmax(x, axis, top_k, out_max_val))
    if axis != 0:
        x5 = values(5, *shape[1:])
        np.testing.assert_array_equal(tops_of(layer.module, torch.tensor(x5))[0].numpy(),
                                      caffe_argmax(x5, axis, top_k, out_max_val))


@pytest.mark.parametrize("params,message", [
    ("argmax_param { top_k: 0 }", "at least 1"),
    ("argmax_param { top_k: 5 axis: 1 }", "exceeds"),
    ("argmax_param { top_k: 13 }", "exceeds"),
    ("argmax_param { axis: 3 }", "out of range"),
])
def test_argmax_refuses_bad_configurations(params, message):
    with pytest.raises(CaffeCompatError, match=message):
        build("ArgMax", params, [(2, 3, 4)])


# ---------------------------------------------------------------- tracing and ONNX

EXPORTED = [
    ("Concat", "", [(2, 3, 4), (2, 2, 4)], 1),
    ("Concat", "concat_param { axis: 2 }", [(2, 3, 4), (2, 3, 4)], 1),
    ("Concat", "", [(2, 3)], 1),
    ("Slice", "slice_param { axis: 1 slice_point: 1 slice_point: 3 }", [(2, 4, 3)], 3),
    ("Slice", "slice_param { axis: -1 }", [(2, 4, 6)], 2),
    ("Slice", "", [(2, 4)], 1),
    ("Split", "", [(2, 3)], 2),
    ("Split", "", [(2, 3)], 1),
    ("Flatten", "", [(2, 3, 4, 5)], 1),
    ("Flatten", "flatten_param { axis: 0 }", [(2, 3, 4)], 1),
    ("Flatten", "flatten_param { axis: 2 end_axis: 1 }", [(2, 3, 4)], 1),
    ("Reshape", "reshape_param { shape { dim: 0 dim: -1 dim: 2 } }", [(2, 4, 3, 2)], 1),
    ("Reshape", "reshape_param { shape { dim: -1 dim: 6 } }", [(2, 4, 3)], 1),
    ("Reshape", "reshape_param { shape { dim: 1 } axis: 0 num_axes: 0 }", [(2, 3)], 1),
    ("Reshape", "reshape_param { shape { dim: 2 dim: -1 } axis: 1 }", [(2, 4, 3)], 1),
    ("Tile", "tile_param { axis: 1 tiles: 2 }", [(2, 3, 4)], 1),
    ("Tile", "tile_param { axis: -1 tiles: 3 }", [(2, 3, 4)], 1),
    ("ArgMax", "argmax_param { top_k: 2 axis: 1 }", [(3, 6, 2, 2)], 1),
    ("ArgMax", "argmax_param { top_k: 2 axis: 2 out_max_val: true }", [(3, 6, 4)], 1),
    ("ArgMax", "argmax_param { top_k: 3 }", [(3, 4, 2, 2)], 1),
    ("ArgMax", "argmax_param { top_k: 3 out_max_val: true }", [(3, 4, 2)], 1),
    ("ArgMax", "argmax_param { out_max_val: true }", [(3, 4)], 1),
]


@pytest.mark.parametrize("layer_type,params,shapes,tops", EXPORTED)
def test_fx_trace_matches_eager(layer_type, params, shapes, tops):
    _, layer = build(layer_type, params, shapes, tops)
    traced = torch.fx.symbolic_trace(CallWithList(layer.module, len(shapes)))
    arrays = [torch.tensor(small_integers(*s)) for s in shapes]
    torch.testing.assert_close(traced(arrays), layer.module(*arrays))


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("layer_type,params,shapes,tops", EXPORTED)
def test_onnx_emitter_matches_module(layer_type, params, shapes, tops, opset):
    export_and_run(layer_type, params, shapes, tops, opset=opset)
    if layer_type == "ArgMax":  # ties must resolve as Caffe's, to the larger index
        export_and_run(layer_type, params, shapes, tops, opset=opset, arrays_of=small_integers)


def test_onnx_silence_emits_nothing():
    ctx, layer = build("Silence", "", [(2, 3)], tops=0)
    g = OnnxGraph(17)
    REGISTRY["Silence"].to_onnx(g, ctx, layer.module, ["b0"], [])
    assert g.nodes == [] and g.initializers == []
