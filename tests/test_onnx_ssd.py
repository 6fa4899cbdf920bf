"""SSD nets in ONNX Runtime, standard operators only: the fork's reference cases
(tests/fixtures/caffe-reference/forks/ssd) exported whole and run on the fork's inputs,
DetectionOutput's options against the transcription of the fork's loops in
test_layers_ssd, and the settings refused rather than exported differently."""
import glob
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from caffe_compat.converters.onnx import export_onnx
from caffe_compat.errors import CaffeCompatError
from caffe_compat.loading import load_net
from conftest import REFERENCE, require, run_cli
from layer_harness import onnx_model, rel_err, run_onnx
from test_layers_ssd import (DETECTION_OPTIONS, NMS_OPTIONS, assert_same_rows, detection_inputs,
                             fork_detection_output, ssd_layer)

if importlib.util.find_spec("onnxruntime") is None and not os.environ.get("CI"):
    pytest.skip("needs onnxruntime (pip install 'caffe-compat[onnxruntime]')", allow_module_level=True)

SSD = REFERENCE / "forks" / "ssd"
CASES = sorted(Path(p).stem for p in glob.glob(str(SSD / "*.npz")))


def fork_case(case):
    folder = require(SSD)
    model = folder / f"{case}.caffemodel"
    return load_net(folder / f"{case}.prototxt", model if model.exists() else None), np.load(folder / f"{case}.npz")


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("case", CASES)
def test_fork_case_in_onnx_runtime(case, opset):
    """Each output the same as the fork's: detections row for row (boxes and scores
    within 1e-6), priors and permutations to the bit, the rest within 1e-5."""
    net, ref = fork_case(case)
    model = export_onnx(net, opset=opset)
    assert {node.domain for node in model.graph.node} <= {""}, "a custom operator domain"
    outputs = run_onnx(model, [ref[f"blob/{graph_input.name}"] for graph_input in model.graph.input])
    types = {top: layer.type for layer in net.graph.layers for top in layer.tops}
    for graph_output, ours in zip(model.graph.output, outputs):
        want = ref[f"blob/{graph_output.name}"]
        kind = types[graph_output.name]
        if kind == "DetectionOutput":
            assert ours.shape == want.shape
            assert_same_rows(ours, want)
        elif kind in ("PriorBox", "Permute"):
            np.testing.assert_array_equal(ours, want)
        else:
            assert rel_err(ours, want) <= 1e-5, f"{case}: {graph_output.name}"


DETECTION_CASES = [(params, fork, nms_text, nms) for params, fork in DETECTION_OPTIONS
                   for nms_text, nms in NMS_OPTIONS if nms.get("eta", 1) == 1]


def detection_model(params, shapes, opset=17):
    ctx, converted = ssd_layer("DetectionOutput", f"detection_output_param {{ {params} }}", shapes)
    return onnx_model("DetectionOutput", ctx, converted, opset, output_dims=[["one", "one_", "rows", 7]])


@pytest.mark.parametrize("params,fork,nms_text,nms", DETECTION_CASES)
def test_detection_options_in_onnx_runtime(params, fork, nms_text, nms):
    """Every code_type, share_location both ways, background labels, keep_top_k cutting,
    top_k, nothing detected; batch 3, and batch 2 from the same model (symbolic batch)."""
    num, priors, classes = 3, 30, 4
    loc, conf, prior = detection_inputs(num, priors, classes, fork.get("share_location", True), seed=len(params))
    model = detection_model(f"num_classes: {classes} {params} nms_param {{ {nms_text} }}",
                            [loc.shape, conf.shape, prior.shape])
    for batch in (num, 2):
        (ours,) = run_onnx(model, [loc[:batch], conf[:batch], prior])
        want = fork_detection_output(loc[:batch], conf[:batch], prior, classes, **fork, **nms)
        assert ours.shape[:2] == (1, 1)
        assert_same_rows(ours, want)


def test_images_without_detections_have_no_rows_in_onnx_runtime():
    loc, conf, prior = detection_inputs(3, 20, 3, True, seed=4)
    conf[1] = 0
    model = detection_model("num_classes: 3 confidence_threshold: 0.2", [loc.shape, conf.shape, prior.shape])
    (ours,) = run_onnx(model, [loc, conf, prior])
    assert_same_rows(ours, fork_detection_output(loc, conf, prior, 3, threshold=0.2))
    assert set(ours.reshape(-1, 7)[:, 0]) == {0, 2}


def test_inverted_boxes_neither_suppress_nor_are_suppressed():
    """A decoded box whose max is below its min overlaps nothing in the fork; ONNX
    Runtime would swap its corners and let it suppress the box it then covers."""
    prior = np.array([[[0.2, 0.2, 0.6, 0.6, 0.2, 0.2, 0.6, 0.6], [0.1] * 8]], np.float32)
    loc = np.zeros((1, 8), np.float32)
    loc[0, 4:] = [4.0, 4.0, -4.0, -4.0]  # prior 1 decodes (CORNER, variance 0.1) to (0.6, 0.6, 0.2, 0.2)
    conf = np.array([[0.1, 0.5, 0.1, 0.9]], np.float32)  # prior 1 ranks first
    model = detection_model("num_classes: 2 code_type: CORNER", [loc.shape, conf.shape, prior.shape])
    (ours,) = run_onnx(model, [loc, conf, prior])
    want = fork_detection_output(loc, conf, prior, 2, code_type="CORNER")
    assert len(want) == 2
    assert_same_rows(ours, want)


def test_equal_scores_at_the_keep_top_k_cut_are_taken_by_label_and_rank():
    """Where keep_top_k cuts among equal scores the export picks as a stable sort would,
    not as the fork's std::sort (the documented difference; PyTorch follows the fork)."""
    loc, conf, prior = detection_inputs(2, 40, 3, True, seed=11, quantize=4)
    model = detection_model("num_classes: 3 keep_top_k: 9 nms_param { nms_threshold: 0.8 }",
                            [loc.shape, conf.shape, prior.shape])
    (ours,) = run_onnx(model, [loc, conf, prior])
    stable = fork_detection_output(loc, conf, prior, 3, keep_top_k=9, nms=0.8,
                                   sort=lambda items, before: items.sort(key=lambda item: -item[0]))
    assert_same_rows(ours, stable)


def test_adaptive_nms_is_refused_naming_the_layer_and_setting():
    loc, conf, prior = detection_inputs(1, 10, 2, True, seed=0)
    with pytest.raises(CaffeCompatError, match=r"layer 'layer' \(DetectionOutput\): nms_param.eta 0.8"):
        detection_model("num_classes: 2 nms_param { eta: 0.8 }", [loc.shape, conf.shape, prior.shape])


def test_adaptive_nms_export_is_one_cli_line(tmp_path):
    text = (SSD / "net_tiny_ssd.prototxt").read_text().replace("top_k: 60 }", "top_k: 60 eta: 0.9 }")
    assert "eta: 0.9" in text
    (tmp_path / "net.prototxt").write_text(text)
    result = run_cli("export-onnx", "net.prototxt", SSD / "net_tiny_ssd.caffemodel", "-o", "net.onnx", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "'detection_out'" in result.stderr and "eta 0.9" in result.stderr
    assert not (tmp_path / "net.onnx").exists()


def test_metadata_says_what_the_rows_are():
    net, _ = fork_case("net_tiny_ssd")
    props = {p.key: p.value for p in export_onnx(net).metadata_props}
    assert props["output.detection_out"].startswith("(1, 1, rows, 7): rows [image, label, score, xmin, ymin, "
                                                    "xmax, ymax]")
