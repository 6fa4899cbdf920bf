"""The inference fast path (caffe_compat/inference.py): the same outputs as the per-layer
path (to the bit where nothing is folded), Caffe's numbers on the fixtures, a program
rebuilt when the weights change, in-place work only on tensors the net made."""
import copy
import glob
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.profiler import profile

from caffe_compat.errors import CaffeCompatError
from caffe_compat.loading import load_net
from conftest import REFERENCE, require

NET = """
name: "folds"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 8 dim: 7 dim: 7 } } }
layer { name: "relu0" type: "ReLU" bottom: "data" top: "data" }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 16 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "uniform" min: -1 max: 1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"
        scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 2 }
                      bias_filler { type: "uniform" min: -1 max: 1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool" type: "Pooling" bottom: "conv1" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 1 } }
layer { name: "bn2" type: "BatchNorm" bottom: "pool" top: "bn2" }
layer { name: "scale2" type: "Scale" bottom: "bn2" top: "bn2" scale_param { bias_term: true
        filler { type: "uniform" min: 0.5 max: 2 } bias_filler { type: "uniform" min: -1 max: 1 } } }
layer { name: "relu2" type: "ReLU" bottom: "bn2" top: "bn2" relu_param { negative_slope: 0.1 } }
layer { name: "lone_scale" type: "Scale" bottom: "pool" top: "lone"
        scale_param { filler { type: "uniform" min: -2 max: 2 } } }
"""


def _net(tmp_path, **options):
    path = tmp_path / "folds.prototxt"
    path.write_text(NET)
    torch.manual_seed(0)
    net = load_net(path, **options).eval()
    with torch.no_grad():  # stored statistics as Caffe keeps them: sums and their scale factor
        for name in ("bn1", "bn2"):
            bn = net.layers[name]
            bn.mean.uniform_(-4, 4)
            bn.variance.uniform_(1, 20)
            bn.scale_factor.fill_(2.0)
    return net


def _calls(net, names):
    """Layer name -> how many times its module ran, counted by forward hooks."""
    counts = {name: 0 for name in names}
    for name in names:
        net.layers[name].register_forward_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


def _per_layer(net, x):
    return net(x, blobs=[])  # asking for blobs keeps the per-layer path


def _close(ours, theirs, rtol):
    for name in theirs:
        scale = theirs[name].abs().max()
        assert (ours[name] - theirs[name]).abs().max() <= rtol * scale, name


def test_folded_outputs_match_the_per_layer_path(tmp_path):
    net = _net(tmp_path)
    calls = _calls(net, ["bn1", "scale1", "bn2", "scale2", "lone_scale"])
    x = torch.randn(1, 8, 7, 7)
    with torch.no_grad():
        reference = _per_layer(net, x)
        for name in calls:
            calls[name] = 0
        fast = net(x)
    # BatchNorm and Scale ran inside the convolution / one multiply-add, not as layers;
    # the Scale alone keeps its own layer.
    assert calls == {"bn1": 0, "scale1": 0, "bn2": 0, "scale2": 0, "lone_scale": 1}
    assert not torch.equal(fast["bn2"], reference["bn2"])  # folding changed the rounding...
    _close(fast, reference, 1e-5)  # ...within the tolerance


def test_opt_out_keeps_each_layer_and_equals_the_per_layer_path_to_the_bit(tmp_path):
    net = _net(tmp_path, fold=False)
    calls = _calls(net, ["bn1", "scale1", "bn2", "scale2"])
    x = torch.randn(2, 8, 7, 7)  # two images: torch's own choice of convolution kernel
    with torch.no_grad():
        reference = _per_layer(net, x)
        fast = net(x)
    assert calls == {"bn1": 2, "scale1": 2, "bn2": 2, "scale2": 2}
    for name in reference:
        assert torch.equal(fast[name], reference[name]), name


def test_program_follows_weight_changes_and_mode(tmp_path):
    net = _net(tmp_path)
    x = torch.randn(1, 8, 7, 7)
    with torch.no_grad():
        before = net(x)["bn2"].clone()
        net.layers["bn1"].variance.mul_(9)  # in place: the folded weights must follow
        net.layers["conv1"].weight.mul_(-1)
        after = net(x)
        _close(after, _per_layer(net, x), 1e-5)
        assert not torch.allclose(after["bn2"], before)
        net.fold = False
        unfolded = net(x)
        net.fold = True
    _close(unfolded, after, 1e-5)
    net.train()
    with torch.no_grad():  # TRAIN mode normalises with the batch's statistics: the per-layer path
        trained = net(torch.randn(3, 8, 7, 7))
    assert net.layers["bn1"].scale_factor.item() != 2.0  # the batch statistics went into the sums
    net.eval()
    assert trained["bn2"].shape[0] == 3


