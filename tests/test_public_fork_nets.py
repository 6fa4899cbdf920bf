"""The public nets of the forks (tests/fixtures/public-nets, README there): DenseNet-121,
MobileNet v2, ShuffleNet v2, SE-ResNet-50, SegNet basic, PSPNet50 and py-faster-rcnn's
VGG16 test net. `inspect` gives their parameter counts and output shapes; each converts
with random weights and runs in PyTorch; those with an ONNX form give ONNX Runtime the
same outputs, and the Faster R-CNN net's export is refused in one line."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe_compat.cli.main import main
from caffe_compat.converters.artifact import load, read_model, weights_sha256, write_payload

if importlib.util.find_spec("onnxruntime") is None and not os.environ.get("CI"):
    pytest.skip("needs onnxruntime (pip install 'caffe-compat[onnxruntime]')", allow_module_level=True)
import onnxruntime as ort  # noqa: E402

PUBLIC = Path(__file__).parent / "fixtures" / "public-nets"
# prototxt, total parameter count (every blob, BatchNorm's mean/variance/factor included),
# the output blob and its shape at the prototxt's input size
NETS = {
    "densenet-121": ("DenseNet_121.prototxt", 8_062_625, "fc6", [1, 1000, 1, 1]),
    "mobilenet-v2": ("mobilenet_v2_deploy.prototxt", 3_540_189, "prob", [1, 1000, 1, 1]),
    "shufflenet-v2": ("shufflenet_v2_1x_deploy.prototxt", 2_294_840, "fc1000", [1, 1000, 1, 1]),
    "se-resnet-50": ("SE-ResNet-50.prototxt", 28_141_197, "prob", [1, 1000]),
    "segnet-basic": ("segnet_basic_camvid.prototxt", 1_416_587, "argmax", [1, 1, 360, 480]),
    "pspnet50-ade20k": ("pspnet50_ADE20K_473.prototxt", 46_841_174, "conv6_interp", [1, 150, 473, 473]),
    "faster-rcnn-vgg16": ("faster_rcnn_vgg16_voc_test.prototxt", 137_078_239, "cls_prob", [1, 21]),
}
# The published counts of learned parameters, which leave out BatchNorm's running statistics:
# torchvision's densenet121 and shufflenet_v2_x1_0, and the SENet paper's 28.09M (Table 1).
PUBLISHED_LEARNED = {"densenet-121": 7_978_856, "shufflenet-v2": 2_278_604, "se-resnet-50": 28_088_024}
# Run in PyTorch and ONNX Runtime at the prototxts' own input sizes (PSPNet's pyramid
# pooling kernels and Interp sizes are written for 473x473: a few seconds there).
ONNX_NETS = ["densenet-121", "mobilenet-v2", "shufflenet-v2", "se-resnet-50", "pspnet50-ade20k"]


def inspected(net, capsys):
    assert main(["inspect", str(PUBLIC / NETS[net][0]), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("net", sorted(NETS))
def test_inspect_gives_the_parameter_count_and_output_shape(net, capsys):
    _, total, output, shape = NETS[net]
    shown = inspected(net, capsys)
    assert shown["cannot_build"] == [] and shown["total_params_complete"]
    assert shown["total_params"] == total
    assert output in shown["outputs"]
    (layer,) = [layer for layer in shown["layers"] if output in layer["tops"]]
    assert layer["top_shapes"][output] == shape


@pytest.mark.parametrize("net", sorted(PUBLISHED_LEARNED))
def test_learned_parameters_are_the_published_count(net, capsys):
    shown = inspected(net, capsys)
    running_statistics = sum(layer["param_count"] for layer in shown["layers"] if layer["type"] == "BatchNorm")
    assert shown["total_params"] - running_statistics == PUBLISHED_LEARNED[net]


def test_faster_rcnn_count_is_vgg16_with_its_heads():
    """VGG16's 13 convolutions and fc6/fc7, the RPN (3x3 512->512, 18 scores, 36 deltas) and
    the 21-class heads, by arithmetic."""
    vgg16_convs = 14_714_688
    fc6, fc7 = 512 * 7 * 7 * 4096 + 4096, 4096 * 4096 + 4096
    rpn = (512 * 512 * 9 + 512) + (512 * 18 + 18) + (512 * 36 + 36)
    heads = (4096 * 21 + 21) + (4096 * 84 + 84)
    assert vgg16_convs + fc6 + fc7 + rpn + heads == NETS["faster-rcnn-vgg16"][1]


def random_model(net, tmp_path):
    """convert --random-init, then every blob drawn anew: the prototxts' fillers leave most
    weights 0 and BatchNorm's statistics 0, which overflow or give all-zero outputs. Weights
    ~ N(0, 2/fan_in) (He's, which keeps the images' variation through ReLUs), biases and
    shifts ~ N(0, 0.01), the other per-channel blobs (scales, means, variances, BatchNorm's
    factor) in [0.5, 1.5], so that variances stay positive."""
    model = tmp_path / "net.pt"
    assert main(["convert", str(PUBLIC / NETS[net][0]), "--random-init", "-o", str(model)]) == 0
    payload = read_model(model)
    rng = np.random.default_rng(0)

    def per_channel(blob):  # (C,) or, in PSPNet's BN, (1, C, 1, 1)
        return blob.size == max(blob.shape)

    def drawn(arrays):
        if per_channel(arrays[0]) and len(arrays) == 2:  # Scale's, or SegNet's BN's, scale and shift
            return [rng.uniform(0.5, 1.5, arrays[0].shape), rng.normal(0, 0.01, arrays[1].shape)]
        if per_channel(arrays[0]):  # BatchNorm's mean, variance, factor; PSPNet BN's slope, bias, mean, variance
            return [rng.uniform(0.5, 1.5, a.shape) for a in arrays]
        return [rng.normal(0, 0.01, a.shape) if per_channel(a)
                else rng.standard_normal(a.shape) * np.sqrt(2 / np.prod(a.shape[1:])) for a in arrays]
    weights = {name: [a.astype(np.float32) for a in drawn(arrays)] for name, arrays in payload["weights"].items()}
    write_payload({**payload, "weights": weights, "weights_sha256": weights_sha256(weights)}, model)
    return model


@pytest.mark.parametrize("net", ONNX_NETS)
def test_random_weights_give_the_same_outputs_in_onnx_runtime(net, tmp_path):
    _, total, output, shape = NETS[net]
    model, exported = random_model(net, tmp_path), tmp_path / "net.onnx"
    caffe_net = load(model)
    assert sum(a.size for arrays in caffe_net.caffe_weights().values() for a in arrays) == total
    assert main(["export-onnx", str(model), "-o", str(exported)]) == 0
    images = np.random.default_rng(1).uniform(-1, 1, caffe_net.blob_shapes["data"]).astype(np.float32)
    with torch.no_grad():
        ours = caffe_net({"data": torch.from_numpy(images)})[output].numpy()
    assert list(ours.shape) == shape and np.ptp(ours) > 0, "constant outputs compare nothing"
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (theirs,) = session.run([output], {"data": images})
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())


def test_segnet_gives_the_same_pooling_masks_and_scores_in_onnx_runtime(tmp_path):
    """SegNet's Upsample places each value where its pooling's mask says. Two values of a
    pooling window equal within float error (ONNX Runtime's convolutions differ from
    PyTorch's by ~1e-7) may pick the other place, and the decoder then moves that value:
    so every mask agrees except at such near-ties, and the scores agree everywhere else."""
    _, total, output, shape = NETS["segnet-basic"]
    model, exported = random_model("segnet-basic", tmp_path), tmp_path / "net.onnx"
    caffe_net = load(model)
    assert sum(a.size for arrays in caffe_net.caffe_weights().values() for a in arrays) == total
    scores, pooled = "dense_softmax_inner_prod", {f"pool{k}_mask": f"conv{k}" for k in range(1, 5)}
    exports = [scores, output, *pooled]
    assert main(["export-onnx", str(model), "-o", str(exported), *(f"--output={blob}" for blob in exports)]) == 0
    images = np.random.default_rng(1).uniform(-1, 1, (1, 3, 360, 480)).astype(np.float32)
    with torch.no_grad():
        ours = {name: value.numpy() for name, value in
                caffe_net({"data": torch.from_numpy(images)}, blobs=[*exports, *pooled.values()]).items()}
    assert list(ours[output].shape) == shape
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    theirs = dict(zip(exports, session.run(exports, {"data": images})))
    flipped = 0
    for mask, bottom in pooled.items():
        values = ours[bottom].reshape(*ours[bottom].shape[:2], -1)
        ours_picked = np.take_along_axis(values, ours[mask].reshape(*values.shape[:2], -1).astype(np.int64), 2)
        theirs_picked = np.take_along_axis(values, theirs[mask].reshape(*values.shape[:2], -1).astype(np.int64), 2)
        near_tie = np.abs(ours_picked - theirs_picked) <= 1e-5 * np.abs(values).max()
        assert near_tie.all(), f"{mask}: ONNX Runtime picks another maximum"
        flipped += int((ours[mask] != theirs[mask]).sum())
    assert flipped <= 10
    close = np.isclose(theirs[scores], ours[scores], rtol=1e-4, atol=1e-4 * np.abs(ours[scores]).max())
    assert close.all() if flipped == 0 else close.mean() > 0.95
    best_two = np.sort(ours[scores], axis=1)[:, -2:]
    decided = close.all(1, keepdims=True) & (best_two[:, 1:] - best_two[:, :1] > 1e-4 * np.abs(ours[scores]).max())
    assert decided.mean() > 0.9 and len(np.unique(ours[output][decided])) > 1
    np.testing.assert_array_equal(theirs[output][decided], ours[output][decided])


def test_faster_rcnn_runs_and_its_export_is_refused_in_one_line(tmp_path, capsys):
    model = random_model("faster-rcnn-vgg16", tmp_path)
    assert main(["export-onnx", str(model), "-o", str(tmp_path / "net.onnx")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "'proposal' (Python)" in error and "'roi_pool5' (ROIPooling)" in error
    assert not (tmp_path / "net.onnx").exists()
    caffe_net = load(model)
    images = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32))
    with torch.no_grad():
        out = caffe_net({"data": images, "im_info": torch.tensor([[224.0, 224.0, 1.0]])}, blobs=["rois"])
    rois = out["rois"]
    assert rois.ndim == 2 and rois.shape[1] == 5 and 1 <= rois.shape[0] <= 300
    assert out["cls_prob"].shape == (rois.shape[0], 21) and out["bbox_pred"].shape == (rois.shape[0], 84)
    # proposals lie in the image, and each row's class probabilities sum to 1
    assert (rois[:, 0] == 0).all() and (rois[:, 1:] >= 0).all() and (rois[:, 1:] <= 223).all()
    torch.testing.assert_close(out["cls_prob"].sum(1), torch.ones(rois.shape[0]))
