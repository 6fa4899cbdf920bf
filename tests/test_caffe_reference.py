"""The reference-maker for pycaffe users, without Caffe: a stand-in object with
pycaffe's Net interface computes an InnerProduct + ReLU net in numpy, and what the tool
records from it must be what `compare` reads and passes."""
from collections import OrderedDict

import numpy as np

from caffe_compat.tools.compare import compare_case
from caffe_compat.io.files import read_prototxt, with_weights, write_caffemodel
from caffe_compat.tools import caffe_reference as tool

NET = """name: "fc_relu"
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 4 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "relu" type: "ReLU" bottom: "fc" top: "fc" }
"""


class Blob:
    def __init__(self, shape):
        self.data = np.zeros(shape, np.float32)
        self.diff = np.zeros(shape, np.float32)


class Layer:
    def __init__(self, type_):
        self.type = type_


class FakeNet:
    """pycaffe's Net as far as the tool uses it, for data -> fc -> relu (in place)."""

    def __init__(self, weight, bias):
        self.blobs = OrderedDict(data=Blob((3, 4)), fc=Blob((3, 5)))
        self.params = OrderedDict(fc=[Blob(weight.shape), Blob(bias.shape)])
        self.params["fc"][0].data[...] = weight
        self.params["fc"][1].data[...] = bias
        self.inputs, self.outputs = ["data"], ["fc"]
        self.blob_loss_weights = OrderedDict(data=0.0, fc=0.0)
        self._layer_names = ["data", "fc", "relu"]
        self.layers = [Layer("Input"), Layer("InnerProduct"), Layer("ReLU")]
        self.bottom_names = OrderedDict(data=[], fc=["data"], relu=["fc"])

    def forward(self):
        w, b = self.params["fc"][0].data, self.params["fc"][1].data
        self._pre_relu = self.blobs["data"].data @ w.T + b
        self.blobs["fc"].data[...] = np.maximum(self._pre_relu, 0)

    def backward(self, **diffs):
        for name, diff in diffs.items():
            self.blobs[name].diff[...] = diff
        top = self.blobs["fc"].diff * (self._pre_relu > 0)  # in place: fc's diff becomes the pre-ReLU one
        self.blobs["fc"].diff[...] = top
        self.params["fc"][0].diff[...] = top.T @ self.blobs["data"].data
        self.params["fc"][1].diff[...] = top.sum(0)
        self.blobs["data"].diff[...] = top @ self.params["fc"][0].data


def test_key_names_follow_the_reference_format():
    assert tool.blob_key("blob", "inception_3a/output") == "blob/inception_3a/output"
    assert tool.param_key("conv1", 1) == "paramdiff/conv1/1"
    assert tool.is_split_blob("data_data_0_split_1") and not tool.is_split_blob("conv1")


def test_labels_of_losses_get_integers():
    net = FakeNet(np.zeros((5, 4), np.float32), np.zeros(5, np.float32))
    net.inputs = ["data", "label"]
    net.blobs["label"] = Blob((3,))
    net._layer_names.append("loss")
    net.layers.append(Layer("SoftmaxWithLoss"))
    net.bottom_names["loss"] = ["fc", "label"]
    inputs = tool.make_inputs(net, np.random.default_rng(0), num_labels=4)
    assert set(np.unique(inputs["label"])) <= {0, 1, 2, 3} and inputs["data"].dtype == np.float32
    assert tool.make_inputs(net, np.random.default_rng(0), 4, {"data": np.ones(12)})["data"].shape == (3, 4)


def test_what_it_records_is_what_compare_passes(tmp_path):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((5, 4)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    prototxt = tmp_path / "fc_relu.prototxt"
    prototxt.write_text(NET)
    write_caffemodel(with_weights(read_prototxt(prototxt).net, {"fc": [weight, bias]}), tmp_path / "fc_relu.caffemodel")

    net = FakeNet(weight, bias)
    record = tool.forward_backward(net, tool.make_inputs(net, np.random.default_rng(2), 10), np.random.default_rng(3))
    record["meta"] = tool.meta("fc_relu", 2, "stand-in", "TEST", "none")
    assert sorted(record) == ["blob/data", "blob/fc", "diff/data", "diff/fc", "input/data", "meta",
                              "paramdiff/fc/0", "paramdiff/fc/1", "topdiff/fc"]
    np.savez(tmp_path / "fc_relu.npz", **record)

    rows = compare_case(prototxt, tmp_path / "fc_relu.caffemodel", tmp_path / "fc_relu.npz")
    assert {row.key for row in rows} == set(record) - {"input/data", "topdiff/fc", "meta"}
    assert all(row.ok for row in rows), [row.format() for row in rows if not row.ok]
