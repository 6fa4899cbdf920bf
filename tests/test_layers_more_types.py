"""The rest of BVLC Caffe's layer types: Clip, Swish, DummyData, Parameter, Filter,
BatchReindex, InfogainLoss, HDF5Data, HDF5Output and Python, each against Caffe's
semantics written here (forward loops, Caffe's own backward formulas), and their ONNX
emitters run in onnxruntime."""
import h5py
import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.errors import CaffeCompatError
from caffe_compat.graph import build_graph
from caffe_compat.io.schema import messages
from caffe_compat.layers import register, registry
from caffe_compat.layers.python_layer import python_type
from caffe_compat.net import CaffeNet
from layer_harness import build, onnx_and_module_tops, onnx_model, rel_err, tops_of

RNG = np.random.default_rng(11)


def grads_of(module, arrays, top_diff, dtype=torch.float64):
    bottoms = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in arrays]
    (top,) = tops_of(module, *bottoms)
    top.backward(torch.tensor(top_diff, dtype=dtype))
    return top.detach().numpy(), [b.grad for b in bottoms]


def check_onnx(layer_type, params, shapes, arrays, tops=1):
    ctx, converted = build(layer_type, params, shapes, tops=tops)
    model = onnx_model(layer_type, ctx, converted, 17, input_dims=[list(s) for s in shapes],
                       output_dims=[list(s) for s in converted.top_shapes] if layer_type != "Filter" else None)
    for theirs, ours in onnx_and_module_tops(model, converted.module, arrays):
        assert rel_err(theirs, ours) < 1e-6


# ---------------------------------------------------------------- Clip, Swish

def test_clip_forward_and_caffes_inclusive_gradient():
    _, converted = build("Clip", "clip_param { min: -0.5 max: 0.25 }", [(3, 4)])
    x = np.array([[-1, -0.5, 0, 0.25], [0.3, 2, -0.49, 0.1], [-3, 0.25, -0.5, 0.0]])
    diff = RNG.standard_normal(x.shape)
    top, (grad,) = grads_of(converted.module, [x], diff)
    np.testing.assert_array_equal(top, np.maximum(-0.5, np.minimum(x, 0.25)))
    # Caffe: top_diff * (x >= min && x <= max), both bounds included
    np.testing.assert_array_equal(grad.numpy(), diff * ((x >= -0.5) & (x <= 0.25)))


def test_clip_maps_nan_to_min_as_std_min_and_max_do():
    _, converted = build("Clip", "clip_param { min: -1 max: 2 }", [(4,)])
    x = np.array([np.nan, np.inf, -np.inf, 0.5])
    top, (grad,) = grads_of(converted.module, [x], np.ones(4))
    np.testing.assert_array_equal(top, [-1, 2, -1, 0.5])
    np.testing.assert_array_equal(grad.numpy(), [0, 0, 0, 1])


def test_clip_with_min_above_max_gives_min_as_caffe_writes_it():
    _, converted = build("Clip", "clip_param { min: 1 max: -1 }", [(5,)])
    x = np.linspace(-2, 2, 5)
    top, (grad,) = grads_of(converted.module, [x], np.ones(5))
    np.testing.assert_array_equal(top, np.ones(5))
    np.testing.assert_array_equal(grad.numpy(), np.zeros(5))


def test_clip_needs_both_bounds():
    with pytest.raises(CaffeCompatError, match="both min and max"):
        build("Clip", "clip_param { min: 1 }", [(5,)])


@pytest.mark.parametrize("beta", [1.0, 0.5, -2.0])
def test_swish_forward_and_caffes_backward(beta):
    _, converted = build("Swish", f"swish_param {{ beta: {beta} }}", [(4, 5)])
    x = RNG.standard_normal((4, 5)) * 3
    diff = RNG.standard_normal(x.shape)
    top, (grad,) = grads_of(converted.module, [x], diff)
    sigmoid = 1 / (1 + np.exp(-beta * x))
    assert rel_err(top, x * sigmoid) < 1e-12
    swish = x * sigmoid  # SwishLayer::Backward_cpu's formula
    assert rel_err(grad.numpy(), diff * (beta * swish + sigmoid * (1 - beta * swish))) < 1e-12


