"""Every fixture net through `convert -o model.py` and `convert -o model.pt2`: the generated
module and the exported program give the CaffeNet's outputs to the bit on the fixture's
inputs (the module's gradients too, where the fixture has Caffe's top diffs); a net that
cannot be written is refused in one line naming the layer and its type. The CaffeNet runs
the PyTorch LRN, as both targets do (test_source_export checks it against the C kernel).
The public nets are checked as model.py and as programs, with the fillers' weights (each
BatchNorm's variance 1, so that no output overflows)."""
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from caffe_compat.cli.main import main
from caffe_compat.io.files import read_prototxt, with_weights, write_caffemodel
from caffe_compat.layers import lrn
from caffe_compat.loading import load_net

from conftest import FIXTURES, PAPER_MODEL, REFERENCE, run_python

PUBLIC = FIXTURES / "public-nets"
TRAIN_VAL = PAPER_MODEL / "train_val_googlenet_finetune_liftedstructsim_softmax_pair_m128_multilabel_embed64.prototxt"
PUBLIC_NETS = {"densenet-121": "DenseNet_121", "mobilenet-v2": "mobilenet_v2_deploy",
               "shufflenet-v2": "shufflenet_v2_1x_deploy", "se-resnet-50": "SE-ResNet-50",
               "pspnet50-ade20k": "pspnet50_ADE20K_473", "segnet-basic": "segnet_basic_camvid",
               "mobilenet-ssd": "MobileNetSSD_deploy", "res10-face": "opencv_res10_face_deploy",
               "faster-rcnn-vgg16": "faster_rcnn_vgg16_voc_test"}


def _reference_cases():
    """(name, prototxt, weights, options) of the nets Caffe ran, their inputs in the npz beside them."""
    stems = [REFERENCE / "nets" / "googlenet_deploy", REFERENCE / "nets" / "v1_legacy" / "v1"]
    for folder in (REFERENCE / "layers", REFERENCE / "forks" / "layers", REFERENCE / "forks" / "ssd"):
        stems += sorted(p.with_suffix("") for p in folder.glob("*.prototxt"))
    return [(stem.name, stem.with_suffix(".prototxt"), stem.with_suffix(".caffemodel"), []) for stem in stems]


CASES = _reference_cases() + [
    ("paper_extract", PAPER_MODEL / "extract_googlenet_ebay_feature_embed64.prototxt", None, ["--random-init"]),
    ("paper_train", TRAIN_VAL, None, ["--random-init", "--phase", "TRAIN", "--input-shape", "data=4,3,227,227",
                                      "--input-shape", "label=4"])]


def _net(proto, weights, options):
    """The CaffeNet the conversion built: --random-init draws the fillers with seed 0."""
    phase = "TRAIN" if "TRAIN" in options else "TEST"
    shapes = {o.split("=")[0]: tuple(int(d) for d in o.split("=")[1].split(",")) for o in options if "=" in o}
    torch.manual_seed(0)
    return load_net(proto, weights, phase=phase, input_shapes=shapes or None, fold=False).eval()


def _inputs(net, weights, proto, requires_grad=False):
    if weights is not None and proto.with_suffix(".npz").exists():  # a reference case: Caffe's inputs
        ref = np.load(proto.with_suffix(".npz"))
        inputs = [torch.from_numpy(ref[f"input/{name}"]) for name in net.input_names]
    else:  # images, and labels of two classes for a loss
        generator = torch.Generator().manual_seed(0)
        inputs = [torch.rand(net.blob_shapes[name], generator=generator) * 255 if len(net.blob_shapes[name]) > 1
                  else torch.arange(net.blob_shapes[name][0]).remainder(2).float() for name in net.input_names]
    return [x.requires_grad_(requires_grad and x.dim() > 1) for x in inputs]


