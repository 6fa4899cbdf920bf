"""The converted net's contract: how it is called, what its parameters are called, how
it fails on weights and definitions that don't fit, that it traces, compiles and runs
under autocast, and that `convert` and `compare` keep their promises."""
import shutil

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.converters.artifact import load as load_artifact
from caffe_compat.errors import CaffeCompatError
from caffe_compat.graph import build_graph
from caffe_compat.io.files import read_caffemodel, weights_of
from caffe_compat.io.schema import messages
from caffe_compat.layers import lrn
from caffe_compat.loading import load_net
from caffe_compat.net import CaffeNet
from conftest import REFERENCE, require, run_cli, run_python

INPUT_4D = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }\n'

# Two convolutions sharing their weight "w" (with multipliers on the owner), one with
# its own bias multipliers; Caffe layer names with '/' as GoogLeNet has them.
SHARED = INPUT_4D + """
layer { name: "block/conv" type: "Convolution" bottom: "data" top: "left"
  param { name: "w" lr_mult: 2 decay_mult: 0 } param { lr_mult: 3 decay_mult: 0.5 }
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "block/conv_twin" type: "Convolution" bottom: "data" top: "right"
  param { name: "w" } convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "left" top: "left" }
layer { name: "sum" type: "Eltwise" bottom: "left" bottom: "right" top: "out" eltwise_param { coeff: 1 coeff: -2 } }
"""

CONV = INPUT_4D + """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
"""

