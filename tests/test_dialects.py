"""Fork dialects as data (caffe_compat/io/dialects): each fork's schema, built from BVLC's
and its snippet, and the files of that fork read in it."""
import math
import re
import warnings

import pytest
from conftest import REFERENCE, require

from caffe_compat.errors import CaffeCompatError
from caffe_compat.io.dialects import ENTRIES, schema_file, snippet
from caffe_compat.io.files import read_caffemodel, read_prototxt
from caffe_compat.io.schema import messages

SSD = REFERENCE / "forks" / "ssd"
SSD_PROTOTXTS = sorted(p.name for p in require(SSD).glob("*.prototxt"))


def _numbers(dialect, message, names):
    fields = getattr(messages(dialect), message).DESCRIPTOR.fields_by_name
    return {name: fields[name].number for name in names if name in fields}


def test_ssd_layer_fields_are_the_forks():
    expected = {"annotated_data_param": 200, "multibox_loss_param": 201, "permute_param": 202,
                "prior_box_param": 203, "detection_output_param": 204, "detection_evaluate_param": 205,
                "norm_param": 206, "video_data_param": 207, "parameter_param": 145, "swish_param": 147}
    assert _numbers("ssd", "LayerParameter", expected) == expected
    layer = messages("ssd").LayerParameter.DESCRIPTOR.fields_by_name
    assert layer["detection_output_param"].message_type.name == "DetectionOutputParameter"
    assert layer["norm_param"].message_type.name == "NormalizeParameter"
    code_type = messages("ssd").DetectionOutputParameter.DESCRIPTOR.fields_by_name["code_type"]
    assert code_type.enum_type.full_name == "caffe.PriorBoxParameter.CodeType"
    assert [v.name for v in code_type.enum_type.values] == ["CORNER", "CENTER_SIZE", "CORNER_SIZE"]
    assert messages("ssd").PriorBoxParameter().clip is False
    assert messages("ssd").NormalizeParameter().eps == pytest.approx(1e-10)


def test_opencv_layer_fields_are_opencvs():
    expected = {"detection_output_param": 147, "permute_param": 148, "norm_param": 149,
                "prior_box_param": 150, "proposal_param": 201, "psroi_pooling_param": 10002,
                "roi_pooling_param": 8266711}
    assert _numbers("opencv", "LayerParameter", expected) == expected
    # BVLC's fields at those numbers live on by name, at numbers no caffemodel carries.
    assert _numbers("opencv", "LayerParameter", ["swish_param", "clip_param"]) == {
        "swish_param": snippet.displaced_number(147), "clip_param": snippet.displaced_number(148)}
    pooling = messages("opencv").PoolingParameter.DESCRIPTOR.fields_by_name
    assert pooling["ceil_mode"].number == 13 and pooling["round_mode"].number == snippet.displaced_number(13)
    assert messages("opencv").PoolingParameter().ceil_mode is True
    assert messages("opencv").PriorBoxParameter().clip is True  # OpenCV's default, not the SSD fork's
    assert "normalized_bbox" in messages("opencv").DetectionOutputParameter.DESCRIPTOR.fields_by_name


