"""`export-onnx --embed-preprocessing`: the graph takes uint8 images as a deployer has them
and does Caffe's DataTransformer itself; ONNX Runtime's result equals the float pipeline
(caffe_compat's Transformer, then the net in PyTorch)."""
import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.cli.main import main
from caffe_compat.data.transform import Transformer
from caffe_compat.io.files import read_binaryproto
from caffe_compat.io.schema import messages
from caffe_compat.loading import load_net
from conftest import REFERENCE, require

ort = pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")

NET = """name: "small"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ {transform} }} data_param {{ source: "absent_lmdb" batch_size: 2 backend: LMDB }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "gaussian" std: 0.1 }}
                      bias_filler {{ type: "constant" value: 0.2 }} }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param {{ num_output: 5
  weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
"""


def _transform_param(text: str):
    param = messages("bvlc").TransformationParameter()
    text_format.Parse(text, param)
    return param


def _reference(net_path, weights, transform: str, images_bgr_chw: np.ndarray) -> np.ndarray:
    """Caffe's TEST-phase transform of each image, then the net."""
    transformer = Transformer(_transform_param(transform), "TEST", "test")
    crop = transformer.crop_size
    batch = []
    for image in images_bgr_chw:
        h_off, w_off, mirror = transformer.draw(np.random.default_rng(0), image.shape)
        out = np.empty((image.shape[0], crop or image.shape[1], crop or image.shape[2]), np.float32)
        transformer.apply(image, h_off, w_off, mirror, out)
        batch.append(out)
    net = load_net(net_path, weights, input_shapes={"data": (len(batch), *batch[0].shape)})
    with torch.no_grad():
        return net(torch.from_numpy(np.stack(batch)))["fc"].numpy()


@pytest.mark.parametrize("order, layout, transform, size", [
    ("rgb", "nhwc", 'crop_size: 24 scale: 0.5 mean_file: "MEAN"', (32, 30)),  # the mean image at the crop
    ("bgr", "nchw", "crop_size: 20 mean_value: 104 mean_value: 117 mean_value: 123", (27, 31)),  # any size
    ("rgb", "nchw", "mean_value: 100 scale: 0.017", (12, 14)),  # no crop: the net's own size
])
def test_embedded_preprocessing_equals_the_float_pipeline(tmp_path, monkeypatch, order, layout, transform, size):
    mean = require(REFERENCE / "nets" / "data_layer" / "mean.binaryproto")
    transform = transform.replace("MEAN", str(mean))
    crop = _transform_param(transform).crop_size
    net_path, weights, out = tmp_path / "net.prototxt", tmp_path / "w.caffemodel", tmp_path / "m.onnx"
    net_path.write_text(NET.format(transform=transform))
    monkeypatch.chdir(tmp_path)
    shape = ["--input-shape", f"2,3,{size[0]},{size[1]}"] if not crop else []
    with pytest.warns(UserWarning, match="absent"):
        assert main(["convert", str(net_path), "--random-init", "-o", str(weights), *shape]) == 0
    assert main(["export-onnx", str(net_path), str(weights), "-o", str(out), "--output", "fc",
                 "--embed-preprocessing", order, "--image-layout", layout, *shape]) == 0
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    (image_input,) = model.graph.input
    assert image_input.name == "image" and image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    props = {p.key: p.value for p in model.metadata_props}
    assert props["preprocess.embedded"].startswith(f"uint8 {order.upper()} {layout.upper()} images in")

    rng = np.random.default_rng(1)
    bgr = rng.integers(0, 256, (2, 3, *size), dtype=np.uint8)
    given = bgr[:, ::-1] if order == "rgb" else bgr
    if layout == "nhwc":
        given = given.transpose(0, 2, 3, 1)
    ours = ort.InferenceSession(model.SerializeToString()).run(None, {"image": np.ascontiguousarray(given)})[0]
    expected = _reference(net_path, weights, transform, bgr.astype(np.float32))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert read_binaryproto(mean).shape[-2:] == (32, 30)  # the first case's image size is the mean's


def test_embedding_needs_a_readable_mean_and_an_image_input(tmp_path, monkeypatch, capsys):
    net_path = tmp_path / "net.prototxt"
    net_path.write_text(NET.format(transform='crop_size: 8 mean_file: "/nowhere/mean.binaryproto"'))
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning):
        assert main(["convert", str(net_path), "--random-init", "-o", "w.caffemodel"]) == 0
    assert main(["export-onnx", str(net_path), "w.caffemodel", "-o", "m.onnx", "--output", "fc",
                 "--embed-preprocessing", "rgb"]) == 2
    assert "the mean file /nowhere/mean.binaryproto is not readable here; give --mean-value" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