DROPOUT = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 8 dim: 4000 } } }
layer { name: "drop" type: "Dropout" bottom: "data" top: "dropped" dropout_param { dropout_ratio: 0.25 } }
"""

TWO_INPUTS = """
layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 2 dim: 5 } } }
layer { name: "b" type: "Input" top: "b" input_param { shape { dim: 2 dim: 5 } } }
layer { name: "diff" type: "Eltwise" bottom: "a" bottom: "b" top: "diff" eltwise_param { coeff: 1 coeff: -1 } }
"""


def net_of(prototxt: str, phase: str = "TEST", weights=None) -> CaffeNet:
    net = messages("bvlc").NetParameter()
    text_format.Parse(prototxt, net)
    return CaffeNet(build_graph(net, phase), weights)


def googlenet_files():
    nets = require(REFERENCE / "nets")
    return nets / "googlenet_deploy.prototxt", nets / "googlenet_deploy.caffemodel"


@pytest.fixture(scope="module")
def googlenet():
    # fold=False: the inference path then equals the per-layer one to the bit, which these tests compare
    return load_net(*googlenet_files(), fold=False)


@pytest.fixture(scope="module")
def image():
    return torch.from_numpy(np.load(googlenet_files()[0].with_suffix(".npz"))["input/data"])


# ---------------------------------------------------------------- calling it

def test_forward_takes_positional_dict_or_named_inputs():
    net = net_of(SHARED)
    x = torch.randn(2, 3, 8, 8)
    positional = net(x)
    assert list(positional) == ["out"]
    for other in (net({"data": x}), net(data=x)):
        assert list(other) == ["out"] and torch.equal(other["out"], positional["out"])


def test_positional_inputs_follow_declaration_order():
    net = net_of(TWO_INPUTS)
    a, b = torch.randn(2, 5), torch.randn(2, 5)
    expected = a - b
    assert torch.equal(net(a, b)["diff"], expected)
    assert torch.equal(net({"b": b, "a": a})["diff"], expected)
    assert torch.equal(net(b=b, a=a)["diff"], expected)
    with pytest.raises(CaffeCompatError, match="missing input blob"):
        net(a)
    with pytest.raises(CaffeCompatError, match="takes 2 inputs"):
        net(a, b, a)


def test_blobs_returns_other_named_blobs():
    net = net_of(SHARED)
    x = torch.randn(2, 3, 8, 8)
    out = net(x, blobs=["left", "right"])
    assert list(out) == ["out", "left", "right"]
    # 'left' was rewritten in place by the ReLU: its final value is returned.
    assert (out["left"] >= 0).all()
    assert torch.allclose(out["out"], out["left"] - 2 * out["right"])
    with pytest.raises(CaffeCompatError, match="no blob.*nowhere"):
        net(x, blobs=["nowhere"])


def test_train_and_eval_switch_dropout():
    torch.manual_seed(0)
    x = torch.rand(8, 4000) + 1
    test_net = net_of(DROPOUT)
    assert not test_net.training
    assert torch.equal(test_net(x)["dropped"], x)
    train_net = net_of(DROPOUT, phase="TRAIN")
    assert train_net.training
    for net in (train_net, test_net.train()):
        dropped = net(x)["dropped"]
        kept = dropped != 0
        # Caffe's TRAIN Dropout scales what it keeps by 1 / (1 - ratio).
        assert torch.allclose(dropped[kept], x[kept] / 0.75)
        assert abs(1 - kept.float().mean().item() - 0.25) < 0.02
    assert torch.equal(test_net.eval()(x)["dropped"], x)


def test_googlenet_eval_is_deterministic_and_train_drops(googlenet, image):
    torch.manual_seed(0)
    with torch.no_grad():
        first = googlenet(image, blobs=["pool5/7x7_s1"])
        assert torch.equal(googlenet(image)["prob"], first["prob"])
        try:
            dropped = googlenet.train()(image, blobs=["pool5/7x7_s1"])["pool5/7x7_s1"]
        finally:
            googlenet.eval()
    # pool5/drop_7x7_s1 works in place on pool5/7x7_s1 with ratio 0.4.
    pooled = first["pool5/7x7_s1"]
    live = pooled != 0
    kept = live & (dropped != 0)
    assert torch.allclose(dropped[kept], pooled[kept] / 0.6)
    assert 0.3 < 1 - kept.sum().item() / live.sum().item() < 0.5


# ---------------------------------------------------------------- parameters

def test_parameter_names_are_valid_caffe_layer_names(googlenet):
    names = dict(googlenet.named_parameters())
    assert "layers.inception_3a_1x1.weight" in names and "layers.inception_3a_1x1.bias" in names
    assert googlenet.layer_names["inception_3a_1x1"] == "inception_3a/1x1"
    assert googlenet.module_names["inception_3a/1x1"] == "inception_3a_1x1"
    _, weights_path = googlenet_files()
    caffe_layers = set(weights_of(read_caffemodel(weights_path)))
    module_names = {name.split(".")[1] for name in googlenet.state_dict()}
    assert {googlenet.layer_names[m] for m in module_names} == caffe_layers
    assert all(m.isidentifier() for m in googlenet.layer_names)


def test_clashing_names_stay_apart_and_reverse():
    net = net_of(INPUT_4D + """
        layer { name: "a/b" type: "ReLU" bottom: "data" top: "x" }
        layer { name: "a_b" type: "ReLU" bottom: "x" top: "y" }
        layer { name: "1x1" type: "ReLU" bottom: "y" top: "z" }""")
    assert net.layer_names == {"a_b": "a/b", "a_b_2": "a_b", "_1x1": "1x1"}
    assert {caffe: module for module, caffe in net.layer_names.items()} == net.module_names


def test_shared_params_are_one_parameter_with_one_gradient_sum():
    net = net_of(SHARED)
    left, right = net.layers["block_conv"], net.layers["block_conv_twin"]
    assert left.weight is right.weight
    assert [n for n, _ in net.named_parameters()] == [
        "layers.block_conv.weight", "layers.block_conv.bias", "layers.block_conv_twin.bias"]
    # The same net unshared, with the same weights: the shared gradient is the sum of both.
    unshared = net_of(SHARED.replace('param { name: "w" lr_mult: 2 decay_mult: 0 }', "")
                      .replace('param { name: "w" }', ""), weights=net.caffe_weights())
    x = torch.randn(2, 3, 8, 8)
    net(x)["out"].square().sum().backward()
    unshared(x)["out"].square().sum().backward()
    expected = unshared.layers["block_conv"].weight.grad + unshared.layers["block_conv_twin"].weight.grad
    torch.testing.assert_close(left.weight.grad, expected)
    # Saved back as Caffe does: each layer carries the shared blob.
    weights = net.caffe_weights()
    np.testing.assert_array_equal(weights["block/conv"][0], weights["block/conv_twin"][0])


def test_param_multipliers_carry_lr_and_decay_mult():
    assert net_of(SHARED).param_multipliers == {
        "layers.block_conv.weight": (2.0, 0.0),
        "layers.block_conv.bias": (3.0, 0.5),
        "layers.block_conv_twin.bias": (1.0, 1.0),
    }


# ---------------------------------------------------------------- clear errors

def test_blob_shape_mismatch_names_layer_blob_and_shapes():
    with pytest.raises(CaffeCompatError) as err:
        net_of(CONV, weights={"conv": [np.zeros((4, 3, 5, 5), np.float32), np.zeros(4, np.float32)]})
    message = str(err.value)
    assert "'conv'" in message and "blob 0" in message
    assert "(4, 3, 5, 5)" in message and "(4, 3, 3, 3)" in message


def test_wrong_blob_count_is_an_error():
    with pytest.raises(CaffeCompatError, match=r"'conv'.*1 blobs.*needs 2"):
        net_of(CONV, weights={"conv": [np.zeros((4, 3, 3, 3), np.float32)]})


def test_bottom_of_the_wrong_rank_is_an_error():
    with pytest.raises(CaffeCompatError, match=r"'pool'.*bottom 'data' has rank 2"):
        net_of("""
            layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
            layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { kernel_size: 2 } }""")


def test_unsupported_parameter_value_is_an_error():
    with pytest.raises(CaffeCompatError, match=r"'pool'.*STOCHASTIC"):
        net_of(INPUT_4D + """
            layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
                    pooling_param { pool: STOCHASTIC kernel_size: 2 } }""")


def test_unknown_layer_type_says_how_to_register_one():
    with pytest.raises(CaffeCompatError) as err:
        net_of(INPUT_4D + 'layer { name: "odd" type: "Frobnicate" bottom: "data" top: "odd" }')
    message = str(err.value)
    assert "'odd'" in message and "'Frobnicate'" in message
    assert "caffe_compat.layers.register('Frobnicate')" in message


# ---------------------------------------------------------------- tracing, compiling, autocast

def test_fx_symbolic_trace_gives_equal_outputs(googlenet, image):
    small = net_of(SHARED)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(torch.fx.symbolic_trace(small)(x)["out"], small(x)["out"])
    traced = torch.fx.symbolic_trace(googlenet)
    with torch.no_grad():
        assert torch.equal(traced(image)["prob"], googlenet(image)["prob"])


def test_torch_compile_gives_equal_outputs(googlenet, image, monkeypatch):
    # Inductor's C++ build takes minutes on a small CPU machine: the eager and
    # aot_eager backends still trace the whole net through dynamo. Traced, LRN is its
    # PyTorch form (not the C kernel, whose rounding differs): eager runs it too here.
    monkeypatch.setattr(lrn, "_kernel", lambda: None)
    small = net_of(SHARED)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(torch.compile(small, backend="aot_eager", fullgraph=True)(x)["out"],
                               small(x)["out"], rtol=0, atol=0)
    with torch.no_grad():
        compiled = torch.compile(googlenet, backend="eager", fullgraph=True)(image)["prob"]
        assert torch.equal(compiled, googlenet(image)["prob"])


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref).abs().max() / ref.abs().max()).item()


def test_autocast_bfloat16_on_cpu(googlenet, image):
    with torch.no_grad():
        reference = googlenet(image, blobs=["loss3/classifier"])["loss3/classifier"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = googlenet(image, blobs=["loss3/classifier"])
    logits = out["loss3/classifier"]
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert _relative_error(logits, reference) < 0.05
    assert torch.isfinite(out["prob"]).all()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_device_float32_and_autocast_float16(image, device):
    net = load_net(*googlenet_files())
    with torch.no_grad():
        reference = net(image, blobs=["loss3/classifier"])["loss3/classifier"]
        net.to(device)
        moved = image.to(device)
        assert _relative_error(net(moved, blobs=["loss3/classifier"])["loss3/classifier"].cpu(), reference) < 1e-4
        with torch.autocast(device, dtype=torch.float16):
            logits = net(moved, blobs=["loss3/classifier"])["loss3/classifier"]
    assert logits.dtype == torch.float16
    assert _relative_error(logits.float().cpu(), reference) < 0.02


# ---------------------------------------------------------------- convert

def _assert_same_weights(ours_path, original_path):
    ours, original = read_caffemodel(ours_path), read_caffemodel(original_path)
    assert ours.dialect == original.dialect
    ours_weights, original_weights = weights_of(ours), weights_of(original)
    assert list(ours_weights) == list(original_weights)
    for layer, arrays in original_weights.items():
        assert len(ours_weights[layer]) == len(arrays), layer
        for mine, theirs in zip(ours_weights[layer], arrays):
            assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs), layer


def test_convert_round_trip_googlenet(tmp_path, googlenet, image):
    prototxt, weights = googlenet_files()
    model = tmp_path / "googlenet.pt"
    result = run_cli("convert", prototxt, weights, "-o", model, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = torch.load(model, weights_only=True)
    assert payload["phase"] == "TEST" and payload["dialect"] == "bvlc"
    assert set(payload["weights"]) == set(weights_of(read_caffemodel(weights)))

    import caffe_compat
    with torch.no_grad():
        expected = googlenet(image)["prob"]
        for net in (load_artifact(model), caffe_compat.load(model)):
            net.fold = False  # as the fixture's: the same arithmetic, so the same bits
            assert torch.equal(net(image)["prob"], expected)

    back = tmp_path / "back.caffemodel"
    result = run_cli("convert", model, "-o", back, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _assert_same_weights(back, weights)


def test_convert_round_trip_keeps_the_lifted_dialect(tmp_path):
    folder = require(REFERENCE / "nets" / "solver")
    model, back = tmp_path / "lifted.pt", tmp_path / "back.caffemodel"
    result = run_cli("convert", folder / "train.prototxt", folder / "init.caffemodel", "--phase", "TRAIN",
                     "-o", model, cwd=folder)
    assert result.returncode == 0, result.stderr
    payload = torch.load(model, weights_only=True)
    assert payload["dialect"] == "lifted" and payload["phase"] == "TRAIN"
    result = run_cli("convert", model, "-o", back, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _assert_same_weights(back, folder / "init.caffemodel")
    # The fork's loss parameter, at the field number BVLC uses for another message.
    loss = next(layer for layer in read_caffemodel(back).net.layer if layer.name == "loss")
    assert loss.lifted_struct_sim_softmax_loss_param.margin == 1


def test_import_stays_torch_free_and_load_is_lazy():
    code = ("import sys, caffe_compat; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(caffe_compat.load)")
    result = run_python(code)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- compare

COMPARE_CASES = ("conv_basic", "pool_max_ceil", "lrn_across")


def _copy_cases(folder):
    source = require(REFERENCE / "layers")
    folder.mkdir()
    for case in COMPARE_CASES:
        for path in source.glob(f"{case}.*"):
            shutil.copy(path, folder)
    return folder


def _compared_keys(folder):
    keys = []
    for case in COMPARE_CASES:
        with np.load(folder / f"{case}.npz") as ref:
            keys += [(case, k) for k in ref.files if k.startswith(("blob/", "diff/", "paramdiff/"))]
    return keys


def test_compare_directory_prints_one_row_per_key(tmp_path):
    folder = _copy_cases(tmp_path / "cases")
    result = run_cli("compare", folder, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    header, *rows, summary = result.stdout.strip().splitlines()
    assert header.split() == ["case", "key", "shape", "max", "abs", "err", "rel", "err", "status"]
    keys = _compared_keys(folder)
    assert sorted((r.split()[0], r.split()[1]) for r in rows) == sorted(keys)
    assert all(r.split()[-1] == "ok" for r in rows)
    assert summary == f"{len(keys)} passed, 0 failed"


def test_compare_directory_fails_on_a_tampered_reference(tmp_path):
    folder = _copy_cases(tmp_path / "cases")
    path = folder / "conv_basic.npz"
    with np.load(path) as ref:
        arrays = dict(ref)
    arrays["blob/conv"] = arrays["blob/conv"] + 1.0
    np.savez(path, **arrays)
    result = run_cli("compare", folder, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = result.stdout.strip().splitlines()[1:-1]
    failed = [r.split()[:2] for r in rows if r.split()[-1] == "FAIL"]
    assert failed == [["conv_basic", "blob/conv"]]
    assert result.stdout.strip().splitlines()[-1] == f"{len(rows) - 1} passed, 1 failed"


PROPAGATE_DOWN = INPUT_4D + """
layer { name: "target" type: "Input" top: "target" input_param { shape { dim: 2 dim: 4 dim: 4 dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" %s
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "conv2" bottom: "target" top: "loss" }
"""


@pytest.mark.parametrize("flag", ["", "propagate_down: true", "propagate_down: false"])
def test_propagate_down_false_stops_the_gradient_at_that_bottom(flag):
    torch.manual_seed(0)
    net = net_of(PROPAGATE_DOWN % flag, phase="TRAIN")
    data = torch.randn(2, 3, 8, 8, requires_grad=True)
    net.loss(net(data, torch.randn(2, 4, 4, 4))).backward()
    conv1, conv2 = (net.layers[name] for name in ("conv1", "conv2"))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv2.parameters())
    if flag == "propagate_down: false":  # conv2's own weights learn; nothing below it gets a diff
        assert all(p.grad is None for p in conv1.parameters()) and data.grad is None
    else:
        assert all(p.grad.abs().sum() > 0 for p in conv1.parameters()) and data.grad.abs().sum() > 0


def test_propagate_down_given_for_some_bottoms_only_is_refused():
    text = (PROPAGATE_DOWN % "").replace('bottom: "target" top: "loss"',
                                         'bottom: "target" top: "loss" propagate_down: false')
    with pytest.raises(CaffeCompatError, match=r"layer 'loss'.*propagate_down is given 1 time\(s\) for 2 bottom"):
        net_of(text, phase="TRAIN")


def test_propagate_down_stops_one_of_two_bottoms_that_are_the_same_blob():
    # Caffe's flags are per bottom, not per blob: conv1 + conv1 with the second stopped
    # gives conv1 the gradient of one term, half that of both.
    text = INPUT_4D + """
    layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
      convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "xavier" } } }
    layer { name: "twice" type: "Eltwise" bottom: "conv1" bottom: "conv1" top: "twice" %s }
    """
    grads = []
    for flags in ("", "propagate_down: true propagate_down: false"):
        torch.manual_seed(0)
        net = net_of(text % flags)
        net(torch.ones(2, 3, 8, 8))["twice"].sum().backward()
        grads.append(net.layers["conv1"].weight.grad)
    torch.testing.assert_close(grads[1], grads[0] / 2)


def test_an_input_of_another_size_names_the_layer_and_the_expected_shape():
    """An InnerProduct's weights fit one input size: another size is one line naming the
    layer and the shape the net expects, not torch's matrix-product message."""
    net = net_of(INPUT_4D + """
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 3 } }
""")
    built = tuple(net.blob_shapes["data"])
    assert net(torch.zeros(5, *built[1:]))["fc"].shape == (5, 3)  # any batch size
    wrong = (2, built[1], built[2] + 1, built[3])
    with pytest.raises(CaffeCompatError, match=rf"layer 'fc' of net .*: bottom 'data' is {'x'.join(map(str, wrong))}, "
                                               rf"but the net was built for .*; it expects inputs 'data' N"):
        net(torch.zeros(wrong))


def test_layers_named_like_module_attributes_build():
    """'train', 'double', 'keys' name methods of nn.ModuleDict: such layers still build and
    keep their Caffe names (found by a reviewer: a KeyError from torch)."""
    net = net_of(INPUT_4D + """
layer { name: "train" type: "ReLU" bottom: "data" top: "a" }
layer { name: "double" type: "Power" bottom: "a" top: "b" power_param { scale: 2 } }
layer { name: "keys" type: "Power" bottom: "b" top: "c" power_param { shift: 1 } }
""")
    x = torch.randn(net.blob_shapes["data"])
    assert torch.equal(net(x)["c"], torch.relu(x) * 2 + 1)
    assert sorted(net.layer_names.values()) == ["double", "keys", "train"]
