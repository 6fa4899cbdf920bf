"""The simpler fork layers (issue 19, group A): Interp, BN (4 blobs and SegNet's 2),
Upsample (SegNet's unpooling and the YOLOv3 forks' nearest), ShuffleChannel, Axpy,
ReLU6, ConvolutionDepthwise and DepthwiseConvolution. Each fork's own cases
(tests/fixtures/caffe-reference/forks/layers) run as nets and through ONNX Runtime; the
settings those cases leave out are checked against transcriptions of the forks' C++
loops written here; the forks' CHECKs end in one line naming the layer and field."""
import glob
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe_compat.tools.compare import compare_case
from caffe_compat.errors import CaffeCompatError
from caffe_compat.graph import build_graph
from caffe_compat.io.files import read_net
from caffe_compat.layers.catalog import CATALOG
from caffe_compat.shapes import net_shapes
from conftest import REFERENCE, require, run_cli
from layer_harness import build, onnx_and_module_tops, onnx_model, tops_of

FORKS = REFERENCE / "forks" / "layers"
KINDS = ("axpy", "bn", "ceilpool", "convdw", "dwconv", "interp", "relu6", "segnetbn", "shuffle", "upsample")
CASES = sorted(Path(p).stem for p in glob.glob(str(FORKS / "*.npz")) if Path(p).stem.split("_")[0] in KINDS)
LAYER_RTOL = 1e-5
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
f32 = np.float32


def seeded(*shape, seed=0, low=-3.0, high=3.0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(low, high, shape).astype(f32))


def one_line_error(layer_type, params, shapes, dialect, *phrases, tops=1):
    with pytest.raises(CaffeCompatError) as err:
        build(layer_type, params, shapes, dialect=dialect, tops=tops)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"layer 'layer' ({layer_type}):"), message
    for phrase in phrases:
        assert phrase in message, message


# ---- the forks' own numbers --------------------------------------------------------

