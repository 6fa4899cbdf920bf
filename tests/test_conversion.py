"""`caffe_compat.converters.conversion.convert`, the `convert` verb's decision by inputs and
output suffix, called from Python: it writes, and returns the lines the CLI prints."""
import pytest
import torch

import caffe_compat
from caffe_compat.converters.conversion import convert
from caffe_compat.errors import CaffeCompatError
from caffe_compat.io.files import read_caffemodel, weights_of
from caffe_compat.loading import load_net
from conftest import REFERENCE, require


@pytest.fixture(scope="module")
def conv_files():
    folder = require(REFERENCE / "layers")
    return folder / "conv_basic.prototxt", folder / "conv_basic.caffemodel"


def test_net_to_model_to_caffemodel(conv_files, tmp_path):
    net_path, weights = conv_files
    model = tmp_path / "conv.safetensors"
    wrote = convert(net_path, model, weights)
    assert wrote[0].startswith(f"wrote {model}: ") and wrote[1].startswith("preprocess: ")
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        assert torch.equal(caffe_compat.load(model)(x)["conv"], load_net(net_path, weights)(x)["conv"])
    back = tmp_path / "back.caffemodel"
    assert convert(model, back) == [f"wrote {back} (Caffe weights)"]
    original, written = weights_of(read_caffemodel(weights)), weights_of(read_caffemodel(back))
    assert original.keys() == written.keys()
    assert all((a == b).all() for name in original for a, b in zip(original[name], written[name]))


def test_model_written_again_into_another_container(conv_files, tmp_path):
    model = tmp_path / "conv.pt"
    convert(*conv_files[:1], model, conv_files[1])
    again = tmp_path / "again.safetensors"
    wrote = convert(model, again)
    assert wrote[0] == f"wrote {again}: 1 layers from {model}, phase TEST, dialect bvlc" and again.is_file()


@pytest.mark.parametrize("random_init", [False, True])
def test_weights_and_random_init_one_or_the_other(conv_files, tmp_path, random_init):
    net_path, weights = conv_files
    with pytest.raises(CaffeCompatError, match="convert takes NET.prototxt WEIGHTS") as error:
        convert(net_path, tmp_path / "out.pt", weights if random_init else None, random_init=random_init)
    assert ("not both" in str(error.value)) == random_init
    assert not (tmp_path / "out.pt").exists()
