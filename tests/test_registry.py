"""The layer registry: one entry per Caffe type, duplicates refused, unknown types named."""
import pytest
from torch import nn

from caffe_compat.errors import CaffeCompatError
from caffe_compat.layers import REGISTRY, builder_for, register, register_onnx

EXPECTED_TYPES = {
    "Convolution", "Deconvolution", "Pooling", "LRN", "ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power",
    "Exp", "Log", "BNLL", "Threshold", "Dropout", "InnerProduct", "Concat", "Slice", "Split", "Flatten", "Reshape",
    "Crop", "Eltwise", "BatchNorm", "Scale", "Bias", "Softmax", "Reduction", "MVN", "Tile", "ArgMax", "Accuracy",
    "Silence", "Embed", "SoftmaxWithLoss", "EuclideanLoss", "ContrastiveLoss", "SigmoidCrossEntropyLoss",
    "HingeLoss", "MultinomialLogisticLoss", "LiftedStructSimilaritySoftmaxLoss", "Data", "ImageData",
}


def test_every_documented_type_has_a_builder():
    missing = sorted(t for t in EXPECTED_TYPES if t not in REGISTRY or REGISTRY[t].build is None)
    assert not missing


def test_a_second_builder_or_emitter_is_refused():
    with pytest.raises(ValueError, match="a builder for Caffe type 'ReLU' is already registered"):
        register("ReLU")(lambda ctx: None)
    with pytest.raises(ValueError, match="an ONNX emitter for Caffe type 'ReLU' is already registered"):
        register_onnx("ReLU")(lambda *args: None)


def test_unknown_type_names_layer_type_and_how_to_register():
    with pytest.raises(CaffeCompatError, match=r"layer 'mine': unknown layer type 'MyLayer'.*register\('MyLayer'\)"):
        builder_for("mine", "MyLayer")


def test_a_new_type_can_be_registered(monkeypatch):
    monkeypatch.setattr("caffe_compat.layers.registry.REGISTRY", dict(REGISTRY))
    from caffe_compat.layers import registry

    @registry.register("Doubler")
    def build_doubler(ctx):
        class Doubler(nn.Module):
            def forward(self, x):
                return 2 * x
        return ctx.wire(Doubler())

    assert registry.builder_for("d", "Doubler") is build_doubler