def test_every_kind_of_case_is_there():
    assert {case.split("_")[0] for case in CASES} == set(KINDS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_fixture_case(case, device):
    folder = require(FORKS)
    model = folder / f"{case}.caffemodel"
    rows = compare_case(folder / f"{case}.prototxt", model if model.exists() else None, folder / f"{case}.npz",
                        device=device, rtol=LAYER_RTOL, grad_rtol=LAYER_RTOL)
    assert rows and all(r.ok for r in rows), "\n".join(r.format() for r in rows if not r.ok)


@pytest.mark.parametrize("case", CASES)
def test_fixture_case_through_onnx_runtime(case):
    from caffe_compat.converters.onnx import export_onnx, load_for_export
    from test_onnx_export import CAFFE_LAYER_RTOL, TORCH_RTOL, assert_close, check, run_onnx, torch_outputs

    folder = require(FORKS)
    net, _ = load_for_export(folder / f"{case}.prototxt", folder / f"{case}.caffemodel")
    ref = dict(np.load(folder / f"{case}.npz"))
    outputs = [k[len("blob/"):] for k in ref if k.startswith("blob/") and k[len("blob/"):] not in net.input_names]
    model = check(export_onnx(net, outputs, opset=13))
    feeds = {i.name: ref[f"input/{i.name}"] for i in model.graph.input}
    ours, theirs = run_onnx(model, feeds), torch_outputs(net, feeds, outputs)
    for blob in outputs:
        assert_close(ours[blob], ref[f"blob/{blob}"], CAFFE_LAYER_RTOL, f"{case} {blob} vs the fork")
        assert_close(ours[blob], theirs[blob], TORCH_RTOL, f"{case} {blob} vs PyTorch")


@pytest.mark.parametrize("case", CASES)
def test_inspect_shapes_and_parameters_equal_the_built_net(case):
    from caffe_compat.layers.registry import caffe_blobs
    from caffe_compat.net import CaffeNet

    net_file = read_net(require(FORKS / f"{case}.prototxt"))
    graph = build_graph(net_file.net, "TEST", net_file.dialect)
    arithmetic, net = net_shapes(graph), CaffeNet(graph)
    assert not arithmetic.notes
    assert {b: arithmetic.blobs[b] for b in net.blob_shapes} == {b: tuple(s) for b, s in net.blob_shapes.items()}
    for module_name, module in net.layers.items():
        layer = net.layer_names[module_name]
        assert arithmetic.params[layer] == [tuple(t.shape) for t in caffe_blobs(module)], layer


def test_compare_cli_passes_every_row_of_these_kinds(tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    for case in CASES:
        for suffix in (".prototxt", ".caffemodel", ".npz"):
            if (FORKS / f"{case}{suffix}").exists():
                (folder / f"{case}{suffix}").symlink_to(FORKS / f"{case}{suffix}")
    result = run_cli("compare", folder, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout and "FAIL" not in result.stdout


def test_layers_lists_each_type_with_its_fork(tmp_path):
    import json

    result = run_cli("layers", "--json", cwd=tmp_path)
    listed = {row["type"]: row for row in json.loads(result.stdout)}
    assert listed["BN"]["fork"] == "pspnet, tsn, segnet" and listed["BN"]["onnx"]
    assert listed["Upsample"]["fork"] == "segnet, mobilenet-yolo"
    assert listed["Interp"]["fork"] == "pspnet" and listed["Axpy"]["fork"] == "senet"
    assert listed["Convolution"]["fork"] == "bvlc"
    for layer_type in ("ReLU6", "ShuffleChannel", "ConvolutionDepthwise", "DepthwiseConvolution"):
        assert CATALOG[layer_type].onnx and listed[layer_type]["fork"] != "bvlc"


# ---- Interp against the fork's caffe_cpu_interp2 ------------------------------------

def fork_interp(x, crop, height_in, width_in, height_out, width_out):
    """caffe_cpu_interp2<float, false> over (N, C, H, W), float32 as the fork computes."""
    x = np.asarray(x, f32)
    out = np.zeros(x.shape[:2] + (height_out, width_out), f32)
    if (height_in, width_in) == (height_out, width_out):
        return x[:, :, crop:crop + height_in, crop:crop + width_in].copy()
    rheight = f32(height_in - 1) / f32(height_out - 1) if height_out > 1 else f32(0)
    rwidth = f32(width_in - 1) / f32(width_out - 1) if width_out > 1 else f32(0)
    for h2 in range(height_out):
        h1r = f32(rheight * f32(h2))
        h1 = int(h1r)
        h1p = 1 if h1 < height_in - 1 else 0
        h1l = f32(h1r - f32(h1))
        h0l = f32(f32(1) - h1l)
        for w2 in range(width_out):
            w1r = f32(rwidth * f32(w2))
            w1 = int(w1r)
            w1p = 1 if w1 < width_in - 1 else 0
            w1l = f32(w1r - f32(w1))
            w0l = f32(f32(1) - w1l)
            r, c = crop + h1, crop + w1
            out[:, :, h2, w2] = (h0l * (w0l * x[:, :, r, c] + w1l * x[:, :, r, c + w1p])
                                 + h1l * (w0l * x[:, :, r + h1p, c] + w1l * x[:, :, r + h1p, c + w1p]))
    return out


@pytest.mark.parametrize("params, shape, size", [
    ("interp_param { shrink_factor: 2 }", (1, 2, 9, 8), (5, 4)),
    ("interp_param { shrink_factor: 3 zoom_factor: 2 }", (2, 1, 10, 7), (7, 5)),
    ("interp_param { height: 1 width: 6 }", (1, 2, 4, 3), (1, 6)),
    ("interp_param { height: 13 width: 2 pad_beg: -2 pad_end: 0 }", (1, 1, 8, 9), (13, 2)),
    ("interp_param { zoom_factor: 1 pad_beg: -1 pad_end: -1 }", (1, 2, 5, 6), (3, 4)),
])
def test_interp_equals_the_forks_loop_and_onnx(params, shape, size):
    ctx, converted = build("Interp", params, [shape], dialect="pspnet")
    assert converted.top_shapes == [shape[:2] + size]
    x = seeded(*shape)
    s = converted.module.settings
    np.testing.assert_allclose(converted.module(x).numpy(),
                               fork_interp(x.numpy(), s.crop, s.height_in, s.width_in, *size), rtol=0, atol=1e-6)
    for theirs, ours in onnx_and_module_tops(onnx_model("Interp", ctx, converted, 13), converted.module, [x.numpy()]):
        np.testing.assert_array_equal(theirs, ours)


def test_interp_backward_is_the_adjoint_of_its_forward():
    _, converted = build("Interp", "interp_param { zoom_factor: 3 pad_beg: -1 }", [(1, 1, 5, 4)], dialect="pspnet")
    x = seeded(1, 1, 5, 4).requires_grad_()
    seed = seeded(1, 1, 10, 7, seed=1)
    (converted.module(x) * seed).sum().backward()
    # <A x, s> = <x, A^T s>: the gradient is the matrix of the map applied backwards
    columns = torch.eye(20).reshape(20, 1, 1, 5, 4)
    matrix = torch.stack([converted.module(c).reshape(-1) for c in columns], dim=1)
    np.testing.assert_allclose(x.grad.reshape(-1).numpy(), (matrix.T @ seed.reshape(-1)).numpy(), rtol=1e-6)


@pytest.mark.parametrize("params, phrase", [
    ("interp_param { zoom_factor: 2 pad_beg: 1 }", "interp_param.pad_beg is 1"),
    ("interp_param { shrink_factor: 0 }", "interp_param.shrink_factor is 0"),
    ("interp_param { height: 4 }", "needs zoom_factor, shrink_factor, or both height and width"),
    ("interp_param { zoom_factor: 2 pad_beg: -3 pad_end: -3 }", "crop the whole"),
])
def test_interp_refuses_what_the_fork_checks(params, phrase):
    one_line_error("Interp", params, [(1, 1, 5, 5)], "pspnet", phrase)


# ---- BN, 4 blobs -------------------------------------------------------------------

def test_bn_train_normalises_by_the_batch_and_folds_it_into_the_stored_statistics():
    _, converted = build("BN", "bn_param { momentum: 0.8 eps: 0.001 }", [(3, 2, 4, 5)], phase="TRAIN",
                         dialect="pspnet")
    bn = converted.module
    with torch.no_grad():
        bn.slope.copy_(torch.tensor([1.5, -0.5]).reshape(1, 2, 1, 1))
        bn.bias.copy_(torch.tensor([0.25, 2.0]).reshape(1, 2, 1, 1))
        bn.mean.fill_(1.0)
        bn.variance.fill_(2.0)
    x = seeded(3, 2, 4, 5).double().float().requires_grad_()
    top = bn(x)
    mean = x.detach().mean((0, 2, 3), keepdim=True)
    variance = x.detach().var((0, 2, 3), unbiased=False, keepdim=True)  # biased, as the fork's
    expected = (x.detach() - mean) / torch.sqrt(variance + 0.001) * bn.slope.detach() + bn.bias.detach()
    np.testing.assert_allclose(top.detach().numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.mean.numpy(), (0.8 * 1.0 + 0.2 * mean).numpy(), rtol=1e-6)
    np.testing.assert_allclose(bn.variance.numpy(), (0.8 * 2.0 + 0.2 * variance).numpy(), rtol=1e-6)
    # in a TRAIN net the fork's backward is the batch normalisation's true gradient
    seed = seeded(3, 2, 4, 5, seed=2)
    (top * seed).sum().backward()
    reference = x.detach().clone().requires_grad_()
    true = torch.nn.functional.batch_norm(reference, None, None, bn.slope.detach().reshape(2),
                                          bn.bias.detach().reshape(2), training=True, eps=0.001)
    (true * seed).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), reference.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_bn_frozen_learns_nothing_and_starts_from_unit_variance():
    _, converted = build("BN", "bn_param { frozen: true }", [(1, 3, 2, 2)], phase="TRAIN", dialect="pspnet")
    bn = converted.module
    assert not list(bn.parameters())  # the fork zeroes slope's and bias's lr_mult and decay_mult
    assert bn.variance.eq(1).all() and bn.mean.eq(0).all()
    stored = bn.mean.clone()
    bn(seeded(1, 3, 2, 2))
    assert torch.equal(bn.mean, stored)


def test_bn_without_bn_param_in_a_bvlc_net_is_the_four_blob_bn():
    _, converted = build("BN", "", [(1, 3, 2, 2)])
    assert [tuple(t.shape) for t in converted.module.caffe_blobs()] == [(1, 3, 1, 1)] * 4


# ---- BN, SegNet's 2 blobs ----------------------------------------------------------

def test_segnet_bn_learn_writes_the_batch_statistics_to_its_extra_tops():
    ctx, converted = build("BN", "bn_param { bn_mode: LEARN }", [(2, 3, 4, 4)], dialect="segnet", tops=3)
    x = seeded(2, 3, 4, 4)
    top, mean, variance = tops_of(converted.module, x)
    assert converted.top_shapes == [(2, 3, 4, 4), (1, 3, 1, 1), (1, 3, 1, 1)]
    np.testing.assert_allclose(mean.numpy(), x.mean((0, 2, 3), keepdim=True).numpy(), rtol=1e-5)
    np.testing.assert_allclose(variance.numpy(), x.var((0, 2, 3), unbiased=False, keepdim=True).numpy(), rtol=1e-4)
    for theirs, ours in onnx_and_module_tops(onnx_model("BN", ctx, converted, 13), converted.module, [x.numpy()]):
        np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)


def test_segnet_bn_refuses_extra_tops_in_inference_mode():
    one_line_error("BN", "bn_param { bn_mode: INFERENCE }", [(1, 2, 3, 3)], "segnet", "bn_mode LEARN only", tops=2)


# ---- Upsample ----------------------------------------------------------------------

def fork_unpool(x, mask, height_out, width_out):
    """UpsampleLayer::Forward_cpu: each plane's values written at the mask's indices in order."""
    num, channels = x.shape[:2]
    out = np.zeros((num, channels, height_out * width_out), f32)
    for n in range(num):
        for c in range(channels):
            for i, (value, index) in enumerate(zip(x[n, c].reshape(-1), mask[n, c].reshape(-1))):
                out[n, c, int(index)] = value
    return out.reshape(num, channels, height_out, width_out)


def test_upsample_later_values_overwrite_and_every_value_takes_its_indexs_diff():
    ctx, converted = build("Upsample", "upsample_param { upsample_h: 5 upsample_w: 4 }", [(1, 2, 2, 3), (1, 2, 2, 3)],
                           dialect="segnet")
    x = seeded(1, 2, 2, 3).requires_grad_()
    mask = torch.tensor([[[[0, 5, 5], [19, 0, 7]], [[1, 2, 3], [4, 5, 6]]]], dtype=torch.float32)
    top = converted.module(x, mask)
    np.testing.assert_array_equal(top.detach().numpy(), fork_unpool(x.detach().numpy(), mask.numpy(), 5, 4))
    seed = seeded(1, 2, 5, 4, seed=3)
    (top * seed).sum().backward()
    expected = np.take_along_axis(seed.reshape(1, 2, 20).numpy(), mask.reshape(1, 2, 6).long().numpy(), axis=2)
    np.testing.assert_array_equal(x.grad.reshape(1, 2, 6).numpy(), expected)
    # ONNX Runtime's MaxUnpool writes in order too: the same overwrites
    pairs = onnx_and_module_tops(onnx_model("Upsample", ctx, converted, 13), converted.module,
                                 [x.detach().numpy(), mask.numpy()])
    for theirs, ours in pairs:
        np.testing.assert_array_equal(theirs, ours)


def test_upsample_mask_index_outside_the_top_is_one_line():
    _, converted = build("Upsample", "upsample_param { scale: 2 }", [(1, 1, 2, 2), (1, 1, 2, 2)], dialect="segnet")
    with pytest.raises(CaffeCompatError, match=r"^layer 'layer' \(Upsample\): mask index 16 is outside the 4x4 top"):
        converted.module(seeded(1, 1, 2, 2), torch.tensor([[[[0.0, 1.0], [16.0, 2.0]]]]))


@pytest.mark.parametrize("params, phrase", [
    ("upsample_param { scale: 1 }", "upsample_param scale is 1, must be > 1"),
    ("upsample_param { scale: 2 scale_h: 2 scale_w: 2 }", "needs upsample_h and upsample_w"),
    ("upsample_param { scale: 3 pad_out_h: true }", "pad_out_h needs a scale of 2"),
    ("upsample_param { upsample_h: 1 upsample_w: 4 }", "upsample_param.upsample_h is 1"),
])
def test_upsample_refuses_what_the_fork_checks(params, phrase):
    one_line_error("Upsample", params, [(1, 1, 2, 2), (1, 1, 2, 2)], "segnet", phrase)


def test_upsample_scale_and_pad_out_give_the_forks_size():
    _, converted = build("Upsample", "upsample_param { scale_h: 2 scale_w: 3 pad_out_h: true }",
                         [(1, 1, 3, 2), (1, 1, 3, 2)], dialect="segnet")
    assert converted.top_shapes == [(1, 1, 5, 6)]


def test_nearest_upsample_of_the_yolo_forks_and_its_onnx():
    ctx, converted = build("Upsample", "upsample_param { scale: 3 }", [(2, 2, 3, 4)], dialect="mobilenet-yolo")
    x = seeded(2, 2, 3, 4).requires_grad_()
    top = converted.module(x)
    assert top.shape == (2, 2, 9, 12)
    rows, cols = np.arange(9) // 3, np.arange(12) // 3
    np.testing.assert_array_equal(top.detach().numpy(), x.detach().numpy()[:, :, rows][:, :, :, cols])
    seed = seeded(2, 2, 9, 12, seed=4)
    (top * seed).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), seed.reshape(2, 2, 3, 3, 4, 3).sum((3, 5)).numpy(), rtol=1e-6)
    for theirs, ours in onnx_and_module_tops(onnx_model("Upsample", ctx, converted, 13), converted.module,
                                             [x.detach().numpy()]):
        np.testing.assert_array_equal(theirs, ours)


