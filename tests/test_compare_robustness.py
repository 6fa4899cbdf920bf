"""Layers whose top does not depend on their bottom still give Caffe's zero gradient,
`compare` scores every case of a folder even when some break, and chains of in-place
layers get the true derivative (where Caffe's own in-place backward does not)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

from caffe_compat.cli.main import main
from caffe_compat.tools.compare import compare_case
from caffe_compat.graph import build_graph
from caffe_compat.io.schema import messages
from caffe_compat.net import CaffeNet
from layer_harness import build

RNG = np.random.default_rng(3)
INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }\n'


def net_of(prototxt: str) -> CaffeNet:
    net = messages("bvlc").NetParameter()
    text_format.Parse(prototxt, net)
    return CaffeNet(build_graph(net, "TEST"))


def write_case(folder, name, prototxt, arrays):
    (folder / f"{name}.prototxt").write_text(prototxt)
    np.savez(folder / f"{name}.npz", **arrays)


@pytest.mark.parametrize("params,value", [("power_param { scale: 0 shift: 2 power: 3 }", 8.0),
                                          ("power_param { power: 0 scale: 3 }", 1.0)])
def test_a_constant_power_has_a_zero_gradient(params, value):
    _, converted = build("Power", params, [(2, 3)])
    x = torch.tensor([[1.0, -2.0, np.inf], [0.0, np.nan, 5.0]], requires_grad=True)
    top = converted.module(x)
    np.testing.assert_array_equal(top.detach().numpy(), np.full((2, 3), value, np.float32))
    top.backward(torch.ones(2, 3))
    np.testing.assert_array_equal(x.grad.numpy(), np.zeros((2, 3)))


@pytest.mark.parametrize("layer_type,params,value", [("Exp", "exp_param { scale: 0 shift: 1 base: 2 }", 2.0),
                                                     ("Log", "log_param { scale: 0 shift: 4 base: 2 }", 2.0)])
def test_exp_and_log_of_a_constant_have_a_zero_gradient(layer_type, params, value):
    _, converted = build(layer_type, params, [(2, 3)])
    x = torch.tensor(RNG.standard_normal((2, 3)), dtype=torch.float32, requires_grad=True)
    top = converted.module(x)
    np.testing.assert_allclose(top.detach().numpy(), np.full((2, 3), value), rtol=1e-6)
    top.backward(torch.ones(2, 3))
    np.testing.assert_array_equal(x.grad.numpy(), np.zeros((2, 3)))


def test_compare_scores_a_constant_power_under_force_backward(tmp_path):
    prototxt = ("force_backward: true\n" + INPUT + 'layer { name: "p" type: "Power" bottom: "data" top: "p" '
                'power_param { scale: 0 shift: 2 power: 3 } }\n')
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    write_case(tmp_path, "power", prototxt, {"input/data": x, "blob/p": np.full((2, 3), 8, np.float32),
                                             "topdiff/p": RNG.standard_normal((2, 3)).astype(np.float32),
                                             "diff/data": np.zeros((2, 3), np.float32)})
    rows = compare_case(tmp_path / "power.prototxt", None, tmp_path / "power.npz")
    assert [r.key for r in rows] == ["blob/p", "diff/data"] and all(r.ok for r in rows)


def test_compare_survives_a_net_with_nothing_to_differentiate(tmp_path):
    prototxt = INPUT + 'layer { name: "t" type: "Threshold" bottom: "data" top: "t" }\n'
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    write_case(tmp_path, "threshold", prototxt, {"input/data": x, "blob/t": (x > 0).astype(np.float32),
                                                 "topdiff/t": np.ones((2, 3), np.float32),
                                                 "diff/data": np.zeros((2, 3), np.float32)})
    rows = compare_case(tmp_path / "threshold.prototxt", None, tmp_path / "threshold.npz")
    assert all(r.ok for r in rows) and len(rows) == 2


def test_compare_directory_scores_the_cases_after_broken_ones(tmp_path, capsys):
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    # a) an unknown layer type; b) an input that does not fit the net (named with the
    # shape the net was built for); c) a case that passes
    write_case(tmp_path, "a_unknown", INPUT + 'layer { name: "u" type: "Nope" bottom: "data" top: "u" }\n',
               {"input/data": x, "blob/u": x})
    write_case(tmp_path, "b_misfit", INPUT + 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
               'inner_product_param { num_output: 2 } }\n', {"input/data": np.ones((2, 5), np.float32),
                                                              "blob/ip": np.zeros((2, 2), np.float32)})
    write_case(tmp_path, "c_good", INPUT + 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n',
               {"input/data": x, "blob/r": np.maximum(x, 0)})
    assert main(["compare", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert rows["a_unknown"].split()[1] == "(case)" and "FAIL" in rows["a_unknown"]
    assert "unknown layer type 'Nope'" in rows["a_unknown"]
    assert "FAIL" in rows["b_misfit"] and "bottom 'data' is 2x5, but the net was built for 2x3" in rows["b_misfit"]
    assert rows["c_good"].split()[1] == "blob/r" and rows["c_good"].split()[-1] == "ok"
    assert lines[-1] == "1 passed, 2 failed"


def test_a_single_bad_case_still_ends_with_one_clear_line(tmp_path, capsys):
    write_case(tmp_path, "bad", INPUT + 'layer { name: "u" type: "Nope" bottom: "data" top: "u" }\n',
               {"input/data": np.zeros((2, 3), np.float32)})
    assert main(["compare", str(tmp_path / "bad.npz")]) == 2
    assert "unknown layer type 'Nope'" in capsys.readouterr().err


IN_PLACE_CHAIN = INPUT + """
layer { name: "affine" type: "Power" bottom: "data" top: "y" power_param { scale: 0.5 shift: 2 } }
layer { name: "square" type: "Power" bottom: "y" top: "y" power_param { power: 2 } }
layer { name: "log" type: "Log" bottom: "y" top: "y" }
layer { name: "leaky" type: "ReLU" bottom: "y" top: "y" relu_param { negative_slope: 0.1 } }
layer { name: "elu" type: "ELU" bottom: "y" top: "y" elu_param { alpha: 0.7 } }
layer { name: "bnll" type: "BNLL" bottom: "y" top: "y" }
"""


def test_in_place_chains_get_the_true_derivative():
    """Caffe's in-place backward of Power, Log, BNLL, leaky ReLU and ELU reads its
    bottom after the next in-place layer overwrote it; this project differentiates the
    composition itself (a deliberate difference, in the README)."""
    net = net_of(IN_PLACE_CHAIN)
    x = torch.tensor(RNG.standard_normal((2, 3)) * 3, dtype=torch.float32, requires_grad=True)
    first = {"data": x}
    blobs = net.run({"data": x}, first)
    first["y"].retain_grad()
    seed = torch.tensor(RNG.standard_normal((2, 3)), dtype=torch.float32)
    (blobs["y"] * seed).sum().backward()
    # the same functions written out, differentiated by autograd in float64
    y0 = (x.detach().double() * 0.5 + 2).requires_grad_()
    y = F.softplus(F.elu(F.leaky_relu(torch.log(y0 ** 2), 0.1), 0.7))
    (y * seed.double()).sum().backward()
    torch.testing.assert_close(blobs["y"].detach().double(), y.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(first["y"].grad.double(), y0.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), y0.grad * 0.5, rtol=1e-5, atol=1e-6)


def test_a_recorded_blob_the_net_lacks_fails_its_row(tmp_path):
    write_case(tmp_path, "lacking", INPUT + 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n',
               {"input/data": np.zeros((2, 3), np.float32), "blob/elsewhere": np.zeros((2, 3), np.float32)})
    (row,) = compare_case(tmp_path / "lacking.prototxt", None, tmp_path / "lacking.npz")
    assert not row.ok and "no such blob" in row.note


def test_compare_records_the_diff_of_a_dummy_data_top(tmp_path):
    prototxt = """force_backward: true