@pytest.mark.parametrize("name", SSD_PROTOTXTS)
def test_ssd_fixtures_read_in_the_ssd_dialect(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no field left unknown
        text = read_prototxt(SSD / name)
        binary = read_caffemodel(SSD / name.replace(".prototxt", ".caffemodel"))
    assert text.dialect == binary.dialect == "ssd"
    fields = {"Permute": "permute_param", "PriorBox": "prior_box_param",
              "DetectionOutput": "detection_output_param", "Normalize": "norm_param"}
    for net in (text.net, binary.net):
        for layer in net.layer:
            if layer.type in fields:
                assert layer.HasField(fields[layer.type]), (name, layer.name)


def test_ssd_settings_are_decoded_by_name():
    net = read_prototxt(SSD / "detout_00.prototxt").net
    param = net.layer[-1].detection_output_param
    assert (param.num_classes, param.keep_top_k, param.nms_param.top_k) == (21, 60, 40)
    assert param.code_type == messages("ssd").PriorBoxParameter.CENTER_SIZE
    prior = read_prototxt(SSD / "priorbox_01.prototxt").net.layer[-1].prior_box_param
    assert list(prior.min_size) == [60] and list(prior.variance) == pytest.approx([0.1, 0.1, 0.2, 0.2])


def test_a_snippet_changes_a_message_by_field_number_and_adds_messages():
    base = schema_file("bvlc")
    changed = type(base)()
    changed.CopyFrom(base)
    snippet.apply(changed, """
        message PoolingParameter { optional bool ceil_mode = 13 [default = true]; }  // replaces round_mode
        message LayerParameter { optional MyParameter my_param = 9000; }
        message MyParameter {
          enum Mode { A = 0; B = 1; }
          optional Mode mode = 1 [default = B];
          repeated FillerParameter filler = 2;
          optional string tag = 3 [default = "x y"];
        }""", "test snippet")
    pooling = next(m for m in changed.message_type if m.name == "PoolingParameter")
    assert [f.name for f in pooling.field if f.number == 13] == ["ceil_mode"]
    assert [f.number for f in pooling.field if f.name == "round_mode"] == [snippet.displaced_number(13)]
    mine = next(m for m in changed.message_type if m.name == "MyParameter")
    assert [(f.name, f.type_name) for f in mine.field if f.type_name] == [
        ("mode", ".caffe.MyParameter.Mode"), ("filler", ".caffe.FillerParameter")]
    assert next(f for f in mine.field if f.name == "tag").default_value == "x y"


@pytest.mark.parametrize("text, message", [
    ("message A { optional Nowhere x = 1; }", r"test snippet: field caffe\.A\.x: unknown type 'Nowhere'"),
    ("message A {\n  optional int32 x = ;\n}", r"test snippet: line 2: expected a number, found ';'"),
    ("message A { int32 x = 1; }", r"test snippet: line 1: message A: expected a field"),
    ("service S {}", r"test snippet: line 1: expected a message or an enum, found 'service'"),
    ("message A { optional int32 x = 1 [json_name = 'y']; }", r"field x: unsupported option 'json_name'"),
])
def test_a_bad_snippet_is_named_with_its_line(text, message):
    changed = type(schema_file("bvlc"))()
    changed.CopyFrom(schema_file("bvlc"))
    with pytest.raises(CaffeCompatError, match=message):
        snippet.apply(changed, text, "test snippet")


def _caffemodel(tmp_path, dialect, build, name="w.caffemodel"):
    net = messages(dialect).NetParameter(name="n")
    build(net)
    path = tmp_path / name
    path.write_bytes(net.SerializeToString())
    return path


def _proposal(net):
    # OpenCV's proposal_param is field 201, the SSD fork's multibox_loss_param: feat_stride 1
    # there is loc_loss_type SMOOTH_L1 here, a varint either way (8 would be no valid enum value).
    net.layer.add(name="rpn", type="Proposal").proposal_param.feat_stride = 1


def test_field_204_is_the_ssd_forks_detection_output(tmp_path):
    def build(net):
        net.layer.add(name="det", type="DetectionOutput").detection_output_param.num_classes = 21
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one dialect fits: no note
        net_file = read_caffemodel(_caffemodel(tmp_path, "ssd", build))
    assert net_file.dialect == "ssd" and net_file.net.layer[0].detection_output_param.num_classes == 21
    # OpenCV writes the same layer at 147 (BVLC's swish_param), which only it reads cleanly.
    assert read_caffemodel(_caffemodel(tmp_path, "opencv", build, "cv.caffemodel")).dialect == "opencv"


def test_a_caffemodel_that_fits_several_dialects_says_so(tmp_path):
    path = _caffemodel(tmp_path, "opencv", _proposal)
    with pytest.warns(UserWarning, match=r"w\.caffemodel: it fits dialects ssd, opencv; read as ssd \(--dialect"):
        assert read_caffemodel(path).dialect == "ssd"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = read_caffemodel(path, dialect="opencv")
    assert chosen.dialect == "opencv" and chosen.net.layer[0].proposal_param.feat_stride == 1


def test_the_prototxts_dialect_breaks_the_tie(tmp_path):
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "rpn" type: "Proposal" proposal_param { feat_stride: 8 } }\n')
    prototxt = read_prototxt(tmp_path / "net.prototxt")
    assert prototxt.dialect == "opencv"
    with pytest.warns(UserWarning, match=r"fits dialects ssd, opencv; read as opencv, the prototxt's"):
        net_file = read_caffemodel(_caffemodel(tmp_path, "opencv", _proposal), prototxt=prototxt)
    assert net_file.dialect == "opencv" and net_file.net.layer[0].proposal_param.feat_stride == 1


