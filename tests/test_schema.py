"""The schema (proto/caffe.proto, its generated module) and its two dialects."""
import ast

import numpy as np
import pytest

from caffe_compat.errors import CaffeCompatError
from caffe_compat.io import wire
from caffe_compat.io.dialects.detect import detect_binary_dialect, detect_text_dialect
from caffe_compat.io.schema import DIALECTS, dialect_of, messages, unknown_fields
from caffe_compat.proto import caffe_pb2

COMMITTED_MODULE = caffe_pb2.__file__


def _serialized_file(module_source: str) -> bytes:
    """The FileDescriptorProto bytes a generated module registers, read without importing it."""
    for node in ast.walk(ast.parse(module_source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "AddSerializedFile":
            return ast.literal_eval(node.args[0])
    raise AssertionError("no AddSerializedFile call in the generated module")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> str:
    pytest.importorskip("grpc_tools", reason="regenerating needs grpcio-tools")
    from caffe_compat.proto import generate
    return generate.generate(tmp_path_factory.mktemp("gen")).read_text(encoding="utf-8")


def test_committed_module_holds_what_caffe_proto_describes(regenerated):
    with open(COMMITTED_MODULE, encoding="utf-8") as committed:
        assert _serialized_file(committed.read()) == _serialized_file(regenerated)


def test_committed_module_runs_on_older_protobuf_runtimes():
    # The generator's runtime-version check would refuse protobuf older than itself.
    with open(COMMITTED_MODULE, encoding="utf-8") as committed:
        assert "runtime_version" not in committed.read()


@pytest.mark.parametrize("message, numbers", [
    ("LayerParameter", {"name": 1, "type": 2, "bottom": 3, "top": 4, "loss_weight": 5, "param": 6,
                        "blobs": 7, "include": 8, "exclude": 9, "phase": 10, "propagate_down": 11,
                        "transform_param": 100, "loss_param": 101, "convolution_param": 106,
                        "lrn_param": 118, "pooling_param": 121, "batch_norm_param": 139,
                        "scale_param": 142, "input_param": 143, "crop_param": 144,
                        "parameter_param": 145, "recurrent_param": 146}),
    ("NetParameter", {"name": 1, "layers": 2, "input": 3, "input_dim": 4, "force_backward": 5,
                      "state": 6, "debug_info": 7, "input_shape": 8, "layer": 100}),
    ("V1LayerParameter", {"layer": 1, "bottom": 2, "top": 3, "name": 4, "type": 5, "blobs": 6,
                          "blobs_lr": 7, "weight_decay": 8, "convolution_param": 10,
                          "loss_weight": 35, "param": 1001, "blob_share_mode": 1002}),
    ("BlobProto", {"num": 1, "channels": 2, "height": 3, "width": 4, "data": 5, "diff": 6,
                   "shape": 7, "double_data": 8, "double_diff": 9}),
    ("SolverParameter", {"base_lr": 5, "lr_policy": 8, "momentum": 11, "weight_decay": 12,
                         "regularization_type": 29, "solver_type": 30, "stepvalue": 34,
                         "clip_gradients": 35, "iter_size": 36, "type": 40, "layer_wise_reduce": 41}),
    ("ParamSpec", {"name": 1, "share_mode": 2, "lr_mult": 3, "decay_mult": 4}),
])
def test_field_numbers_are_caffes(message, numbers):
    fields = getattr(caffe_pb2, message).DESCRIPTOR.fields_by_name
    assert {name: fields[name].number for name in numbers} == numbers


def test_defaults_and_enums_are_caffes():
    assert caffe_pb2.FillerParameter().type == "constant"
    assert caffe_pb2.SolverParameter().type == "SGD"
    assert caffe_pb2.SolverParameter().clip_gradients == -1
    assert caffe_pb2.NetState().phase == caffe_pb2.TEST
    assert caffe_pb2.PoolingParameter().stride == 1
    assert caffe_pb2.ConvolutionParameter().bias_term is True
    assert caffe_pb2.V1LayerParameter.CONVOLUTION == 4
    assert caffe_pb2.SolverParameter.ADAM == 5


def test_dialects_differ_only_at_field_145():
    bvlc, lifted = messages("bvlc"), messages("lifted")
    assert bvlc.NetParameter is caffe_pb2.NetParameter
    assert set(vars(bvlc)) == set(vars(lifted))
    forked = lifted.LayerParameter.DESCRIPTOR.fields_by_number[145]
    assert forked.name == "lifted_struct_sim_softmax_loss_param"
    assert forked.message_type.name == "LiftedStructSimSoftmaxLossParameter"
    assert caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_number[145].name == "parameter_param"
    assert messages("lifted") is lifted


def test_dialects_share_defaults():
    # The lifted pool is built from the runtime's re-serialization, which respells
    # float defaults (1e-08 -> 9.99999994e-09): the values must stay the same.
    for name, bvlc_class in vars(messages("bvlc")).items():
        lifted_class = getattr(messages("lifted"), name)
        for field in bvlc_class.DESCRIPTOR.fields:
            if field.message_type is None and field.has_default_value:
                lifted_field = lifted_class.DESCRIPTOR.fields_by_number[field.number]
                assert lifted_field.default_value == field.default_value, (name, field.name)


def test_unknown_dialect_lists_the_valid_ones():
    with pytest.raises(CaffeCompatError, match="bvlc, lifted"):
        messages("caffe")


def test_dialect_of():
    for dialect in DIALECTS:
        assert dialect_of(messages(dialect).BlobProto()) == dialect
    from google.protobuf import descriptor_pb2
    with pytest.raises(CaffeCompatError):
        dialect_of(descriptor_pb2.FileDescriptorProto())


@pytest.mark.parametrize("name", ["init", "final"])
def test_both_dialects_parse_the_solver_caffemodels(reference, name):
    data = (reference / "nets" / "solver" / f"{name}.caffemodel").read_bytes()
    lifted = messages("lifted").NetParameter.FromString(data)
    bvlc = messages("bvlc").NetParameter.FromString(data)
    assert [layer.name for layer in lifted.layer] == [layer.name for layer in bvlc.layer]
    loss = lifted.layer[-1]
    assert loss.type == "LiftedStructSimilaritySoftmaxLoss"
    assert loss.HasField("lifted_struct_sim_softmax_loss_param")
    assert loss.lifted_struct_sim_softmax_loss_param.margin == 1.0
    assert unknown_fields(lifted) == []
    # Read as BVLC, the margin (a float at field 1) does not fit ParameterParameter.shape.
    assert unknown_fields(bvlc) == [f"layer[{len(bvlc.layer) - 1}] 'loss'.parameter_param: field 1"]
    assert detect_binary_dialect(data) == "lifted"


def test_unknown_fields_names_the_layer_and_the_number():
    net = caffe_pb2.NetParameter(name="n")
    net.layer.add(name="data", type="Input")
    conv = net.layer.add(name="conv1", type="Convolution")
    conv.convolution_param.num_output = 4
    conv.convolution_param.MergeFromString(b"\xe8\x04\x05")  # field 77, varint 5
    net.MergeFromString(b"\xd0\x05\x01")  # field 90, varint 1
    parsed = caffe_pb2.NetParameter.FromString(net.SerializeToString())
    assert unknown_fields(parsed) == ["field 90", "layer[1] 'conv1'.convolution_param: field 77"]
    assert unknown_fields(parsed.layer[1]) == ["convolution_param: field 77"]


def test_unknown_fields_in_v1_layers():
    net = caffe_pb2.NetParameter()
    blob = net.layers.add(name="ip", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT).blobs.add()
    blob.MergeFromString(b"\x98\x06\x07\x98\x06\x08")  # field 99 twice: reported once
    assert unknown_fields(net) == ["layers[0] 'ip'.blobs[0]: field 99"]


def test_a_bvlc_parameter_layer_is_bvlc():
    net = caffe_pb2.NetParameter()
    net.layer.add(name="w", type="Parameter", top=["w"]).parameter_param.shape.dim.extend([2, 3])
    data = net.SerializeToString()
    assert detect_binary_dialect(data) == "bvlc"
    assert messages("bvlc").NetParameter.FromString(data).layer[0].parameter_param.shape.dim == [2, 3]


def test_field_145_alone_decides_the_binary_dialect():
    lifted = messages("lifted").NetParameter()
    lifted.layer.add(name="loss", type="SomeLoss").lifted_struct_sim_softmax_loss_param.margin = 0.5
    assert detect_binary_dialect(lifted.SerializeToString()) == "lifted"

    bvlc = caffe_pb2.NetParameter()
    bvlc.layer.add(name="p", type="Renamed").parameter_param.shape.dim.append(3)
    assert detect_binary_dialect(bvlc.SerializeToString()) == "bvlc"


def test_a_net_without_fork_marks_is_bvlc():
    net = caffe_pb2.NetParameter()
    net.layer.add(name="ip", type="InnerProduct").inner_product_param.num_output = 3
    assert detect_binary_dialect(net.SerializeToString()) == "bvlc"
    assert detect_binary_dialect(b"") == "bvlc"


def test_detect_text_dialect(reference):
    lifted_text = (reference / "nets" / "solver" / "train.prototxt").read_text()
    assert detect_text_dialect(lifted_text) == "lifted"
    assert detect_text_dialect((reference / "nets" / "googlenet_deploy.prototxt").read_text()) == "bvlc"
    assert detect_text_dialect("layer {\n  lifted_struct_sim_softmax_loss_param { margin: 2 }\n}") == "lifted"
    assert detect_text_dialect("layer { type: 'LiftedStructSimilaritySoftmaxLoss' }") == "lifted"
    assert detect_text_dialect('# was: lifted_struct_sim_softmax_loss_param { }\nname: "a #b"') == "bvlc"
    assert detect_text_dialect('name: "lifted_struct_sim_softmax_loss_param"') == "bvlc"
    from google.protobuf import text_format
    net = text_format.Parse(lifted_text, messages("lifted").NetParameter())
    assert net.layer[-1].lifted_struct_sim_softmax_loss_param.margin == 1.0


def test_parses_caffemodels_over_64_mb():
    values = np.zeros(17_000_000, dtype=np.float32)
    values[-1] = 3.5
    # NetParameter.layer (100) > LayerParameter.blobs (7) > BlobProto.data (5, packed), by hand: fast.
    blob = wire.length_delimited(5, values.tobytes())
    layer = wire.length_delimited(1, b"big") + wire.length_delimited(7, blob)
    data = wire.length_delimited(100, layer)
    assert len(data) > 64 << 20
    net = caffe_pb2.NetParameter.FromString(data)
    parsed = net.layer[0].blobs[0].data
    assert len(parsed) == values.size and parsed[-1] == 3.5
    assert detect_binary_dialect(data) == "bvlc"