layer { name: "dummy" type: "DummyData" top: "d" dummy_data_param { shape { dim: 2 dim: 3 }
  data_filler { type: "constant" value: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "d" top: "ip" inner_product_param { num_output: 4
  weight_filler { type: "constant" value: 0.5 } } }
"""
    seed = RNG.standard_normal((2, 4)).astype(np.float32)
    weight = np.full((4, 3), 0.5, np.float32)
    write_case(tmp_path, "dummy", prototxt, {"blob/d": np.full((2, 3), 2, np.float32),
                                             "blob/ip": np.full((2, 4), 3, np.float32), "topdiff/ip": seed,
                                             "diff/d": seed @ weight, "paramdiff/ip/0": seed.T @ np.full((2, 3), 2),
                                             "paramdiff/ip/1": seed.sum(0)})
    rows = compare_case(tmp_path / "dummy.prototxt", None, tmp_path / "dummy.npz")
    assert len(rows) == 5 and all(r.ok for r in rows), [r.format() for r in rows]


def test_a_folder_of_cases_runs_from_that_folder_as_caffe_recorded_it(tmp_path, monkeypatch, capsys):
    from test_layers_more_types import caffe_infogain

    folder = tmp_path / "cases"
    folder.mkdir()
    infogain = RNG.random((3, 3)).astype(np.float32)
    blob = messages("bvlc").BlobProto()
    blob.shape.dim.extend([3, 3])
    blob.data.extend(infogain.reshape(-1).tolist())
    (folder / "H.binaryproto").write_bytes(blob.SerializeToString())
    prototxt = """force_backward: true
layer { name: "in" type: "Input" top: "scores" top: "label"
  input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
layer { name: "loss" type: "InfogainLoss" bottom: "scores" bottom: "label" top: "loss"
  infogain_loss_param { source: "H.binaryproto" } }
"""
    scores = RNG.standard_normal((4, 3)).astype(np.float32)
    label = np.array([0, 2, 1, 2], np.float32)
    loss, diff, _ = caffe_infogain(scores.astype(np.float64), label, infogain.astype(np.float64), 1, None, "VALID")
    write_case(folder, "infogain", prototxt, {"input/scores": scores, "input/label": label,
                                              "blob/loss": np.float32(loss), "diff/scores": diff.astype(np.float32)})
    monkeypatch.chdir(tmp_path)  # not the cases' folder: H.binaryproto is named relative to it
    assert main(["compare", "cases"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "2 passed, 0 failed"


LOSS_WITHOUT_FORCE_BACKWARD = """
layer { name: "in" type: "Input" top: "data" top: "target"
  input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" param { lr_mult: 1 } param { lr_mult: 0 }
  inner_product_param { num_output: 4 weight_filler { type: "constant" value: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss" }
"""


def test_without_force_backward_only_learned_parameters_pull_gradients_as_in_caffe(tmp_path):
    data = RNG.standard_normal((2, 3)).astype(np.float32)
    target = RNG.standard_normal((2, 4)).astype(np.float32)
    ip = data @ np.full((3, 4), 0.5, np.float32)
    ip_diff = (ip - target) / 2  # EuclideanLoss: sum((a - b)^2) / 2N
    zeros = np.zeros_like
    write_case(tmp_path, "noforce", LOSS_WITHOUT_FORCE_BACKWARD, {
        "input/data": data, "input/target": target, "blob/ip": ip, "diff/ip": ip_diff,
        "diff/data": zeros(data), "diff/target": zeros(target),  # Input blobs: no diff without force_backward
        "paramdiff/ip/0": ip_diff.T @ data, "paramdiff/ip/1": np.zeros(4, np.float32)})  # bias: lr_mult 0
    rows = compare_case(tmp_path / "noforce.prototxt", None, tmp_path / "noforce.npz")
    assert len(rows) == 6 and all(r.ok for r in rows), [r.format() for r in rows]


def test_without_force_backward_and_without_a_loss_nothing_gets_a_gradient(tmp_path):
    prototxt = INPUT + ('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                        'inner_product_param { num_output: 2 weight_filler { type: "constant" value: 1 } } }\n')
    data = RNG.standard_normal((2, 3)).astype(np.float32)
    write_case(tmp_path, "noloss", prototxt, {
        "input/data": data, "blob/ip": np.repeat(data.sum(1, keepdims=True), 2, 1),
        "topdiff/ip": np.ones((2, 2), np.float32), "diff/data": np.zeros((2, 3), np.float32),
        "paramdiff/ip/0": np.zeros((2, 3), np.float32), "paramdiff/ip/1": np.zeros(2, np.float32)})
    rows = compare_case(tmp_path / "noloss.prototxt", None, tmp_path / "noloss.npz")
    assert len(rows) == 4 and all(r.ok for r in rows), [r.format() for r in rows]


def test_without_force_backward_data_layer_tops_get_no_diff(tmp_path):
    prototxt = LOSS_WITHOUT_FORCE_BACKWARD.replace(
        'layer { name: "in" type: "Input" top: "data" top: "target"\n  input_param { shape { dim: 2 dim: 3 } '
        'shape { dim: 2 dim: 4 } } }',
        'layer { name: "in" type: "Input" top: "target" input_param { shape { dim: 2 dim: 4 } } }\n'
        'layer { name: "dummy" type: "DummyData" top: "data" dummy_data_param { shape { dim: 2 dim: 3 } '
        'data_filler { type: "constant" value: 1 } } }')
    assert "DummyData" in prototxt
    target = RNG.standard_normal((2, 4)).astype(np.float32)
    ip = np.full((2, 4), 1.5, np.float32)
    write_case(tmp_path, "dummy_noforce", prototxt, {
        "input/target": target, "blob/ip": ip, "diff/ip": (ip - target) / 2,
        "diff/data": np.zeros((2, 3), np.float32)})
    rows = compare_case(tmp_path / "dummy_noforce.prototxt", None, tmp_path / "dummy_noforce.npz")
    assert len(rows) == 3 and all(r.ok for r in rows), [r.format() for r in rows]