def _convert(proto, weights, options, out, capsys):
    code = main(["convert", str(proto), *([str(weights)] if weights else []), *options, "-o", str(out)])
    assert code == 0, capsys.readouterr().err


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_source(path: Path):
    """The generated file: lines of at most 120 characters, nothing pyflakes reports (where installed)."""
    text = path.read_text()
    assert max(len(line) for line in text.splitlines()) <= 120
    if importlib.util.find_spec("pyflakes") is not None:
        from pyflakes.api import check
        from pyflakes.reporter import Reporter

        report = io.StringIO()
        assert check(text, path.name, Reporter(report, report)) == 0, report.getvalue()


def _source_matches(proto, weights, options, tmp_path, capsys):
    _convert(proto, weights, options, tmp_path / "model.py", capsys)
    _check_source(tmp_path / "model.py")
    model = _import(tmp_path / "model.py").load()
    net = _net(proto, weights, options)
    has_diffs = (weights is not None and proto.with_suffix(".npz").exists()
                 and any(k.startswith("topdiff/") for k in np.load(proto.with_suffix(".npz"))))
    inputs = _inputs(net, weights, proto, requires_grad=has_diffs)
    twins = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    expected = net(*inputs)
    ours = model(*twins)
    ours = ours if isinstance(ours, tuple) else (ours,)
    assert len(ours) == len(expected)
    for value, blob in zip(ours, net.output_names):
        torch.testing.assert_close(value, expected[blob], rtol=0, atol=0, equal_nan=True, msg=blob)
    if not has_diffs:
        return
    ref = np.load(proto.with_suffix(".npz"))
    for value, blob in zip(ours, net.output_names):
        if value.requires_grad:  # a loss's diff is its weight, 1
            diff = torch.from_numpy(ref[f"topdiff/{blob}"]) if f"topdiff/{blob}" in ref else torch.ones_like(value)
            expected[blob].backward(diff, retain_graph=True)
            value.backward(diff, retain_graph=True)
    for theirs, mine in zip(inputs, twins):
        assert (theirs.grad is None and mine.grad is None) or torch.equal(theirs.grad, mine.grad)
    their_params = dict(net.named_parameters())
    for key, param in model.named_parameters():
        layer, attr = key.rsplit(".", 1)
        other = their_params[f"layers.{layer}.{attr}"].grad
        assert (param.grad is None and other is None) or torch.equal(param.grad, other), key


@pytest.mark.parametrize("name, proto, weights, options", CASES, ids=[case[0] for case in CASES])
def test_model_py_gives_the_caffenets_outputs(name, proto, weights, options, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lrn, "_kernel_applies", lambda x, size: False)
    _source_matches(proto, weights, options, tmp_path, capsys)


@pytest.mark.parametrize("name, proto, weights, options", CASES, ids=[case[0] for case in CASES])
def test_model_pt2_gives_the_caffenets_outputs(name, proto, weights, options, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lrn, "_kernel_applies", lambda x, size: False)
    _convert(proto, weights, options, tmp_path / "model.pt2", capsys)
    program = torch.export.load(tmp_path / "model.pt2").module()
    net = _net(proto, weights, options)
    inputs = _inputs(net, weights, proto)
    with torch.no_grad():
        expected, ours = net(*inputs), program(*inputs)
    assert list(ours) == list(expected)
    for blob, value in ours.items():
        torch.testing.assert_close(value, expected[blob], rtol=0, atol=0, equal_nan=True, msg=blob)


def _public_weights(proto: Path, path: Path) -> Path:
    """The fillers' weights (seed 0) with each BatchNorm's variance and factor 1: the fillers' zeros
    make every BatchNorm multiply by 1 / sqrt(eps), about 316, and a deep net's outputs overflow to NaN."""
    net = _net(proto, None, [])
    weights = net.caffe_weights()
    for layer in net.graph.layers:
        if layer.type == "BatchNorm":
            weights[layer.name][1][...] = 1
            weights[layer.name][2][...] = 1
    write_caffemodel(with_weights(read_prototxt(proto).net, weights), path)
    return path