def test_the_yolo_forks_upsample_defaults_to_scale_1():
    _, converted = build("Upsample", "", [(1, 2, 3, 4)], dialect="mobilenet-yolo")
    assert converted.top_shapes == [(1, 2, 3, 4)]
    one_line_error("Upsample", "upsample_param { scale: 0 }", [(1, 2, 3, 4)], "mobilenet-yolo",
                   "upsample_param.scale is 0")


# ---- ShuffleChannel, Axpy, ReLU6, the depthwise convolutions -------------------------

def test_shuffle_channel_moves_channel_i_times_c_over_g_plus_j_to_j_times_g_plus_i():
    ctx, converted = build("ShuffleChannel", "shuffle_channel_param { group: 2 }", [(2, 6, 3)], dialect="shufflenet")
    x = seeded(2, 6, 3)
    top = converted.module(x)
    assert top.shape == (2, 6, 3, 1)  # the fork's Reshape gives (num, channels, height, width)
    for i in range(2):
        for j in range(3):
            assert torch.equal(top[:, j * 2 + i, :, 0], x[:, i * 3 + j])
    for theirs, ours in onnx_and_module_tops(onnx_model("ShuffleChannel", ctx, converted, 13), converted.module,
                                             [x.numpy()]):
        np.testing.assert_array_equal(theirs, ours)


