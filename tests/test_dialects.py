"""Fork dialects as data (caffe_compat/io/dialects): each fork's schema, built from BVLC's
and its snippet, and the files of that fork read in it."""
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


def test_a_caffemodel_of_another_fork_than_its_prototxt_is_refused(tmp_path):
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "loss" type: "LiftedStructSimilaritySoftmaxLoss" '
        'lifted_struct_sim_softmax_loss_param { margin: 2 } }\n')
    prototxt = read_prototxt(tmp_path / "net.prototxt")
    path = _caffemodel(tmp_path, "ssd", lambda net: net.layer.add(name="p", type="Permute").permute_param.order.append(0))
    with pytest.raises(CaffeCompatError, match=r"w\.caffemodel: written in dialect ssd \(the SSD fork .*\), but "
                                               r".*net\.prototxt is in dialect lifted, which leaves 1 of its fields"):
        read_caffemodel(path, prototxt=prototxt)
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
    from caffe_compat.inspect import inspect_net
    reference = np.load(FORK_LAYERS / f"{case}.npz")
    info = inspect_net(FORK_LAYERS / f"{case}.prototxt")
    pool = next(r for r in info["layers"] if r["type"] == "Pooling")
    assert [tuple(s) for s in pool["top_shapes"].values()] == [reference[f"blob/{t}"].shape for t in pool["tops"]]


def test_a_pooling_layer_naming_both_ceil_mode_and_round_mode_is_not_guessed(tmp_path):
    from caffe_compat.inspect import inspect_net
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
    from caffe_compat.inspect import buildable, format_inspection, inspect_net
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
    from caffe_compat.inspect import inspect_net
    # A faster-rcnn caffemodel read in BVLC's dialect: ROIPooling's settings stay raw.
    def build(net):
        net.layer.add(name="data", type="Input", top=["data"]).input_param.shape.add(dim=[1, 2, 4, 4])
        net.layer.add(name="roi", type="ROIPooling", bottom=["data"], top=["out"]).roi_pooling_param.pooled_h = 2
    path = _caffemodel(tmp_path, "faster-rcnn", build)
    with pytest.warns(UserWarning, match="field 8266711"):
        info = inspect_net(path, dialect="bvlc")
    assert info["layers"][-1]["unknown_fields"] == ["field 8266711"] and info["layers"][-1]["params"] == {}
    with pytest.warns(UserWarning, match="it fits dialects faster-rcnn, opencv; read as faster-rcnn"):
        assert inspect_net(path)["layers"][-1]["params"] == {"roi_pooling_param": {"pooled_h": 2}}