@pytest.mark.parametrize("name", sorted(PUBLIC_NETS))
def test_public_nets_model_py_gives_the_caffenets_outputs(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lrn, "_kernel_applies", lambda x, size: False)
    proto = PUBLIC / f"{PUBLIC_NETS[name]}.prototxt"
    _source_matches(proto, _public_weights(proto, tmp_path / "weights.caffemodel"), [], tmp_path, capsys)


# The public nets as programs. The SSD nets' filler weights tie their scores at the keep_top_k cut,
# where the program's choice is not the fork's std::sort: test_export_program checks MobileNet-SSD
# with its scores' weights scaled down.
PUBLIC_PROGRAMS = ("densenet-121", "faster-rcnn-vgg16", "mobilenet-v2", "pspnet50-ade20k", "se-resnet-50",
                   "segnet-basic", "shufflenet-v2")


@pytest.mark.parametrize("name", PUBLIC_PROGRAMS)
def test_public_nets_model_pt2(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lrn, "_kernel_applies", lambda x, size: False)  # SegNet normalises its input with LRN
    proto = PUBLIC / f"{PUBLIC_NETS[name]}.prototxt"
    weights = _public_weights(proto, tmp_path / "weights.caffemodel")
    _convert(proto, weights, [], tmp_path / "model.pt2", capsys)
    program = torch.export.load(tmp_path / "model.pt2").module()
    net = _net(proto, weights, [])
    inputs = _inputs(net, weights, proto)
    if "im_info" in net.input_names:  # Faster R-CNN's image size and scale: some of its proposals pass min_size
        inputs[net.input_names.index("im_info")] = torch.tensor([[*inputs[0].shape[-2:], 1.0]])
    with torch.no_grad():
        expected, ours = net(*inputs), program(*inputs)
    assert list(ours) == list(expected) and all(len(value) for value in expected.values())
    for blob, value in ours.items():
        assert torch.isfinite(value).all(), blob
        assert torch.equal(value, expected[blob]), blob


NEAREST_UPSAMPLE = """name: "yolo_upsample"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } } }
layer { name: "up" type: "Upsample" bottom: "data" top: "up" upsample_param { scale: 3 } }
"""


def test_nearest_upsample_gives_the_caffenets_outputs_and_gradients(tmp_path, capsys):
    """The YOLO forks' one-bottom Upsample, which no Caffe fixture has."""
    (tmp_path / "net.prototxt").write_text(NEAREST_UPSAMPLE)
    _source_matches(tmp_path / "net.prototxt", None, ["--random-init"], tmp_path, capsys)
    model = _import(tmp_path / "model.py").load()
    x = torch.rand(2, 3, 4, 5, requires_grad=True)
    twin = x.detach().clone().requires_grad_()
    diff = torch.rand(2, 3, 12, 15)
    _net(tmp_path / "net.prototxt", None, [])(x)["up"].backward(diff)
    model(twin).backward(diff)
    assert torch.equal(x.grad, twin.grad)