def test_a_caffemodel_of_another_fork_than_its_prototxt_is_read_in_its_own_with_a_note(tmp_path):
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "loss" type: "LiftedStructSimilaritySoftmaxLoss" '
        'lifted_struct_sim_softmax_loss_param { margin: 2 } }\n')
    prototxt = read_prototxt(tmp_path / "net.prototxt")
    path = _caffemodel(tmp_path, "ssd", lambda net: net.layer.add(name="p", type="Permute").permute_param.order.append(0))
    with pytest.warns(UserWarning, match=r"w\.caffemodel: written in dialect ssd \(the SSD fork .*\), read so; "
                                         r".*net\.prototxt is in dialect lifted, which would leave 1 of its fields"):
        assert read_caffemodel(path, prototxt=prototxt).dialect == "ssd"
    with pytest.warns(UserWarning, match=r"does not know were kept but ignored: layer\[0\] 'p': field 202"):
        assert read_caffemodel(path, dialect="lifted", prototxt=prototxt).dialect == "lifted"


def test_a_bvlc_prototxt_claims_no_fork(tmp_path):
    # A deploy net (no loss) beside the lifted fork's trained weights: each file its own dialect.
    (tmp_path / "net.prototxt").write_text('layer { name: "ip" type: "InnerProduct" }\n')
    lifted = _caffemodel(tmp_path, "lifted", lambda net: net.layer.add(
        name="loss", type="LiftedStructSimilaritySoftmaxLoss").lifted_struct_sim_softmax_loss_param.SetInParent())
    assert read_caffemodel(lifted, prototxt=read_prototxt(tmp_path / "net.prototxt")).dialect == "lifted"


FORK_LAYERS = REFERENCE / "forks" / "layers"
# Each case's fork (its README's table), and the field holding its settings.
FORK_LAYER_CASES = {
    "interp_00": ("pspnet", "interp_param"), "bn_01": ("pspnet", "bn_param"),
    "segnetbn_01": ("segnet", "bn_param"), "upsample_02": ("segnet", "upsample_param"),
    "roipool_01": ("faster-rcnn", "roi_pooling_param"), "shuffle_05": ("shufflenet", "shuffle_channel_param"),
    "relu6_02": ("mobilenet-yolo", "relu6_param"), "convdw_04": ("mobilenet", "convolution_param"),
    "dwconv_00": ("depthwise", "convolution_param"), "axpy_07": ("senet", None),
    "ceilpool_00": ("ceil-mode", "pooling_param"),
}


@pytest.mark.parametrize("case", sorted(FORK_LAYER_CASES))
def test_fork_layer_fixtures_read_in_their_forks_dialect(case):
    dialect, field = FORK_LAYER_CASES[case]
    net = read_prototxt(require(FORK_LAYERS / f"{case}.prototxt"))
    assert net.dialect == dialect
    layer = net.net.layer[-1]
    if field:
        assert layer.HasField(field)
    if layer.type != "Pooling":  # the type table names the fork's own types
        assert ENTRIES[dialect].layer_types[layer.type] == (field or "")


def test_fork_numbers_taken_from_bvlc_fields():
    assert _numbers("pspnet", "LayerParameter", ["interp_param", "bn_param", "input_param"]) == {
        "interp_param": 143, "bn_param": 152, "input_param": snippet.displaced_number(143)}
    assert _numbers("segnet", "LayerParameter", ["bn_param", "upsample_param", "embed_param"]) == {
        "bn_param": 45, "upsample_param": 137, "embed_param": snippet.displaced_number(137)}
    assert _numbers("faster-rcnn", "LayerParameter", ["roi_pooling_param"]) == {"roi_pooling_param": 8266711}
    assert messages("segnet").BNParameter().bn_mode == messages("segnet").BNParameter.LEARN
    assert messages("pspnet").BNParameter().momentum == pytest.approx(0.9)


@pytest.mark.parametrize("case", ["ceilpool_00", "ceilpool_03", "ceilpool_05"])
def test_ceil_mode_decides_the_pooled_size_by_its_name(case):
    import numpy as np
    from caffe_compat.tools.inspect import inspect_net
    reference = np.load(FORK_LAYERS / f"{case}.npz")
    info = inspect_net(FORK_LAYERS / f"{case}.prototxt")
    pool = next(r for r in info["layers"] if r["type"] == "Pooling")
    assert [tuple(s) for s in pool["top_shapes"].values()] == [reference[f"blob/{t}"].shape for t in pool["tops"]]