def test_swish_default_beta_is_one():
    _, converted = build("Swish", "", [(6,)])
    assert converted.module.beta == 1


@pytest.mark.parametrize("layer_type,params", [("Clip", "clip_param { min: -0.3 max: 0.7 }"),
                                               ("Clip", "clip_param { min: 0.5 max: -0.5 }"),
                                               ("Swish", "swish_param { beta: 1.5 }"), ("Swish", "")])
def test_clip_and_swish_onnx(layer_type, params):
    check_onnx(layer_type, params, [(3, 7)], [RNG.standard_normal((3, 7)).astype(np.float32)])


# ---------------------------------------------------------------- DummyData, Parameter

def test_dummy_data_shapes_fillers_and_refill():
    params = ('dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 4 } '
              'data_filler { type: "constant" value: 2.5 } data_filler { type: "uniform" min: -1 max: 1 } }')
    _, converted = build("DummyData", params, [], tops=2)
    assert converted.top_shapes == [(2, 3), (4,)]
    first = tops_of(converted.module)
    second = tops_of(converted.module)
    np.testing.assert_array_equal(first[0].detach().numpy(), np.full((2, 3), 2.5, np.float32))
    np.testing.assert_array_equal(second[0].detach().numpy(), first[0].detach().numpy())
    assert not torch.equal(first[1], second[1])  # non-constant fillers draw at every pass
    assert (first[1].abs() <= 1).all()


def test_dummy_data_defaults_to_zeros_and_reads_legacy_dims():
    params = "dummy_data_param { num: 2 channels: 3 channels: 1 height: 4 width: 5 }"
    _, converted = build("DummyData", params, [], tops=2)
    assert converted.top_shapes == [(2, 3, 4, 5), (2, 1, 4, 5)]
    for top in tops_of(converted.module):
        assert not top.detach().any()


def test_dummy_data_tops_take_gradients_as_caffes_blobs_do():
    _, converted = build("DummyData", "dummy_data_param { shape { dim: 3 } }", [])
    (top,) = tops_of(converted.module)
    (top * 2).sum().backward()
    np.testing.assert_array_equal(top.grad.numpy(), np.full(3, 2.0))


@pytest.mark.parametrize("params,tops,message", [
    ("dummy_data_param { shape { dim: 2 } shape { dim: 2 } shape { dim: 2 } }", 2, "once per top"),
    ('dummy_data_param { shape { dim: 2 } data_filler { } data_filler { } data_filler { } }', 2, "data_filler"),
    ("dummy_data_param { shape { dim: 2 } num: 2 channels: 1 height: 1 width: 1 }", 1, "not both"),
    ('dummy_data_param { shape { dim: 2 } data_filler { type: "nope" } }', 1, "unknown filler"),
])
def test_dummy_data_errors(params, tops, message):
    with pytest.raises(CaffeCompatError, match=message):
        build("DummyData", params, [], tops=tops)


def test_dummy_data_onnx():
    params = 'dummy_data_param { shape { dim: 2 dim: 3 } data_filler { type: "constant" value: -1.5 } }'
    ctx, converted = build("DummyData", params, [])
    model = onnx_model("DummyData", ctx, converted, 17, input_dims=[], output_dims=[[2, 3]])
    ((theirs, ours),) = onnx_and_module_tops(model, converted.module, [])
    np.testing.assert_array_equal(theirs, ours)


@pytest.mark.parametrize("filler,check", [
    ('type: "uniform" min: 2 max: 3', lambda v: (v >= 2).all() and (v <= 3).all() and v.std() > 0),
    ('type: "xavier"', lambda v: (np.abs(v) <= np.sqrt(3 / 20)).all() and v.std() > 0),
    ('type: "gaussian" mean: 5 std: 0.01', lambda v: np.abs(v - 5).max() < 0.1 and v.std() > 0),
])
def test_dummy_data_random_fillers_onnx(filler, check):
    params = f"dummy_data_param {{ shape {{ dim: 50 dim: 20 }} data_filler {{ {filler} }} }}"
    ctx, converted = build("DummyData", params, [])
    model = onnx_model("DummyData", ctx, converted, 17, input_dims=[], output_dims=[[50, 20]])
    ((theirs, ours),) = onnx_and_module_tops(model, converted.module, [])
    assert check(theirs) and check(ours)