FILLERS = 'weight_filler { type: "uniform" min: -0.5 max: 0.5 } bias_filler { type: "uniform" min: -0.5 max: 0.5 }'
RECURRENT_INPUTS = """
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 dim: 5 } } }
layer { name: "cont" type: "Input" top: "cont" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "static" type: "Input" top: "static" input_param { shape { dim: 3 dim: 2 } } }
layer { name: "h0" type: "Input" top: "h0" input_param { shape { dim: 1 dim: 3 dim: 6 } } }
layer { name: "c0" type: "Input" top: "c0" input_param { shape { dim: 1 dim: 3 dim: 6 } } }
"""
RECURRENT_NETS = {
    "lstm_static": f"""layer {{ name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" bottom: "static" top: "h"
        recurrent_param {{ num_output: 6 {FILLERS} }} }}""",
    "lstm_exposed": f"""layer {{ name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" bottom: "h0" bottom: "c0"
        top: "h" top: "hT" top: "cT" recurrent_param {{ num_output: 6 expose_hidden: true {FILLERS} }} }}""",
    "rnn": f"""layer {{ name: "rnn" type: "RNN" bottom: "x" bottom: "cont" top: "o"
        recurrent_param {{ num_output: 6 {FILLERS} }} }}""",
    "rnn_static_exposed": f"""layer {{ name: "rnn" type: "RNN" bottom: "x" bottom: "cont" bottom: "static" bottom: "h0"
        top: "o" top: "hT" recurrent_param {{ num_output: 6 expose_hidden: true {FILLERS} }} }}""",
    "lstm_unit": """layer { name: "gates" type: "InnerProduct" bottom: "h0" top: "gates"
        inner_product_param { num_output: 24 axis: 2 weight_filler { type: "gaussian" } } }
        layer { name: "cont0" type: "Slice" bottom: "cont" top: "cont0" top: "rest"
        slice_param { axis: 0 slice_point: 1 } }
        layer { name: "unit" type: "LSTMUnit" bottom: "c0" bottom: "gates" bottom: "cont0" top: "c1" top: "h1" }""",
}


@pytest.mark.parametrize("case", sorted(RECURRENT_NETS))
def test_recurrent_layers_give_the_caffenets_outputs_and_gradients(case, tmp_path):
    """Two forward passes (the state carried from one to the next where it is not an input), a
    stream restarted by cont 0, and the gradients of the inputs and weights."""
    proto = tmp_path / "net.prototxt"
    proto.write_text(f'name: "{case}"\n{RECURRENT_INPUTS}{RECURRENT_NETS[case]}\n')
    assert main(["convert", str(proto), "--random-init", "-o", str(tmp_path / "model.py")]) == 0
    _check_source(tmp_path / "model.py")
    model = _import(tmp_path / "model.py").load().train()
    net = _net(proto, None, []).train()
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        inputs = [torch.rand(net.blob_shapes[name], generator=generator) - 0.5 for name in net.input_names]
        inputs[net.input_names.index("cont")] = torch.tensor([[0.0, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 1]])
        inputs = [x.requires_grad_(name != "cont") for x, name in zip(inputs, net.input_names)]
        twins = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        expected, ours = net(*inputs), model(*twins)
        ours = ours if isinstance(ours, tuple) else (ours,)
        for value, blob in zip(ours, net.output_names):
            assert torch.equal(value, expected[blob]), blob
            if value.requires_grad:
                diff = torch.rand(value.shape, generator=generator)
                expected[blob].backward(diff, retain_graph=True)
                value.backward(diff, retain_graph=True)
        for theirs, mine in zip(inputs, twins):
            assert (theirs.grad is None and mine.grad is None) or torch.equal(theirs.grad, mine.grad)
    their_params = dict(net.named_parameters())
    for key, param in model.named_parameters():
        layer, attr = key.rsplit(".", 1)
        assert torch.equal(param.grad, their_params[f"layers.{layer}.{attr}"].grad), key


def _input(name, *dims):
    shape = "".join(f" dim: {d}" for d in dims)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{{shape} }} }} }}\n'


