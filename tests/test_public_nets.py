"""The public SSD nets (tests/fixtures/public-nets, README there): chuanqi305's
MobileNet-SSD deploy prototxt (legacy `input:` fields) and OpenCV's res10 face detector
(written for OpenCV's Caffe schema). Each opens in `inspect`, converts with random
weights, runs in PyTorch, exports to ONNX, and ONNX Runtime gives the same detections."""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe_compat.cli.main import main
from caffe_compat.converters.artifact import load
from test_layers_ssd import assert_same_rows

if importlib.util.find_spec("onnxruntime") is None and not os.environ.get("CI"):
    pytest.skip("needs onnxruntime (pip install 'caffe-compat[onnxruntime]')", allow_module_level=True)
import onnxruntime as ort  # noqa: E402

PUBLIC = Path(__file__).parent / "fixtures" / "public-nets"
MOBILENET_SSD = PUBLIC / "MobileNetSSD_deploy.prototxt"
RES10 = PUBLIC / "opencv_res10_face_deploy.prototxt"
# (prototxt, its text changed so that random weights' scores, near 1/classes, pass the threshold)
NETS = {"mobilenet-ssd": (MOBILENET_SSD, ("confidence_threshold: 0.25", "confidence_threshold: 0.02")),
        "res10-face": (RES10, None)}


@pytest.mark.parametrize("net", sorted(NETS))
def test_inspect_opens_the_public_net(net, capsys):
    assert main(["inspect", str(NETS[net][0])]) == 0
    shown = capsys.readouterr().out
    assert "DetectionOutput" in shown and "PriorBox" in shown and "1x3x300x300" in shown


@pytest.mark.parametrize("net", sorted(NETS))
def test_random_weights_give_the_same_detections_in_onnx_runtime(net, tmp_path, capsys):
    source, change = NETS[net]
    text = source.read_text()
    if change:
        assert change[0] in text
        text = text.replace(*change)
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(text)
    model, exported = tmp_path / "net.pt", tmp_path / "net.onnx"
    assert main(["convert", str(prototxt), "--random-init", "--seed", "3", "-o", str(model)]) == 0
    assert main(["export-onnx", str(model), "-o", str(exported)]) == 0
    caffe_net = load(model)
    # Every bias starts at 0, so the heads' outputs grow with the input: scale it so that the
    # locations are near 1, as a trained net's are (else boxes overflow and scores tie at 1).
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 300, 300)).astype(np.float32)
    with torch.no_grad():
        locations = caffe_net({"data": torch.from_numpy(images)}, blobs=["mbox_loc"])["mbox_loc"]
    images /= float(locations.abs().max())
    with torch.no_grad():
        ours = caffe_net({"data": torch.from_numpy(images)}, blobs=["detection_out"])["detection_out"].numpy()
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (theirs,) = session.run(None, {"data": images})
    rows = ours.reshape(-1, 7)
    assert (rows[:, 1] >= 1).sum() >= 10 and set(rows[:, 0]) == {0, 1}, "too few detections to compare"
    assert theirs.shape == ours.shape
    assert_same_rows(theirs, ours)