def test_shuffle_channel_refuses_a_group_that_does_not_divide_the_channels():
    one_line_error("ShuffleChannel", "shuffle_channel_param { group: 4 }", [(1, 6, 2, 2)], "shufflenet",
                   "group 4 does not divide the 6 channels")
    one_line_error("ShuffleChannel", "shuffle_channel_param { group: 0 }", [(1, 6, 2, 2)], "shufflenet",
                   "group is 0")


def test_axpy_takes_a_two_axis_scale_and_refuses_mismatched_shapes():
    ctx, converted = build("Axpy", "", [(2, 3), (2, 3, 2, 2), (2, 3, 2, 2)])
    a, x, y = seeded(2, 3), seeded(2, 3, 2, 2, seed=1), seeded(2, 3, 2, 2, seed=2)
    np.testing.assert_allclose(converted.module(a, x, y).numpy(), (a[:, :, None, None] * x + y).numpy(), rtol=1e-6)
    for theirs, ours in onnx_and_module_tops(onnx_model("Axpy", ctx, converted, 13), converted.module,
                                             [a.numpy(), x.numpy(), y.numpy()]):
        np.testing.assert_array_equal(theirs, ours)
    one_line_error("Axpy", "", [(2, 3, 2, 1), (2, 3, 2, 2), (2, 3, 2, 2)], "senet", "it must be (N, C)")
    one_line_error("Axpy", "", [(2, 3, 1, 1), (2, 3, 2, 2), (2, 3, 2, 3)], "senet", "they must match")