def test_parameter_is_its_blob_and_takes_the_tops_gradient():
    _, converted = build("Parameter", "parameter_param { shape { dim: 2 dim: 3 } }", [])
    module = converted.module
    assert converted.top_shapes == [(2, 3)] and [tuple(b.shape) for b in module.caffe_blobs()] == [(2, 3)]
    with torch.no_grad():
        module.blob.copy_(torch.arange(6.0).reshape(2, 3))
    (top,) = tops_of(module)
    diff = torch.tensor(RNG.standard_normal((2, 3)), dtype=torch.float32)
    top.backward(diff)
    np.testing.assert_array_equal(top.detach().numpy(), np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(module.blob.grad.numpy(), diff.numpy())


def test_parameter_in_the_lifted_dialect_reads_its_field_by_name():
    """The lifted fork's 145 is its loss's parameter; BVLC's parameter_param keeps its name
    there (a hybrid prototxt reads), so a Parameter layer still gets its shape."""
    net = messages("lifted").NetParameter()
    text_format.Parse('layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 3 } } }', net)
    assert messages("lifted").LayerParameter.DESCRIPTOR.fields_by_number[145].name == \
        "lifted_struct_sim_softmax_loss_param"
    assert CaffeNet(build_graph(net, "TEST", "lifted")).blob_shapes["p"] == (3,)


def test_parameter_onnx():
    ctx, converted = build("Parameter", "parameter_param { shape { dim: 4 } }", [])
    with torch.no_grad():
        converted.module.blob.normal_()
    model = onnx_model("Parameter", ctx, converted, 17, input_dims=[], output_dims=[[4]])
    ((theirs, ours),) = onnx_and_module_tops(model, converted.module, [])
    np.testing.assert_array_equal(theirs, ours)


# ---------------------------------------------------------------- Filter, BatchReindex

def test_filter_forwards_the_selected_items_and_routes_their_gradients_back():
    _, converted = build("Filter", "", [(5, 3), (5, 2, 2), (5, 1, 1)], tops=2)
    a, b = RNG.standard_normal((5, 3)), RNG.standard_normal((5, 2, 2))
    selector = np.array([0, 2.5, 0, -1, 1]).reshape(5, 1, 1)  # any non-zero selects
    bottoms = [torch.tensor(v, requires_grad=True) for v in (a, b, selector)]
    top_a, top_b = converted.module(*bottoms)
    keep = [1, 3, 4]
    np.testing.assert_array_equal(top_a.detach().numpy(), a[keep])
    np.testing.assert_array_equal(top_b.detach().numpy(), b[keep])
    diff = RNG.standard_normal((3, 3))
    top_a.backward(torch.tensor(diff))
    expected = np.zeros((5, 3))
    expected[keep] = diff
    np.testing.assert_array_equal(bottoms[0].grad.numpy(), expected)
    assert bottoms[2].grad is None


def test_filter_errors():
    with pytest.raises(CaffeCompatError, match="one top per data bottom"):
        build("Filter", "", [(4, 2), (4, 1)], tops=2)
    with pytest.raises(CaffeCompatError, match="selector"):
        build("Filter", "", [(4, 2), (4, 2)])
    with pytest.raises(CaffeCompatError, match="first dimension"):
        build("Filter", "", [(3, 2), (4, 1)])


def test_filter_onnx():
    selector = np.array([[1], [0], [0], [3]], np.float32)
    check_onnx("Filter", "", [(4, 3), (4, 1)], [RNG.standard_normal((4, 3)).astype(np.float32), selector])


def test_batch_reindex_gathers_and_sums_gradients_over_repeats():
    _, converted = build("BatchReindex", "", [(4, 2, 3), (6,)])
    data = RNG.standard_normal((4, 2, 3))
    index = np.array([3, 0, 0, 2.7, 1, 0])  # Caffe truncates the float indices
    diff = RNG.standard_normal((6, 2, 3))
    bottoms = [torch.tensor(data, requires_grad=True), torch.tensor(index, requires_grad=True)]
    top = converted.module(*bottoms)
    top.backward(torch.tensor(diff))
    ints = index.astype(int)
    np.testing.assert_array_equal(top.detach().numpy(), data[ints])
    expected = np.zeros_like(data)
    for i, source in enumerate(ints):  # BatchReindexLayer::Backward_cpu
        expected[source] += diff[i]
    assert rel_err(bottoms[0].grad.numpy(), expected) < 1e-15
    assert bottoms[1].grad is None


def test_batch_reindex_needs_a_1d_index():
    with pytest.raises(CaffeCompatError, match="1-D"):
        build("BatchReindex", "", [(4, 2), (3, 1)])


def test_batch_reindex_onnx():
    index = np.array([2, 2, 0, 1, 3], np.float32)
    check_onnx("BatchReindex", "", [(4, 3), (5,)], [RNG.standard_normal((4, 3)).astype(np.float32), index])


# ---------------------------------------------------------------- InfogainLoss

def caffe_infogain(x, labels, infogain, axis, ignore, normalization):
    """InfogainLossLayer's Forward_cpu and Backward_cpu (loss weight 1), transcribed."""
    x = np.moveaxis(x, axis, -1)
    prob = np.exp(x - x.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    flat, flat_labels = prob.reshape(-1, prob.shape[-1]), labels.reshape(-1).astype(int)
    loss, count = 0.0, 0
    diff = np.zeros_like(flat)
    for n, label in enumerate(flat_labels):
        if ignore is not None and label == ignore:
            continue
        loss -= (infogain[label] * np.log(np.maximum(flat[n], 1e-20))).sum()
        diff[n] = flat[n] * infogain[label].sum() - infogain[label]
        count += 1
    outer = int(np.prod(x.shape[:axis]))
    normalizer = max(1.0, {"VALID": count, "FULL": flat_labels.size, "BATCH_SIZE": outer, "NONE": 1}[normalization])
    return loss / normalizer, np.moveaxis((diff / normalizer).reshape(prob.shape), -1, axis), prob


@pytest.mark.parametrize("shape,axis,extra", [
    ((6, 4), 1, ""),
    ((3, 4, 2, 2), 1, "loss_param { ignore_label: 2 }"),
    ((3, 4, 5), 2, "loss_param { normalization: FULL }"),
    ((3, 5, 2), 1, "loss_param { normalization: BATCH_SIZE ignore_label: 0 }"),
    ((4, 3), 1, "loss_param { normalization: NONE }"),
])
def test_infogain_loss_matches_caffe(shape, axis, extra):
    classes = shape[axis]
    label_shape = shape[:axis] + shape[axis + 1:]
    params = f"infogain_loss_param {{ axis: {axis} }} {extra}"
    _, converted = build("InfogainLoss", params, [shape, label_shape, (classes, classes)], tops=2)
    x = RNG.standard_normal(shape) * 2
    labels = RNG.integers(0, classes, label_shape).astype(np.float64)
    infogain = RNG.random((classes, classes))
    bottoms = [torch.tensor(v, requires_grad=True) for v in (x, labels, infogain)]
    loss, prob = converted.module(*bottoms)
    loss.backward()
    ignore = int(extra.split("ignore_label: ")[1].split()[0]) if "ignore_label" in extra else None
    normalization = extra.split("normalization: ")[1].split()[0] if "normalization" in extra else "VALID"
    ref_loss, ref_diff, ref_prob = caffe_infogain(x, labels, infogain, axis, ignore, normalization)
    assert rel_err(loss.item(), ref_loss) < 1e-12
    assert rel_err(bottoms[0].grad.numpy(), ref_diff) < 1e-12
    assert rel_err(np.moveaxis(prob.numpy(), axis, -1), ref_prob) < 1e-12
    assert bottoms[1].grad is None and bottoms[2].grad is None


def test_infogain_loss_reads_its_matrix_from_source(tmp_path, monkeypatch):
    infogain = RNG.random((3, 3)).astype(np.float32)
    blob = messages("bvlc").BlobProto()
    blob.shape.dim.extend([1, 1, 3, 3])
    blob.data.extend(infogain.reshape(-1).tolist())
    (tmp_path / "H.binaryproto").write_bytes(blob.SerializeToString())
    monkeypatch.chdir(tmp_path)  # Caffe resolves source from its working directory
    _, converted = build("InfogainLoss", 'infogain_loss_param { source: "H.binaryproto" }', [(4, 3), (4,)])
    x, labels = RNG.standard_normal((4, 3)), np.array([0.0, 2, 1, 1])
    loss = converted.module(torch.tensor(x), torch.tensor(labels))
    assert rel_err(loss.item(), caffe_infogain(x, labels, infogain.astype(np.float64), 1, None, "VALID")[0]) < 1e-6


def test_infogain_loss_errors():
    with pytest.raises(CaffeCompatError, match="infogain matrix"):
        build("InfogainLoss", "", [(4, 3), (4,)])
    with pytest.raises(CaffeCompatError, match="9"):
        build("InfogainLoss", "", [(4, 3), (4,), (2, 2)])


# ---------------------------------------------------------------- HDF5Data, HDF5Output

def test_hdf5_data_reads_rows_in_order_across_files_and_wraps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = [RNG.standard_normal((3, 2, 2)), RNG.standard_normal((2, 2, 2))]
    labels = [np.arange(3), np.arange(3, 5)]
    for i, (d, l) in enumerate(zip(data, labels)):
        with h5py.File(f"part{i}.h5", "w") as f:
            f.create_dataset("data", data=d)
            f.create_dataset("label", data=l.astype(np.int32))
    (tmp_path / "list.txt").write_text("part0.h5\n part1.h5\n")
    _, converted = build("HDF5Data", 'hdf5_data_param { source: "list.txt" batch_size: 4 }', [],
                         top_names=["data", "label"])
    assert converted.top_shapes == [(4, 2, 2), (4,)]
    rows = np.concatenate(data)
    seen = [tops_of(converted.module) for _ in range(2)]
    order = [0, 1, 2, 3, 4, 0, 1, 2]
    np.testing.assert_array_equal(np.concatenate([s[0].detach().numpy() for s in seen]), rows[order].astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([s[1].detach().numpy() for s in seen]), np.array(order, np.float32))


def test_hdf5_data_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CaffeCompatError, match="file list"):
        build("HDF5Data", 'hdf5_data_param { source: "missing.txt" batch_size: 2 }', [])
    with pytest.raises(CaffeCompatError, match="transform"):
        build("HDF5Data", 'hdf5_data_param { source: "x" batch_size: 2 } transform_param { scale: 2 }', [])


def test_hdf5_output_writes_data_and_label_as_4d_float(tmp_path):
    target = tmp_path / "out.h5"
    _, converted = build("HDF5Output", f'hdf5_output_param {{ file_name: "{target}" }}', [(3, 2), (3,)], tops=0)
    data, label = RNG.standard_normal((3, 2)).astype(np.float32), np.array([1.0, 0.0, 2.0], np.float32)
    assert converted.module(torch.tensor(data), torch.tensor(label)) == ()
    with h5py.File(target, "r") as f:
        np.testing.assert_array_equal(f["data"][()], data.reshape(3, 2, 1, 1))
        np.testing.assert_array_equal(f["label"][()], label.reshape(3, 1, 1, 1))


# ---------------------------------------------------------------- Python

def test_python_layer_error_names_module_and_class():
    params = 'python_param { module: "pyloss" layer: "EuclideanLossLayer" }'
    with pytest.raises(CaffeCompatError, match="class 'EuclideanLossLayer' of module 'pyloss'.*"
                                               r"register\('Python:pyloss.EuclideanLossLayer'\)"):
        build("Python", params, [(2, 3)])


def test_a_ported_python_layer_is_found_by_module_and_class(request):
    key = python_type("test_layers_more_types", "Doubler")
    # the registry's own table (the registry, where it is a plain dict), left as it was
    table = getattr(registry.REGISTRY, "_entries", registry.REGISTRY)
    request.addfinalizer(lambda: table.pop(key))

    class Doubler(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    @register(key)
    def build_doubler(ctx):
        return ctx.wire(Doubler(), top_shapes=ctx.bottom_shapes)

    params = 'python_param { module: "test_layers_more_types" layer: "Doubler" }'
    _, converted = build("Python", params, [(2, 3)])
    assert isinstance(converted.module, Doubler)