def test_a_pooling_layer_naming_both_ceil_mode_and_round_mode_is_not_guessed(tmp_path):
    from caffe_compat.tools.inspect import inspect_net
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 7 dim: 7 } } }\n'
        'layer { name: "pool" type: "Pooling" bottom: "data" top: "out" '
        'pooling_param { kernel_size: 2 stride: 2 ceil_mode: false round_mode: CEIL } }\n')
    info = inspect_net(tmp_path / "net.prototxt")  # inspect shows it, its shape unknown, and why
    assert info["layers"][-1]["top_shapes"] == {"out": None}
    assert info["shape_notes"] == ["layer 'pool' (Pooling): gives both ceil_mode and round_mode; keep one"]


FORK_PROTOTXTS = sorted(str(p.relative_to(REFERENCE / "forks")) for p in (REFERENCE / "forks").rglob("*.prototxt"))


@pytest.mark.parametrize("name", FORK_PROTOTXTS)
def test_inspect_shows_every_fork_net_and_names_what_it_cannot_build(name):
    from caffe_compat.tools.inspect import buildable, format_inspection, inspect_net
    info = inspect_net(REFERENCE / "forks" / name)
    assert info["layers"] and info["dialect"] != "bvlc"
    for row in info["layers"]:
        if buildable(row["type"]):
            assert row["fork"] is None
        else:  # the fork is named from the dialect's own table
            assert f"[dialect {info['dialect']}]" in row["fork"], row
            assert f"'{row['name']}' ({row['type']}, from {row['fork']})" in info["cannot_build"]
    assert "Traceback" not in format_inspection(info, 100)