def test_relu6_gradient_takes_the_slope_at_zero_and_stops_at_six():
    _, converted = build("ReLU6", "relu6_param { negative_slope: 0.5 }", [(6,)], dialect="mobilenet-yolo")
    x = torch.tensor([-2.0, 0.0, 3.0, 6.0, 7.0, 5.5], requires_grad=True)
    top = converted.module(x)
    np.testing.assert_array_equal(top.detach().numpy(), [-1.0, 0.0, 3.0, 6.0, 6.0, 5.5])
    top.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.5, 0.5, 1.0, 0.0, 0.0, 1.0])


def test_convolution_depthwise_has_one_filter_per_channel_whatever_num_output_says():
    params = "convolution_param { num_output: 8 group: 1 kernel_size: 3 stride: 2 pad: 1 }"
    ctx, converted = build("ConvolutionDepthwise", params, [(1, 4, 7, 6)], dialect="mobilenet")
    assert converted.top_shapes == [(1, 4, 4, 3)]
    assert [tuple(t.shape) for t in converted.module.caffe_blobs()] == [(4, 1, 3, 3), (4,)]
    torch.nn.init.normal_(converted.module.weight)
    x = seeded(1, 4, 7, 6)
    for theirs, ours in onnx_and_module_tops(onnx_model("ConvolutionDepthwise", ctx, converted, 13),
                                             converted.module, [x.numpy()]):
        np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)
    one_line_error("ConvolutionDepthwise", params, [(1, 4, 7)], "mobilenet", "expected 4 axes")