SCORES = torch.tensor([[0.5, -2.0, 3.0, 0.0, 1.0], [40.0, -40.0, 0.2, 0.3, -0.1],
                       [-1.0, 2.0, 2.0, -3.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
LABELS = torch.tensor([2.0, 0.0, 4.0, 1.0])
IMAGE = torch.linspace(-3, 3, 2 * 3 * 7 * 9).reshape(2, 3, 7, 9).sin()
# name -> (layers after the inputs, {input: value}, the inputs that get gradients)
INLINE_NETS = {
    "sigmoid_cross_entropy": ('layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" '
                              'top: "loss" }', {"x": SCORES, "t": (SCORES > 0).float()}, {"x"}),
    "sigmoid_cross_entropy_valid": ('layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" '
                                    'top: "loss" loss_param { ignore_label: -1 normalization: VALID } }',
                                    {"x": SCORES, "t": torch.where(SCORES < -1, -1.0, (SCORES > 0).float())}, {"x"}),
    "hinge_l1": ('layer { name: "loss" type: "HingeLoss" bottom: "x" bottom: "label" top: "loss" }',
                 {"x": SCORES, "label": LABELS}, {"x"}),
    "hinge_l2": ('layer { name: "loss" type: "HingeLoss" bottom: "x" bottom: "label" top: "loss" '
                 'hinge_loss_param { norm: L2 } }', {"x": SCORES, "label": LABELS}, {"x"}),
    "multinomial_logistic": ('layer { name: "loss" type: "MultinomialLogisticLoss" bottom: "x" bottom: "label" '
                             'top: "loss" }', {"x": torch.softmax(SCORES, 1), "label": LABELS}, {"x"}),
    "infogain": ('layer { name: "loss" type: "InfogainLoss" bottom: "x" bottom: "label" bottom: "h" top: "loss" '
                 'top: "prob" loss_param { ignore_label: 1 } }',
                 {"x": SCORES, "label": LABELS, "h": torch.arange(25.0).reshape(5, 5) / 25}, {"x"}),
    "filter": ('layer { name: "pick" type: "Filter" bottom: "x" bottom: "sel" top: "picked" }',
               {"x": SCORES, "sel": torch.tensor([[1.0], [0.0], [1.0], [1.0]])}, {"x"}),
    "batch_reindex": ('layer { name: "pick" type: "BatchReindex" bottom: "x" bottom: "label" top: "picked" }',
                      {"x": SCORES, "label": torch.tensor([3.0, 0.0, 3.0, 1.0])}, {"x"}),
    "psroi_pooling": ('layer { name: "ps" type: "PSROIPooling" bottom: "maps" bottom: "rois" top: "ps" '
                      'psroi_pooling_param { spatial_scale: 0.5 output_dim: 2 group_size: 2 } }',
                      {"maps": torch.linspace(-2, 2, 2 * 8 * 6 * 7).reshape(2, 8, 6, 7).cos(),
                       "rois": torch.tensor([[0.0, 1, 1, 9, 7], [1, 0, 2, 13, 11], [1, 4.4, 3.6, 4.6, 3.4]])},
                      {"maps"}),
    "im2col": ('layer { name: "cols" type: "Im2col" bottom: "image" top: "cols" convolution_param { kernel_h: 2 '
               'kernel_w: 3 stride: 2 pad: 1 dilation: 2 } }', {"image": IMAGE}, {"image"}),
    "spp_max": ('layer { name: "spp" type: "SPP" bottom: "image" top: "spp" spp_param { pyramid_height: 3 } }',
                {"image": IMAGE}, {"image"}),
    "spp_ave_one_level": ('layer { name: "spp" type: "SPP" bottom: "image" top: "spp" spp_param { pyramid_height: 1 '
                          'pool: AVE } }', {"image": IMAGE}, {"image"}),
    "spp_ave": ('layer { name: "spp" type: "SPP" bottom: "image" top: "spp" spp_param { pyramid_height: 3 '
                'pool: AVE } }', {"image": IMAGE}, {"image"}),
    "parameter": ('layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 4 dim: 5 } } }\n'
                  'layer { name: "sum" type: "Eltwise" bottom: "x" bottom: "p" top: "sum" }', {"x": SCORES}, {"x"}),
    "dummy_constant": ('layer { name: "d" type: "DummyData" top: "d" top: "e" dummy_data_param { shape { dim: 4 '
                       'dim: 5 } data_filler { type: "constant" value: 0.25 } } }\n'
                       'layer { name: "sum" type: "Eltwise" bottom: "x" bottom: "d" bottom: "e" top: "sum" }',
                       {"x": SCORES}, {"x"}),
}


@pytest.mark.parametrize("case", sorted(INLINE_NETS))
def test_inline_nets_give_the_caffenets_outputs_and_gradients(case, tmp_path):
    """The layer types no Caffe fixture has, in small nets."""
    layers, values, differentiated = INLINE_NETS[case]
    proto = tmp_path / "net.prototxt"
    proto.write_text(f'name: "{case}"\n' + "".join(_input(name, *value.shape) for name, value in values.items())
                     + layers + "\n")
    assert main(["convert", str(proto), "--random-init", "-o", str(tmp_path / "model.py")]) == 0
    _check_source(tmp_path / "model.py")
    model = _import(tmp_path / "model.py").load()
    net = _net(proto, None, [])
    inputs = [values[name].clone().requires_grad_(name in differentiated) for name in net.input_names]
    twins = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    expected, ours = net(*inputs), model(*twins)
    ours = ours if isinstance(ours, tuple) else (ours,)
    for value, blob in zip(ours, net.output_names):
        assert torch.equal(value, expected[blob]), blob
        if value.requires_grad:
            diff = torch.linspace(0.5, 1.5, value.numel()).reshape(value.shape)
            expected[blob].backward(diff, retain_graph=True)
            value.backward(diff, retain_graph=True)
    for theirs, mine in zip(inputs, twins):
        assert (theirs.grad is None and mine.grad is None) or torch.equal(theirs.grad, mine.grad)


def test_infogain_matrix_from_its_file_is_saved_with_the_weights(tmp_path):
    from caffe_compat.io.schema import messages

    blob = messages("bvlc").BlobProto()
    blob.shape.dim.extend([5, 5])
    blob.data.extend((torch.arange(25.0) / 25).tolist())
    (tmp_path / "H.binaryproto").write_bytes(blob.SerializeToString())
    proto = tmp_path / "net.prototxt"
    proto.write_text('name: "infogain_file"\n' + _input("x", 4, 5) + _input("label", 4)
                     + 'layer { name: "loss" type: "InfogainLoss" bottom: "x" bottom: "label" top: "loss" '
                       f'infogain_loss_param {{ source: "{tmp_path / "H.binaryproto"}" }} }}\n')
    assert main(["convert", str(proto), "--random-init", "-o", str(tmp_path / "model.py")]) == 0
    (tmp_path / "H.binaryproto").unlink()  # the file's matrix travels in model.pth
    model = _import(tmp_path / "model.py").load()
    assert torch.equal(model.loss.infogain, torch.arange(25.0) / 25)
    x, twin = SCORES.clone().requires_grad_(), SCORES.clone().requires_grad_()
    (tmp_path / "H.binaryproto").write_bytes(blob.SerializeToString())
    expected = _net(proto, None, [])(x, LABELS)["loss"]
    ours = model(twin, LABELS)
    assert torch.equal(ours, expected)
    expected.backward()
    ours.backward()
    assert torch.equal(x.grad, twin.grad)


def test_a_randomly_refilled_dummy_data_is_refused_saying_why(tmp_path, capsys):
    proto = tmp_path / "net.prototxt"
    proto.write_text('name: "noise"\nlayer { name: "noise" type: "DummyData" top: "noise" dummy_data_param { '
                     'shape { dim: 2 dim: 3 } data_filler { type: "gaussian" } } }\n')
    assert main(["convert", str(proto), "--random-init", "-o", str(tmp_path / "model.py")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "layer 'noise' (DummyData)" in err
    assert "drawn anew by its random filler at every pass" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.prototxt"]


@pytest.mark.parametrize("case", ["roipool_00", "roipool_01"])
def test_roi_pooling_gradient_is_the_caffenets(case, tmp_path):
    """The fixtures are forward only (Caffe's CPU backward is not implemented): the gradient of a
    top diff is the CaffeNet's, the GPU kernel's routing to each bin's argmax."""
    stem = REFERENCE / "forks" / "layers" / case
    proto, weights = stem.with_suffix(".prototxt"), stem.with_suffix(".caffemodel")
    assert main(["convert", str(proto), str(weights), "-o", str(tmp_path / "model.py")]) == 0
    model = _import(tmp_path / "model.py").load()
    net = _net(proto, weights, [])
    data, rois = _inputs(net, weights, proto)
    data.requires_grad_()
    twin = data.detach().clone().requires_grad_()
    expected, ours = net(data, rois), model(twin, rois)
    (blob,) = expected
    diff = torch.linspace(-1, 1, ours.numel()).reshape(ours.shape)
    expected[blob].backward(diff)
    ours.backward(diff)
    assert torch.equal(data.grad, twin.grad)


def test_tiny_faster_rcnn_gives_the_caffenets_outputs(tmp_path, capsys):
    """py-faster-rcnn's layout: the Python proposal layer (written as the package computes it) feeding ROIPooling."""
    proto = FIXTURES / "faster_rcnn" / "tiny_test.prototxt"
    assert main(["convert", str(proto), "--random-init", "-o", str(tmp_path / "model.py")]) == 0
    _check_source(tmp_path / "model.py")
    model = _import(tmp_path / "model.py").load()
    net = _net(proto, None, [])
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 96, 128, generator=generator) * 255 - 128
    im_info = torch.tensor([[96.0, 128.0, 0.5]])
    expected, ours = net(image, im_info, blobs=["rois"]), model(image, im_info)
    assert expected["rois"].shape[0] > 10  # proposals enough to pool and classify
    ours = ours if isinstance(ours, tuple) else (ours,)
    for value, blob in zip(ours, net.output_names):
        assert torch.equal(value, expected[blob]), blob


def test_a_users_python_layer_is_refused_saying_why(tmp_path):
    (tmp_path / "net.prototxt").write_text(
        'name: "custom"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
        'layer { name: "mine" type: "Python" bottom: "data" top: "out" python_param { module: "pyloss" '
        'layer: "Mine" } }\n')
    code = (
        "import sys\n"
        "from caffe_compat.layers import register\n"
        "from caffe_compat.layers.activation import Sigmoid\n"
        "register('Python:pyloss.Mine')(lambda ctx: ctx.wire(Sigmoid()))\n"
        "from caffe_compat.cli.main import main\n"
        "sys.exit(main(['convert', 'net.prototxt', '--random-init', '-o', 'model.py']))\n")
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "layer 'mine' (Python)" in result.stderr and "class 'Mine' of module 'pyloss'" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.prototxt"]


@pytest.mark.parametrize("suffix", [".py", ".pt2"])
def test_a_net_reading_its_lmdb_is_refused_saying_why(suffix, tmp_path, capsys, monkeypatch):
    """nets/data_layer reads train_lmdb beside it (from that folder): its Data layers are no inputs."""
    monkeypatch.chdir(REFERENCE / "nets" / "data_layer")
    out = tmp_path / f"model{suffix}"
    assert main(["convert", "data.prototxt", "--random-init", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "layer 'data' (Data)" in err, err
    assert "reads its records from files" in err
    assert not list(tmp_path.iterdir())


def test_a_net_without_inputs_gets_a_forward_of_self_alone(tmp_path, capsys):
    (tmp_path / "net.prototxt").write_text(
        'name: "constant"\n'
        'layer { name: "zeros" type: "DummyData" top: "zeros"\n'
        '  dummy_data_param { shape { dim: 2 dim: 3 } data_filler { type: "constant" value: -1 } } }\n'
        'layer { name: "relu" type: "ReLU" bottom: "zeros" top: "relu" }\n')
    out = tmp_path / "model.py"
    assert main(["convert", str(tmp_path / "net.prototxt"), "--random-init", "-o", str(out)]) == 0, \
        capsys.readouterr().err
    text = out.read_text()
    assert "def forward(self, )" not in text and "class Constant(nn.Module)" in text