def test_gradients_and_copies_take_their_own_path(tmp_path):
    net = _net(tmp_path)
    x = torch.randn(1, 8, 7, 7)
    out = net(x)["bn2"]  # autograd on: the per-layer path, differentiable
    out.sum().backward()
    assert net.layers["scale2"].weight.grad is not None
    twin = copy.deepcopy(net)
    with torch.no_grad():
        first = net(x)["bn2"]
        twin.layers["conv1"].weight.zero_()
        assert torch.equal(net(x)["bn2"], first)  # the copy runs its own weights, not the original's
        _close(twin(x), _per_layer(twin, x), 1e-5)


def test_user_input_is_never_written(tmp_path):
    # relu0 is in place on the input blob: the fast path must not clamp the caller's tensor
    net = _net(tmp_path)
    x = torch.randn(1, 8, 7, 7)
    kept = x.clone()
    with torch.no_grad():
        net(x)
    assert torch.equal(x, kept)


def test_a_wrong_input_size_names_the_layer(tmp_path):
    net = _net(tmp_path)
    with torch.no_grad(), pytest.raises(CaffeCompatError, match="layer 'conv1'.*bottom 'data' is 1x3x7x7"):
        net(torch.randn(1, 3, 7, 7))


def test_no_convolution_on_torchs_slow_path(tmp_path):
    net = _net(tmp_path)
    x = torch.randn(1, 8, 7, 7)  # 392 values, one image, 3x3: torch's _slow_conv2d_forward
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad(), profile() as per_layer:
            _per_layer(net, x)
        with torch.no_grad(), profile() as fast:
            net(x)
    finally:
        torch.set_num_threads(threads)
    assert "aten::_slow_conv2d_forward" in {e.name for e in per_layer.events()}
    names = {e.name for e in fast.events()}
    assert "aten::_slow_conv2d_forward" not in names and "aten::mkldnn_convolution" in names


def _cases_with_normalisation():
    cases = []
    for folder in ("layers", "forks/layers"):
        for npz in sorted(glob.glob(str(REFERENCE / folder / "*.npz"))):
            text = Path(npz).with_suffix(".prototxt").read_text()
            if any(f'type: "{t}"' in text for t in ("BatchNorm", "BN", "Scale")):
                cases.append((folder, Path(npz).stem))
    return cases + [("nets", "googlenet_deploy")]


@pytest.mark.parametrize("folder,case", _cases_with_normalisation())
def test_fixture_nets_through_the_fast_path_give_caffes_numbers(folder, case):
    npz = require(REFERENCE / folder / f"{case}.npz")
    ref = dict(np.load(npz))
    weights = npz.with_suffix(".caffemodel")
    net = load_net(npz.with_suffix(".prototxt"), weights if weights.exists() else None).eval()
    inputs = {k[len("input/"):]: torch.from_numpy(v) for k, v in ref.items() if k.startswith("input/")}
    with torch.no_grad():
        outputs = net(**inputs)
    rtol = 1e-4 if folder == "nets" else 1e-5  # the reference README's: 1e-4 through deep nets
    compared = [name for name in outputs if f"blob/{name}" in ref]
    assert compared
    for name in compared:
        expected = torch.from_numpy(ref[f"blob/{name}"]).double()
        err = (outputs[name].double() - expected).abs().max()
        assert err <= rtol * expected.abs().max(), (name, float(err))


@pytest.mark.parametrize("fold", [True, False])
def test_folded_inference_runs_channels_last_and_hands_back_nchw(tmp_path, fold):
    """With fold the activations stay channels-last from the first layer on (pooling then
    converts nothing); the outputs come back plainly contiguous. Unfolded, NCHW throughout."""
    net = _net(tmp_path, fold=fold)
    layouts = []
    net.layers["pool"].register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                            and not args[0].is_contiguous()))
    with torch.no_grad():
        outputs = net(torch.randn(2, 8, 7, 7))
    assert layouts == [fold]
    assert all(value.is_contiguous() for value in outputs.values())


def test_a_convolution_without_a_chain_follows_its_weights(tmp_path):
    """On CPU the program holds a channels-last copy of every convolution's weights, folded or
    not: an in-place change of the weights or bias must reach it."""
    path = tmp_path / "conv.prototxt"
    path.write_text('layer { name: "data" type: "Input" top: "data"\n'
                    '  input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }\n'
                    'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param {\n'
                    '  num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 1 } } }\n')
    torch.manual_seed(0)
    net = load_net(path).eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        before = net(x)["conv"].clone()
        net.layers["conv"].weight.mul_(-1)
        net.layers["conv"].bias.add_(1)
        after = net(x)["conv"]
        _close({"conv": after}, _per_layer(net, x), 1e-5)
    torch.testing.assert_close(after, 1 - before, rtol=1e-5, atol=1e-5)