def test_depthwise_convolution_is_convolution_on_the_cpu():
    params = "convolution_param { num_output: 6 group: 3 kernel_size: 3 }"
    _, converted = build("DepthwiseConvolution", params, [(1, 3, 5, 5)], dialect="depthwise")
    assert [tuple(t.shape) for t in converted.module.caffe_blobs()] == [(6, 1, 3, 3), (6,)]
    assert converted.top_shapes == [(1, 6, 3, 3)]


# ---- BN's two forks: a prototxt that reads alike in both ------------------------------

def test_a_bn_prototxt_of_either_fork_is_read_as_the_caffemodels_blobs_show(recwarn):
    from caffe_compat.io.files import read_prototxt, read_with_weights
    from caffe_compat.loading import load_net

    folder = require(FORKS)
    ambiguous = read_prototxt(folder / "segnetbn_02.prototxt")  # BN without bn_param
    assert ambiguous.dialect == "pspnet" and ambiguous.ties == ("pspnet", "tsn", "segnet")
    with pytest.warns(UserWarning, match="read as segnet, which its layers show"):
        net_file, weights_file = read_with_weights(ambiguous, folder / "segnetbn_02.caffemodel")
    assert net_file.dialect == weights_file.dialect == "segnet"
    net_file, weights_file = read_with_weights(read_prototxt(folder / "bn_00.prototxt"), folder / "bn_00.caffemodel")
    assert net_file.dialect == weights_file.dialect == "pspnet" and not recwarn.list  # 4 blobs: PSPNet's alone
    with pytest.raises(CaffeCompatError, match=r"^layer 'bn' \(BN\): the weights have 2 blobs, the layer needs 4$"):
        load_net(folder / "segnetbn_02.prototxt", folder / "segnetbn_02.caffemodel", dialect="pspnet")


def test_a_tsn_caffemodel_is_read_with_its_flat_bn_blobs(tmp_path):
    from caffe_compat.io.files import with_weights, write_caffemodel
    from caffe_compat.io.schema import messages
    from caffe_compat.loading import load_net

    (tmp_path / "net.prototxt").write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }\n'
        'layer { name: "bn" type: "BN" bottom: "data" top: "out" bn_param { frozen: true } }\n')
    net = messages("tsn").NetParameter()
    net.layer.add(name="bn", type="BN", bottom=["data"], top=["out"]).bn_param.frozen = True  # field 137
    slope, bias, mean, variance = (np.array([[a, b]], f32) for a, b in ((2, 3), (0.5, -1), (1, 2), (4, 0.25)))
    write_caffemodel(with_weights(net, {"bn": [slope, bias, mean, variance]}), tmp_path / "w.caffemodel")
    with pytest.warns(UserWarning, match="read as tsn"):
        loaded = load_net(tmp_path / "net.prototxt", tmp_path / "w.caffemodel")
    x = seeded(1, 2, 3, 3)
    expected = (x - mean.reshape(1, 2, 1, 1)) / np.sqrt(variance.reshape(1, 2, 1, 1) + 1e-5) * slope.reshape(
        1, 2, 1, 1) + bias.reshape(1, 2, 1, 1)
    np.testing.assert_allclose(loaded({"data": x})["out"].detach().numpy(), expected.numpy(), rtol=1e-6)


def test_exports_with_no_faithful_onnx_form_refuse_in_one_line():
    ctx, converted = build("BN", "bn_param { frozen: false }", [(2, 3, 2, 2)], phase="TRAIN", dialect="pspnet")
    with pytest.raises(CaffeCompatError, match=r"^layer 'layer' \(BN\): a BN that is not frozen .* export the TEST net$"):
        onnx_model("BN", ctx, converted, 13)
    ctx, converted = build("Upsample", "upsample_param { upsample_h: 3 upsample_w: 3 }", [(1, 1, 4, 4), (1, 1, 4, 4)],
                           dialect="segnet")
    with pytest.raises(CaffeCompatError, match=r"^layer 'layer' \(Upsample\): a 3x3 top smaller than the 4x4 bottom"):
        onnx_model("Upsample", ctx, converted, 13)