def test_inspect_names_an_unbuildable_layer_and_its_fork_and_convert_refuses_it(tmp_path):
    from conftest import run_cli
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }\n'
        'layer { name: "up" type: "DenseImageData" top: "up" dense_image_data_param { batch_size: 2 } }\n')
    shown = run_cli("inspect", "net.prototxt", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "dialect segnet" in shown.stdout and "batch_size=2" in shown.stdout
    assert ("cannot build (no builder; inspect only): 'up' (DenseImageData, from SegNet (alexgkendall/caffe-segnet) "
            "[dialect segnet])") in " ".join(shown.stdout.split())
    refused = run_cli("convert", "net.prototxt", "--random-init", "-o", "m.pt", cwd=tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.startswith("caffe-compat: error: layer 'up': unknown layer type 'DenseImageData' (from SegNet")


def test_inspect_shows_undecoded_settings_by_field_number(tmp_path):
    from caffe_compat.tools.inspect import inspect_net
    # A faster-rcnn caffemodel read in BVLC's dialect: ROIPooling's settings stay raw.
    def build(net):
        net.layer.add(name="data", type="Input", top=["data"]).input_param.shape.add(dim=[1, 2, 4, 4])
        net.layer.add(name="roi", type="ROIPooling", bottom=["data"], top=["out"]).roi_pooling_param.pooled_h = 2
    path = _caffemodel(tmp_path, "faster-rcnn", build)
    with pytest.warns(UserWarning, match="field 8266711"):
        info = inspect_net(path, dialect="bvlc")
    assert info["layers"][-1]["unknown_fields"] == ["field 8266711"] and info["layers"][-1]["params"] == {}
    with pytest.warns(UserWarning, match="it fits dialects faster-rcnn, rfcn, opencv; read as faster-rcnn"):
        assert inspect_net(path)["layers"][-1]["params"] == {"roi_pooling_param": {"pooled_h": 2}}


# A fork layer added from Python, settings included: darknet2caffe's Mish, its parameter
# at LayerParameter 150 (OpenCV's prior_box_param: that dialect keeps its own).
_MISH = '''
import sys, warnings
import torch
import caffe_compat.layers as layers
from caffe_compat.io.files import read_caffemodel, read_prototxt, write_caffemodel
from caffe_compat.io.schema import messages
from caffe_compat.loading import load_net

@layers.register("Mish", param="""
    message MishParameter { optional float beta = 3 [default = 1]; }
    message LayerParameter { optional MishParameter mish_param = 150; }""")
def build_mish(ctx):
    beta = ctx.param.mish_param.beta
    return ctx.wire(Mish(beta))

class Mish(torch.nn.Module):
    def __init__(self, beta):
        super().__init__()
        self.beta = beta
    def forward(self, x):
        return x * torch.tanh(torch.nn.functional.softplus(self.beta * x) / self.beta)

net_file = read_prototxt(sys.argv[1])
layer = net_file.net.layer[-1]
print(net_file.dialect, layer.mish_param.beta, type(layer).DESCRIPTOR.fields_by_name["mish_param"].number)
net = load_net(net_file)
out = net(data=torch.tensor([[-1.0, 0.0, 2.0]]))["out"]
print([round(v, 4) for v in out.flatten().tolist()])
write_caffemodel(net_file.net, sys.argv[2])
with warnings.catch_warnings():
    warnings.simplefilter("error")
    back = read_caffemodel(sys.argv[2])
print(back.dialect, back.net.layer[-1].mish_param.beta)
print("mish_param" in messages("opencv").LayerParameter.DESCRIPTOR.fields_by_name)
'''


def test_a_fork_layer_registered_with_its_parameter_reads_and_runs(tmp_path):
    from conftest import run_python
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
        'layer { name: "mish" type: "Mish" bottom: "data" top: "out" mish_param { beta: 2 } }\n')
    done = run_python(_MISH, tmp_path / "net.prototxt", tmp_path / "w.caffemodel")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "bvlc 2.0 150"
    expected = [x * math.tanh(math.log1p(math.exp(2 * x)) / 2) for x in (-1.0, 0.0, 2.0)]
    assert [float(v) for v in lines[1].strip("[]").split(",")] == pytest.approx(expected, abs=1e-4)
    assert lines[2:] == ["bvlc 2.0", "False"]


@pytest.mark.parametrize("call, message", [
    ("register('X', param='message XParameter { optional float a = 1; }')", "no LayerParameter field holds"),
    ("register('X', param='message XParameter { optional float a = 1; }', field=('convolution_param', 9000))",
     "LayerParameter field 106 is convolution_param in BVLC's schema already"),
    ("register('X', param='message XParameter { optional float a = 1; }', field=('x_param', 106))",
     "LayerParameter field 106 is convolution_param"),
    ("register('X', param='message PoolingParameter { optional bool b = 40; }', field=('x_param', 9000))",
     "message PoolingParameter exists"),
    ("register('X', param='message XParameter { optional Nope a = 1; }', field=('x_param', 9000))",
     r"@register\('X'\): field caffe.XParameter.a: unknown type 'Nope'"),
    ("register('X', param=3, field=('x_param', 9000))", "param must be a .proto snippet"),
    ("register('X', field=('x_param', 9000))", "needs param="),
    ("register('X', param='message XParameter { optional float a = 1; }', field='x_param = 9000')",
     r"field must be \(name, number\) of the LayerParameter field holding param's message, got 'x_param = 9000'"),
])
def test_a_bad_layer_parameter_is_refused_in_one_line(call, message):
    from conftest import run_python
    done = run_python("from caffe_compat.errors import CaffeCompatError\nfrom caffe_compat.layers import register\n"
                      f"try:\n    {call}\nexcept CaffeCompatError as err:\n    print(err)\n")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1 and re.search(message, done.stdout), done.stdout


def test_a_layer_parameter_given_as_a_descriptor():
    from conftest import run_python
    code = '''
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from caffe_compat.layers import register
from caffe_compat.io.schema import messages
file = descriptor_pb2.FileDescriptorProto(name="mine.proto", package="mine")
message = file.message_type.add(name="ScaleUpParameter")
mode = message.enum_type.add(name="Mode")
mode.value.add(name="FAST", number=0)
mode.value.add(name="EXACT", number=1)
message.field.add(name="factor", number=1, type=2, label=1, default_value="2")
message.field.add(name="mode", number=2, type=14, label=1, type_name=".mine.ScaleUpParameter.Mode")
descriptor = descriptor_pool.DescriptorPool().AddSerializedFile(file.SerializeToString()).message_types_by_name["ScaleUpParameter"]
register("ScaleUp", param=descriptor, field=("scale_up_param", 31337))(lambda ctx: None)
layer = messages("ssd").LayerParameter()
layer.scale_up_param.mode = messages("ssd").ScaleUpParameter.EXACT
print(layer.scale_up_param.factor, layer.scale_up_param.mode, type(layer).DESCRIPTOR.fields_by_name["scale_up_param"].number)
'''
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2.0", "1", "31337"]


def test_convert_writes_a_model_back_in_the_dialect_it_came_from(tmp_path):
    from conftest import run_cli
    prototxt = FORK_LAYERS / "ceilpool_00.prototxt"
    made = run_cli("convert", prototxt, FORK_LAYERS / "ceilpool_00.caffemodel", "-o", "m.pt", cwd=tmp_path)
    assert made.returncode == 0 and "dialect ceil-mode" in made.stdout, made.stderr
    back = run_cli("convert", "m.pt", "-o", "back.caffemodel", cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    # PoolingParameter field 13 as the fork writes it: ceil_mode false, varint 0 (BVLC's round_mode CEIL).
    net = messages("ceil-mode").NetParameter.FromString((tmp_path / "back.caffemodel").read_bytes())
    pooling = net.layer[-1].pooling_param
    assert pooling.HasField("ceil_mode") and pooling.ceil_mode is False
    assert pooling.SerializeToString().count(b"\x68\x00") == 1


def test_pooling_field_13_alone_names_both_readings(tmp_path):
    def build(net):
        net.layer.add(name="pool", type="Pooling").pooling_param.ceil_mode = False
    path = _caffemodel(tmp_path, "ceil-mode", build)
    with pytest.warns(UserWarning, match=r"it fits dialects bvlc, ceil-mode, opencv; read as bvlc"):
        assert read_caffemodel(path).net.layer[0].pooling_param.round_mode == 0  # CEIL: the opposite
    (tmp_path / "net.prototxt").write_text('layer { name: "pool" type: "Pooling" pooling_param { ceil_mode: false } }')
    with pytest.warns(UserWarning, match=r"read as ceil-mode, the prototxt's"):
        net_file = read_caffemodel(path, prototxt=read_prototxt(tmp_path / "net.prototxt"))
    assert net_file.net.layer[0].pooling_param.ceil_mode is False


def test_inspect_reads_a_prototxt_with_field_names_no_dialect_has(tmp_path):
    from conftest import run_cli
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }\n'
        'layer { name: "region" type: "Region" bottom: "data" top: "out" region_param { classes: 20 } }\n')
    shown = run_cli("inspect", "net.prototxt", "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    import json
    info = json.loads(shown.stdout)
    assert [r["name"] for r in info["layers"]] == ["data", "region"]
    assert info["unknown_fields"] == ["field name 'classes' (not in dialect bvlc: skipped)",
                                      "field name 'region_param' (not in dialect bvlc: skipped)"]
    assert info["cannot_build"] == ["'region' (Region, from a fork this project has no entry for)"]
    refused = run_cli("convert", "net.prototxt", "--random-init", "-o", "m.pt", cwd=tmp_path)
    assert refused.returncode == 2 and 'has no field named "region_param"' in refused.stderr


def test_opencvs_face_detector_detection_output_reads_in_opencvs_dialect(tmp_path):
    # From opencv/opencv samples/dnn/face_detector/deploy.prototxt: `clip` is in OpenCV's
    # DetectionOutputParameter only (the SSD fork has `clip` in PriorBoxParameter).
    (tmp_path / "net.prototxt").write_text('''
layer { name: "p" type: "PriorBox" bottom: "f" bottom: "data" top: "p"
        prior_box_param { min_size: 30.0 max_size: 60.0 aspect_ratio: 2 flip: true clip: false step: 8 } }
layer { name: "detection_out" type: "DetectionOutput" bottom: "l" bottom: "c" bottom: "p" top: "d"
        detection_output_param { num_classes: 2 share_location: true background_label_id: 0
          nms_param { nms_threshold: 0.45 top_k: 400 } code_type: CENTER_SIZE keep_top_k: 200
          confidence_threshold: 0.2 clip: 1 } }
''')
    net_file = read_prototxt(tmp_path / "net.prototxt")
    assert net_file.dialect == "opencv"
    assert net_file.net.layer[1].detection_output_param.clip is True
    assert net_file.net.layer[0].prior_box_param.clip is False
    with pytest.raises(CaffeCompatError, match='DetectionOutputParameter" has no field named "clip"'):
        read_prototxt(tmp_path / "net.prototxt", dialect="ssd")


def test_a_caffemodel_without_fork_marks_takes_its_prototxts_dialect_silently(tmp_path):
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "p" type: "Permute" bottom: "x" top: "y" permute_param { order: 0 } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "y" top: "z" }\n')
    path = _caffemodel(tmp_path, "bvlc", lambda net: net.layer.add(name="ip", type="InnerProduct").top.append("z"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_caffemodel(path).dialect == "bvlc"
        assert read_caffemodel(path, prototxt=read_prototxt(tmp_path / "net.prototxt")).dialect == "ssd"
