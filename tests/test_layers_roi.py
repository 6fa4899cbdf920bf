"""The two-stage detectors' layers: Fast R-CNN's ROIPooling (rbgirshick/caffe-fast-rcnn
4115385d), R-FCN's PSROIPooling (daijifeng001/caffe-rfcn 543f8f6a, CUDA only: its kernel
is the specification) and py-faster-rcnn's Python ProposalLayer, built natively.

The fork's ROIPooling cases (tests/fixtures/caffe-reference/forks/layers/roipool_*) run
as one-layer nets; everything else is checked against transcriptions written here of
the forks' loops (ROIPooling's Forward_cpu and its GPU ROIPoolBackward, R-FCN's
PSROIPoolingForward / BackwardAtomic kernels, proposal_layer.py's forward with
generate_anchors, bbox_transform_inv, clip_boxes and the NMS kernel's overlap)."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from caffe_compat.tools.compare import compare_case
from caffe_compat.errors import CaffeCompatError
from caffe_compat.layers.proposal import Proposal
from caffe_compat.params.roi import RPNConfig, generate_anchors
from conftest import REFERENCE, require, run_cli
from layer_harness import build

LAYERS = REFERENCE / "forks" / "layers"
CASES = ["roipool_00", "roipool_01"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FASTER_RCNN = REFERENCE.parent / "faster_rcnn" / "tiny_test.prototxt"
f32 = np.float32
FLT_MAX = float(np.finfo(np.float32).max)


def c_round(x):
    """C's round(): half away from zero (x a float32 value, exact as a Python float)."""
    return int(math.copysign(math.floor(abs(float(x)) + 0.5), float(x)))


# ---- ROIPooling -------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_fork_case(case, device):
    folder = require(LAYERS)
    rows = compare_case(folder / f"{case}.prototxt", folder / f"{case}.caffemodel", folder / f"{case}.npz",
                        device=device)
    assert rows and all(r.ok for r in rows), "\n".join(r.format() for r in rows if not r.ok)


@pytest.mark.parametrize("case", CASES)
def test_fork_case_bit_for_bit(case):
    ref = np.load(require(LAYERS / f"{case}.npz"))
    param = open(LAYERS / f"{case}.prototxt").read().split("roi_pooling_param")[1].split("}")[0] + "}"
    _, converted = build("ROIPooling", "roi_pooling_param" + param,
                         [ref["input/data"].shape, ref["input/rois"].shape], dialect="faster-rcnn")
    ours = converted.module(torch.from_numpy(ref["input/data"]), torch.from_numpy(ref["input/rois"]))
    np.testing.assert_array_equal(ours.numpy(), ref["blob/out"])  # a max picks values, it computes none


def fork_roi_pool(data, rois, pooled_h, pooled_w, scale):
    """ROIPoolingLayer::Forward_cpu, loop for loop: (top, argmax)."""
    num, channels, height, width = data.shape
    scale = f32(scale)
    top = np.full((len(rois), channels, pooled_h, pooled_w), -FLT_MAX, f32)
    argmax = np.full(top.shape, -1, np.int64)
    for n, roi in enumerate(rois):
        batch = int(roi[0])
        start_w, start_h, end_w, end_h = (c_round(f32(v) * scale) for v in roi[1:])
        roi_h, roi_w = max(end_h - start_h + 1, 1), max(end_w - start_w + 1, 1)
        bin_h, bin_w = f32(roi_h) / f32(pooled_h), f32(roi_w) / f32(pooled_w)
        for c in range(channels):
            for ph in range(pooled_h):
                for pw in range(pooled_w):
                    hstart = min(max(math.floor(f32(ph) * bin_h) + start_h, 0), height)
                    hend = min(max(math.ceil(f32(ph + 1) * bin_h) + start_h, 0), height)
                    wstart = min(max(math.floor(f32(pw) * bin_w) + start_w, 0), width)
                    wend = min(max(math.ceil(f32(pw + 1) * bin_w) + start_w, 0), width)
                    if hend <= hstart or wend <= wstart:
                        top[n, c, ph, pw] = 0
                    for h in range(hstart, hend):
                        for w in range(wstart, wend):
                            if data[batch, c, h, w] > top[n, c, ph, pw]:
                                top[n, c, ph, pw] = data[batch, c, h, w]
                                argmax[n, c, ph, pw] = h * width + w
    return top, argmax


def fork_roi_pool_backward(top_diff, argmax, rois, shape, pooled_h, pooled_w, scale):
    """The GPU kernel ROIPoolBackward, loop for loop (the fork's CPU backward is
    NOT_IMPLEMENTED)."""
    num, channels, height, width = shape
    scale = f32(scale)
    diff = np.zeros(shape, f32)
    for b in range(num):
        for c in range(channels):
            for h in range(height):
                for w in range(width):
                    gradient = f32(0)
                    for n, roi in enumerate(rois):
                        if int(roi[0]) != b:
                            continue
                        start_w, start_h, end_w, end_h = (c_round(f32(v) * scale) for v in roi[1:])
                        if not (start_w <= w <= end_w and start_h <= h <= end_h):
                            continue
                        roi_h, roi_w = max(end_h - start_h + 1, 1), max(end_w - start_w + 1, 1)
                        bin_h, bin_w = f32(roi_h) / f32(pooled_h), f32(roi_w) / f32(pooled_w)
                        phs = min(max(math.floor(f32(h - start_h) / bin_h), 0), pooled_h)
                        phe = min(max(math.ceil(f32(h - start_h + 1) / bin_h), 0), pooled_h)
                        pws = min(max(math.floor(f32(w - start_w) / bin_w), 0), pooled_w)
                        pwe = min(max(math.ceil(f32(w - start_w + 1) / bin_w), 0), pooled_w)
                        for ph in range(phs, phe):
                            for pw in range(pws, pwe):
                                if argmax[n, c, ph, pw] == h * width + w:
                                    gradient += top_diff[n, c, ph, pw]
                    diff[b, c, h, w] = gradient
    return diff


def _roi_case(seed, shape, count, extent):
    """Random data with ties (values on a coarse grid), and rois that lie partly or
    wholly outside, are malformed (x2 < x1), sit on halves (C's round away from 0)."""
    rng = np.random.default_rng(seed)
    data = (rng.integers(-6, 6, size=shape) / 4).astype(f32)
    x1 = rng.uniform(-0.3, 1.0, count) * extent
    y1 = rng.uniform(-0.3, 1.0, count) * extent
    rois = np.stack([rng.integers(0, shape[0], count) + rng.uniform(0, 0.9, count), x1, y1,
                     x1 + rng.uniform(-0.2, 0.9, count) * extent, y1 + rng.uniform(-0.2, 0.9, count) * extent], 1)
    rois[:3, 1:] = [[2.5, -2.5, 7.5, 4.5], [-0.5, 0.5, 1.5, 1.5], [1e4, 1e4, 2e4, 2e4]]
    rois[:3, 1:] *= extent / shape[-1]
    return data, rois.astype(f32)


ROI_SETTINGS = [((2, 3, 9, 11), 2, 2, 1.0), ((2, 2, 8, 7), 3, 2, 0.5), ((1, 2, 12, 10), 4, 3, 0.0625)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape,pooled_h,pooled_w,scale", ROI_SETTINGS)
def test_roi_pooling_against_forward_cpu_and_gpu_backward(shape, pooled_h, pooled_w, scale, seed, device):
    data, rois = _roi_case(seed, shape, 12, shape[-1] / scale)
    data[0, 0, :2, :2] = np.nan  # never taken: `NaN > x` is false
    data[-1, -1] = -3.0  # a channel of equal negative values: the first is the max
    top, argmax = fork_roi_pool(data, rois, pooled_h, pooled_w, scale)
    _, converted = build("ROIPooling", f"roi_pooling_param {{ pooled_h: {pooled_h} pooled_w: {pooled_w} "
                         f"spatial_scale: {scale} }}", [shape, rois.shape], dialect="faster-rcnn")
    bottom = torch.tensor(data, device=device, requires_grad=True)
    ours = converted.module(bottom, torch.tensor(rois, device=device))
    np.testing.assert_array_equal(ours.detach().cpu().numpy(), top)
    top_diff = np.random.default_rng(seed + 10).standard_normal(top.shape).astype(f32)
    ours.backward(torch.tensor(top_diff, device=device))
    want = fork_roi_pool_backward(top_diff, argmax, rois, shape, pooled_h, pooled_w, scale)
    np.testing.assert_allclose(bottom.grad.cpu().numpy(), want, rtol=1e-6, atol=1e-6)


def test_roi_pooling_empty_bins_and_malformed_rois():
    data = -np.arange(2 * 1 * 4 * 4, dtype=f32).reshape(2, 1, 4, 4) - 1
    rois = np.array([[1, 10, 10, 20, 20],  # wholly outside: every bin empty, 0
                     [0, 2, 2, 1, 1],  # malformed: forced to 1x1 at (2, 2) (both bins), no gradient
                     [1.9, 0, 0, 3, 3]], f32)  # batch index 1.9 is image 1
    _, converted = build("ROIPooling", "roi_pooling_param { pooled_h: 2 pooled_w: 2 }", [data.shape, rois.shape],
                         dialect="faster-rcnn")
    bottom = torch.tensor(data, requires_grad=True)
    out = converted.module(bottom, torch.tensor(rois))
    assert out[0].eq(0).all()
    assert out[1].eq(float(data[0, 0, 2, 2])).all()  # negative values stay negative
    assert out[2, 0].tolist() == [[data[1, 0, 0, 0], data[1, 0, 0, 2]], [data[1, 0, 2, 0], data[1, 0, 2, 2]]]
    out.sum().backward()
    assert bottom.grad[0].eq(0).all() and bottom.grad[1].sum() == 4


# ---- PSROIPooling -----------------------------------------------------------------

def fork_psroi_pool(data, rois, output_dim, group, scale):
    """PSROIPoolingForward (the .cu kernel), thread by thread: (top, bin areas)."""
    num, channels, height, width = data.shape
    scale = f32(scale)
    top = np.zeros((len(rois), output_dim, group, group), f32)
    area = np.zeros(top.shape, f32)
    for n, roi in enumerate(rois):
        batch = int(roi[0])
        start_w, start_h = f32(c_round(roi[1])) * scale, f32(c_round(roi[2])) * scale
        end_w, end_h = f32(c_round(roi[3]) + 1.0) * scale, f32(c_round(roi[4]) + 1.0) * scale
        roi_w, roi_h = f32(max(float(end_w - start_w), 0.1)), f32(max(float(end_h - start_h), 0.1))
        bin_h, bin_w = roi_h / f32(group), roi_w / f32(group)
        for ctop in range(output_dim):
            for ph in range(group):
                for pw in range(group):
                    hstart = min(max(math.floor(f32(ph) * bin_h + start_h), 0), height)
                    wstart = min(max(math.floor(f32(pw) * bin_w + start_w), 0), width)
                    hend = min(max(math.ceil(f32(ph + 1) * bin_h + start_h), 0), height)
                    wend = min(max(math.ceil(f32(pw + 1) * bin_w + start_w), 0), width)
                    c = (ctop * group + ph) * group + pw
                    total = f32(0)
                    for h in range(hstart, hend):
                        for w in range(wstart, wend):
                            total += data[batch, c, h, w]
                    bin_area = f32((hend - hstart) * (wend - wstart))
                    empty = hend <= hstart or wend <= wstart
                    top[n, ctop, ph, pw] = 0 if empty else total / bin_area
                    area[n, ctop, ph, pw] = 0 if empty else bin_area
    return top


def fork_psroi_backward(top_diff, rois, shape, output_dim, group, scale):
    """PSROIPoolingBackwardAtomic: each bin's diff / area added over its window."""
    num, channels, height, width = shape
    scale = f32(scale)
    diff = np.zeros(shape, np.float64)
    for n, roi in enumerate(rois):
        batch = int(roi[0])
        start_w, start_h = f32(c_round(roi[1])) * scale, f32(c_round(roi[2])) * scale
        end_w, end_h = f32(c_round(roi[3]) + 1.0) * scale, f32(c_round(roi[4]) + 1.0) * scale
        bin_h = f32(max(float(end_h - start_h), 0.1)) / f32(group)
        bin_w = f32(max(float(end_w - start_w), 0.1)) / f32(group)
        for ctop in range(output_dim):
            for ph in range(group):
                for pw in range(group):
                    hstart = min(max(math.floor(f32(ph) * bin_h + start_h), 0), height)
                    wstart = min(max(math.floor(f32(pw) * bin_w + start_w), 0), width)
                    hend = min(max(math.ceil(f32(ph + 1) * bin_h + start_h), 0), height)
                    wend = min(max(math.ceil(f32(pw + 1) * bin_w + start_w), 0), width)
                    if hend <= hstart or wend <= wstart:
                        continue
                    c = (ctop * group + ph) * group + pw
                    diff[batch, c, hstart:hend, wstart:wend] += top_diff[n, ctop, ph, pw] / f32(
                        (hend - hstart) * (wend - wstart))
    return diff


PSROI_SETTINGS = [((2, 2 * 9, 10, 12), 2, 3, 1.0), ((1, 3 * 4, 9, 9), 3, 2, 0.0625), ((2, 7 * 1, 6, 5), 7, 1, 0.5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape,output_dim,group,scale", PSROI_SETTINGS)
def test_psroi_pooling_against_the_kernel(shape, output_dim, group, scale, seed, device):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(shape).astype(f32)
    _, rois = _roi_case(seed, shape, 10, shape[-1] / scale)
    rois[3, 1:] = [5.0, 5.0, 5.0, 5.0]  # one pixel: the 0.1 floor does not apply, (x2 + 1) - x1 does
    rois[4, 1:] = [5.0, 5.0, 4.0, 4.0]  # x2 + 1 - x1 = 0: forced to 0.1
    top = fork_psroi_pool(data, rois, output_dim, group, scale)
    _, converted = build("PSROIPooling", f"psroi_pooling_param {{ spatial_scale: {scale} output_dim: {output_dim} "
                         f"group_size: {group} }}", [shape, rois.shape], dialect="rfcn")
    bottom = torch.tensor(data, device=device, requires_grad=True)
    ours = converted.module(bottom, torch.tensor(rois, device=device))
    # the kernel's sums, added in its order in float32
    np.testing.assert_array_equal(ours.detach().cpu().numpy(), top)
    top_diff = rng.standard_normal(top.shape).astype(f32)
    ours.backward(torch.tensor(top_diff, device=device))
    want = fork_psroi_backward(top_diff, rois, shape, output_dim, group, scale)
    np.testing.assert_allclose(bottom.grad.cpu().numpy(), want, rtol=1e-5, atol=1e-6)


# ---- the proposal layer -----------------------------------------------------------

def test_default_anchors_are_py_faster_rcnns():
    # what generate_anchors() returns (its comment's MATLAB anchors are each 1 pixel larger)
    want = [[-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199], [-56, -56, 71, 71],
            [-120, -120, 135, 135], [-248, -248, 263, 263], [-36, -80, 51, 95], [-80, -168, 95, 183],
            [-168, -344, 183, 359]]
    np.testing.assert_array_equal(generate_anchors([8, 16, 32]), want)
    for scales in ([2, 4], [4, 8, 16, 32], [3, 5.5]):
        np.testing.assert_array_equal(generate_anchors(scales), fork_anchors(scales))


def fork_anchors(scales, base_size=16, ratios=(0.5, 1, 2)):
    """generate_anchors.py, function for function."""
    def whctrs(a):
        w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
        return w, h, a[0] + 0.5 * (w - 1), a[1] + 0.5 * (h - 1)

    def mkanchors(ws, hs, x, y):
        ws, hs = ws[:, None], hs[:, None]
        return np.hstack((x - 0.5 * (ws - 1), y - 0.5 * (hs - 1), x + 0.5 * (ws - 1), y + 0.5 * (hs - 1)))

    w, h, x, y = whctrs(np.array([1, 1, base_size, base_size]) - 1)
    ws = np.round(np.sqrt(w * h / np.array(ratios)))
    ratio_anchors = mkanchors(ws, np.round(ws * np.array(ratios)), x, y)
    rows = []
    for anchor in ratio_anchors:
        w, h, x, y = whctrs(anchor)
        rows.append(mkanchors(w * np.array(scales), h * np.array(scales), x, y))
    return np.vstack(rows)


def fork_nms(dets, thresh):
    """gpu_nms: the boxes sorted by argsort()[::-1], each dropped when its IoU (the
    kernel's devIoU: float32, `+ 1` sides) with a kept one before it is > thresh; the
    kept ones' indices into `dets`, in that order."""
    order = np.argsort(dets[:, 4], kind="stable")[::-1]
    x1, y1, x2, y2 = (dets[order, k] for k in range(4))
    areas = (x2 - x1 + f32(1)) * (y2 - y1 + f32(1))
    keep, suppressed = [], np.zeros(len(dets), bool)
    for i in range(len(dets)):
        if suppressed[i]:
            continue
        keep.append(i)
        later = np.arange(i + 1, len(dets))
        width = np.maximum(np.minimum(x2[i], x2[later]) - np.maximum(x1[i], x1[later]) + f32(1), f32(0))
        height = np.maximum(np.minimum(y2[i], y2[later]) - np.maximum(y1[i], y1[later]) + f32(1), f32(0))
        inter = width * height
        suppressed[later[inter / (areas[i] + areas[later] - inter) > f32(thresh)]] = True
    return list(order[keep])


def fork_proposals(scores, deltas, im_info, stride, scales, pre_n, post_n, thresh=0.7, min_size=16):
    """proposal_layer.py's forward (float32 blobs, as Caffe hands them over)."""
    anchors = fork_anchors(scales)
    count = anchors.shape[0]
    fg = scores[:, count:, :, :]
    height, width = fg.shape[-2:]
    shift_x, shift_y = np.meshgrid(np.arange(0, width) * stride, np.arange(0, height) * stride)
    shifts = np.vstack((shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel())).transpose()
    all_anchors = (anchors.reshape((1, count, 4)) + shifts.reshape((1, -1, 4)).transpose((1, 0, 2))).reshape(-1, 4)
    deltas = deltas.transpose((0, 2, 3, 1)).reshape((-1, 4))
    fg = fg.transpose((0, 2, 3, 1)).reshape((-1, 1))
    boxes = all_anchors.astype(f32)
    widths = boxes[:, 2] - boxes[:, 0] + f32(1.0)
    heights = boxes[:, 3] - boxes[:, 1] + f32(1.0)
    ctr_x, ctr_y = boxes[:, 0] + f32(0.5) * widths, boxes[:, 1] + f32(0.5) * heights
    pred_x, pred_y = deltas[:, 0] * widths + ctr_x, deltas[:, 1] * heights + ctr_y
    pred_w = np.exp(deltas[:, 2].astype(np.float64)).astype(f32) * widths
    pred_h = np.exp(deltas[:, 3].astype(np.float64)).astype(f32) * heights
    proposals = np.stack([pred_x - f32(0.5) * pred_w, pred_y - f32(0.5) * pred_h,
                          pred_x + f32(0.5) * pred_w, pred_y + f32(0.5) * pred_h], 1)
    info = im_info[0]
    limit = np.array([info[1] - f32(1), info[0] - f32(1)] * 2, f32)
    proposals = np.maximum(np.minimum(proposals, limit), f32(0))
    least = f32(min_size) * info[2]
    ws, hs = proposals[:, 2] - proposals[:, 0] + f32(1), proposals[:, 3] - proposals[:, 1] + f32(1)
    keep = np.where((ws >= least) & (hs >= least))[0]
    proposals, fg = proposals[keep], fg[keep]
    order = np.argsort(fg.ravel(), kind="stable")[::-1][:pre_n]
    proposals, fg = proposals[order], fg[order]
    keep = fork_nms(np.hstack((proposals, fg)), thresh)[:post_n]
    proposals, fg = proposals[keep], fg[keep]
    return np.hstack((np.zeros((len(proposals), 1), f32), proposals)), fg


def _rpn_inputs(seed, height, width, anchors, image_scale):
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0, 1, (1, 2 * anchors, height, width)).astype(f32)
    deltas = (rng.standard_normal((1, 4 * anchors, height, width)) * 0.3).astype(f32)
    im_info = np.array([[height * 16 - 5, width * 16 - 3, image_scale]], f32)
    return scores, deltas, im_info


PROPOSAL_CASES = [  # (param_str, scales, map height, width, phase, im_info scale)
    ("'feat_stride': 16", [8, 16, 32], 6, 7, "TEST", 1.0),
    ("{'feat_stride': 16, 'scales': [2, 4]}", [2, 4], 9, 8, "TEST", 1.6),
    ("'feat_stride': 16 \n'scales': !!python/tuple [4, 8, 16, 32]", [4, 8, 16, 32], 40, 42, "TEST", 0.5),
    ("'feat_stride': 16", [8, 16, 32], 30, 25, "TRAIN", 1.0),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_str,scales,height,width,phase,image_scale", PROPOSAL_CASES)
def test_proposals_against_proposal_layer_py(param_str, scales, height, width, phase, image_scale, device):
    anchors = 3 * len(scales)
    scores, deltas, im_info = _rpn_inputs(height * 100 + width, height, width, anchors, image_scale)
    pre_n, post_n = (6000, 300) if phase == "TEST" else (12000, 2000)
    want_rois, want_scores = fork_proposals(scores, deltas, im_info, 16, scales, pre_n, post_n)
    text = param_str.replace("\n", "\\n")
    _, converted = build("Python", f'python_param {{ module: "rpn.proposal_layer" layer: "ProposalLayer" '
                         f'param_str: "{text}" }}', [scores.shape, deltas.shape, im_info.shape], tops=2,
                         phase=phase, dialect="faster-rcnn")
    rois, kept_scores = converted.module(*(torch.tensor(a, device=device) for a in (scores, deltas, im_info)))
    assert 0 < len(want_rois) <= post_n
    # the same boxes in the same order
    np.testing.assert_array_equal(rois.cpu().numpy(), want_rois)
    np.testing.assert_array_equal(kept_scores.cpu().numpy(), want_scores)


@pytest.mark.parametrize("config", [RPNConfig(40, 10 ** 6, 0.7, 16), RPNConfig(500, 7, 0.5, 16),
                                    RPNConfig(10 ** 6, 10 ** 6, 0.7, 40), RPNConfig(0, 0, 0.3, 0)])
def test_each_rpn_setting_acts_as_in_proposal_layer_py(config):
    # cfg's numbers are fixed by the phase; here each is set small enough to decide
    scores, deltas, im_info = _rpn_inputs(7, 6, 7, 9, 1.0)
    want_rois, want_scores = fork_proposals(scores, deltas, im_info, 16, [8, 16, 32], config.pre_nms_top_n or None,
                                            config.post_nms_top_n or None, config.nms_thresh, config.min_size)
    _, converted = build("Python", 'python_param { module: "rpn.proposal_layer" layer: "ProposalLayer" '
                         'param_str: "\'feat_stride\': 16" }', [scores.shape, deltas.shape, im_info.shape], tops=2)
    converted.module.settings = dataclasses.replace(converted.module.settings, config=config)
    rois, kept_scores = converted.module(*map(torch.tensor, (scores, deltas, im_info)))
    np.testing.assert_array_equal(rois.numpy(), want_rois)
    np.testing.assert_array_equal(kept_scores.numpy(), want_scores)
    default = fork_proposals(scores, deltas, im_info, 16, [8, 16, 32], 6000, 300)[0]
    assert not np.array_equal(want_rois, default)  # the setting changed the proposals


def test_the_proposal_layer_refuses_a_batch_of_several_images_by_name():
    """py-faster-rcnn asserts 'Only single item batches are supported'; torch's shape error named no layer."""
    scores, deltas, im_info = _rpn_inputs(7, 6, 7, 9, 1.0)
    _, converted = build("Python", 'python_param { module: "rpn.proposal_layer" layer: "ProposalLayer" '
                         'param_str: "\'feat_stride\': 16" }', [scores.shape, deltas.shape, im_info.shape], tops=2)
    pair = [torch.tensor(np.concatenate([a, a])) for a in (scores, deltas, im_info)]
    with pytest.raises(CaffeCompatError, match=r"^layer '.*' \(Python, py-faster-rcnn's proposal layer\): it takes "
                                               r"one image at a time.*a batch of 2$"):
        converted.module(*pair)


# (scales, map height and width, cfg in place of the TEST phase's, runs of (batch, im_info), whether
# post_nms_top_n cuts the kept boxes). In each, min_size removes some boxes (clipped at the image's
# edges, or of the small anchors at scales 3 and 2.5).
PROPOSAL_PROGRAM_CASES = [
    # every anchor a candidate (6000 > 648), fewer than post_nms_top_n kept
    ([8, 16, 32], 9, 8, None, [(1, [130.0, 120.0, 1.0]), (3, [101.0, 77.0, 1.25])], False),
    # the pre-NMS cap cuts among equal scores; post_nms_top_n cuts the kept boxes
    ([2, 4], 20, 23, RPNConfig(700, 60, 0.6, 16), [(3, [310.0, 360.0, 3.0]), (1, [250.0, 200.0, 2.5])], True),
]


@pytest.mark.parametrize("scales,height,width,config,runs,cut", PROPOSAL_PROGRAM_CASES)
def test_the_proposal_layers_program_gives_its_rois(scales, height, width, config, runs, cut):
    """torch.export's form of the layer (static slots, masks, a scanned NMS) against the eager
    layer at batch sizes other than the traced 2, on scores full of ties (sixteenths): the same
    rois and scores, in the same order. The program proposes from the first image, as
    py-faster-rcnn takes one-image batches."""
    anchors = 3 * len(scales)
    _, converted = build("Python", 'python_param { module: "rpn.proposal_layer" layer: "ProposalLayer" '
                         f'param_str: "\'feat_stride\': 16\\n\'scales\': {scales}" }}',
                         [(1, 2 * anchors, height, width), (1, 4 * anchors, height, width), (1, 3)], tops=2,
                         dialect="faster-rcnn")
    layer = converted.module
    if config is not None:
        layer.settings = dataclasses.replace(layer.settings, config=config)
    config = layer.settings.config
    example = (torch.rand(2, 2 * anchors, height, width), torch.rand(2, 4 * anchors, height, width),
               torch.tensor([[100.0, 100.0, 1.0]] * 2))
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(layer, example, dynamic_shapes=({0: batch},) * 3).module()
    for seed, (count, info) in enumerate(runs):
        scores, deltas, _ = _rpn_inputs(seed, height, width, anchors, 1.0)
        scores = torch.tensor(np.round(scores * 16) / 16).repeat(count, 1, 1, 1)
        deltas = torch.tensor(deltas).repeat(count, 1, 1, 1)
        im_info = torch.tensor([info] * count)
        with torch.no_grad():
            want_rois, want_scores = layer(scores[:1], deltas[:1], im_info[:1])
            rois, kept_scores = program(scores, deltas, im_info)
        assert torch.equal(rois, want_rois) and torch.equal(kept_scores, want_scores), (count, info)
        assert 0 < len(rois) and (len(rois) == config.post_nms_top_n) == cut
        # without the min size, other rois
        unfiltered = dataclasses.replace(layer.settings, config=dataclasses.replace(config, min_size=0))
        other = Proposal(unfiltered, 2, "proposal")(scores[:1], deltas[:1], im_info[:1])[0]
        assert other.shape != rois.shape or not torch.equal(other, rois)


def test_a_faster_rcnn_net_converts_runs_and_refuses_onnx(tmp_path):
    model = tmp_path / "tiny.pt"
    result = run_cli("convert", require(FASTER_RCNN), "--random-init", "-o", model, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dialect faster-rcnn" in result.stdout
    import caffe_compat  # noqa: PLC0415
    net = caffe_compat.load(model)
    image = torch.rand(1, 3, 96, 128) * 255
    out = net(image, torch.tensor([[96.0, 128.0, 1.0]]), blobs=["rois", "pool5"])
    count = out["rois"].shape[0]
    assert 0 < count <= 300 and out["rois"][:, 0].eq(0).all()
    assert out["pool5"].shape == (count, 16, 3, 3) and out["cls_prob"].shape == (count, 3)
    assert out["bbox_pred"].shape == (count, 12)
    result = run_cli("export-onnx", model, "-o", tmp_path / "tiny.onnx", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "'proposal' (Python)" in result.stderr and "'roi_pool5' (ROIPooling)" in result.stderr


def test_inspect_shapes_a_faster_rcnn_net(tmp_path):
    result = run_cli("inspect", require(FASTER_RCNN), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    # the proposal layer's setup shape (one roi), then the pooled rois into fc6
    assert "1x5" in lines["proposal"] and "1x16x3x3" in lines["roi_pool5"]
    assert "4,640" in lines["fc6"] and "total: 21 layers, 9,765 parameters" in result.stdout


# ---- bad settings: one line naming the layer -------------------------------------

BAD = [
    ("ROIPooling", "roi_pooling_param { pooled_h: 0 pooled_w: 2 }", [(1, 2, 4, 4), (3, 5)], "faster-rcnn",
     "pooled_h and pooled_w must be > 0"),
    ("ROIPooling", "roi_pooling_param { pooled_h: 2 pooled_w: 2 }", [(1, 2, 4, 4), (3, 4)], "faster-rcnn",
     "each roi must be 5 numbers"),
    ("ROIPooling", "roi_pooling_param { pooled_h: 2 pooled_w: 2 }", [(1, 2, 4, 4)], "faster-rcnn",
     "expects 2 bottom(s)"),
    ("PSROIPooling", "psroi_pooling_param { spatial_scale: 1 output_dim: 2 group_size: 3 }",
     [(1, 17, 4, 4), (3, 5)], "rfcn", "output_dim 2 x group_size 3^2 = 18 are needed"),
    ("PSROIPooling", "psroi_pooling_param { spatial_scale: 1 output_dim: 2 }", [(1, 18, 4, 4), (3, 5)], "rfcn",
     "psroi_pooling_param.group_size is required"),
    ("PSROIPooling", "psroi_pooling_param { spatial_scale: 1 output_dim: 0 group_size: 3 }",
     [(1, 18, 4, 4), (3, 5)], "rfcn", "must be > 0"),
    ("Python", 'python_param { module: "rpn.proposal_layer" layer: "ProposalLayer" param_str: "\'scales\': [8]" }',
     [(1, 6, 4, 4), (1, 12, 4, 4), (1, 3)], "bvlc", "must set 'feat_stride'"),
    ("Python", 'python_param { module: "rpn.proposal_layer" layer: "ProposalLayer" '
     'param_str: "{\'feat_stride\': 16, \'ratios\': [1]}" }', [(1, 18, 4, 4), (1, 36, 4, 4), (1, 3)], "bvlc",
     "sets ratios, which py-faster-rcnn's rpn.proposal_layer.ProposalLayer does not read"),
    ("Python", 'python_param { module: "rpn.proposal_layer" layer: "ProposalLayer" param_str: "\'feat_stride\': 16" }',
     [(2, 18, 4, 4), (2, 36, 4, 4), (2, 3)], "bvlc", "it must be (1, 18, H, W) (the layer takes one image)"),
    ("Python", 'python_param { module: "rpn.proposal_layer" layer: "ProposalLayer" param_str: "\'feat_stride\': x" }',
     [(1, 18, 4, 4), (1, 36, 4, 4), (1, 3)], "bvlc", "'feat_stride' must be a number"),
]


@pytest.mark.parametrize("layer_type,params,shapes,dialect,message", BAD)
def test_bad_settings_fail_in_one_line(layer_type, params, shapes, dialect, message):
    with pytest.raises(CaffeCompatError) as caught:
        build(layer_type, params, shapes, dialect=dialect)
    text = str(caught.value)
    assert text.startswith(f"layer 'layer' ({layer_type}): ") and message in text and "\n" not in text


@pytest.mark.parametrize("layer_type,params", [
    ("ROIPooling", "roi_pooling_param { pooled_h: 2 pooled_w: 2 }"),
    ("PSROIPooling", "psroi_pooling_param { spatial_scale: 1 output_dim: 1 group_size: 2 }")])
def test_a_batch_index_outside_the_batch_names_the_roi(layer_type, params):
    _, converted = build(layer_type, params, [(2, 4, 4, 4), (2, 5)], dialect="rfcn")
    rois = torch.tensor([[1, 0, 0, 2, 2], [2, 0, 0, 2, 2]], dtype=torch.float32)
    with pytest.raises(CaffeCompatError, match=rf"layer 'layer' \({layer_type}\): roi 1 has batch index 2.0, "
                                               r"outside the 2 image\(s\) of the batch"):
        converted.module(torch.zeros(2, 4, 4, 4), rois)


PSROI_LAYER = ('layer { name: "psroi" type: "PSROIPooling" bottom: "data" bottom: "rois" top: "out" '
               'psroi_pooling_param { spatial_scale: 0.0625 output_dim: 2 group_size: 3 } }\n')


@pytest.mark.parametrize("dialect,number", [("rfcn", 10001), ("rfcn-microsoft", 149)])
def test_r_fcn_caffemodels_read_in_either_forks_numbers(tmp_path, dialect, number):
    from caffe_compat.io.files import read_caffemodel, read_prototxt  # noqa: PLC0415
    from caffe_compat.io.schema import messages  # noqa: PLC0415
    net = messages(dialect).NetParameter(name="n")
    layer = net.layer.add(name="psroi", type="PSROIPooling")
    layer.psroi_pooling_param.output_dim = 2
    layer.psroi_pooling_param.group_size = 3
    assert layer.DESCRIPTOR.fields_by_name["psroi_pooling_param"].number == number
    (tmp_path / "w.caffemodel").write_bytes(net.SerializeToString())
    read = read_caffemodel(tmp_path / "w.caffemodel")
    assert read.dialect == dialect and read.net.layer[0].psroi_pooling_param.group_size == 3
    (tmp_path / "net.prototxt").write_text(PSROI_LAYER)
    assert read_prototxt(tmp_path / "net.prototxt").dialect == "rfcn"  # the first of the forks that fit


# ---- as torch.export programs -------------------------------------------------------

ROI_NETS = {
    "ROIPooling": 'roi_pooling_param { pooled_h: 3 pooled_w: 3 spatial_scale: 0.5 }',
    "PSROIPooling": 'psroi_pooling_param { spatial_scale: 0.5 output_dim: 2 group_size: 3 }'}
# In image pixels, on maps of 8 x 7 at spatial_scale 0.5: inside; on the map's last row and
# column; partly outside (its far bins empty); wholly outside (every bin empty); before the
# map's start; malformed (x2 < x1); one pixel.
EDGE_ROIS = [[2, 3, 4, 9, 11], [0, 12, 14, 13, 15], [1, 8, 10, 30, 40], [2, 20, 20, 40, 40], [0, -9, -5, 3, 2],
             [1, 9, 9, 2, 2], [2, 5, 5, 5, 5]]


@pytest.mark.parametrize("layer_type", sorted(ROI_NETS))
def test_the_export_form_equals_the_layer_at_other_batches_and_roi_counts(layer_type, tmp_path):
    """Traced at batch 2 and 3 rois (convert -o model.pt2): the program's rois at the map's
    edges, outside it and malformed, with NaN, -inf and all-negative maps, equal the layer's to
    the bit at other batch sizes and roi counts; a batch index outside the batch stops it."""
    from caffe_compat.cli.main import main  # noqa: PLC0415
    from caffe_compat.loading import load_net  # noqa: PLC0415
    channels = 18 if layer_type == "PSROIPooling" else 3
    proto = tmp_path / "net.prototxt"
    proto.write_text(f'name: "rois"\nlayer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 '
                     f'dim: {channels} dim: 8 dim: 7 }} }} }}\nlayer {{ name: "rois" type: "Input" top: "rois" '
                     f'input_param {{ shape {{ dim: 3 dim: 5 }} }} }}\nlayer {{ name: "pool" type: "{layer_type}" '
                     f'bottom: "data" bottom: "rois" top: "out" {ROI_NETS[layer_type]} }}\n')
    assert main(["convert", str(proto), "--random-init", "-o", str(tmp_path / "model.pt2")]) == 0
    program = torch.export.load(tmp_path / "model.pt2").module()
    net = load_net(proto, None, fold=False).eval()
    generator = torch.Generator().manual_seed(0)
    edge = torch.tensor(EDGE_ROIS, dtype=torch.float32)
    runs = [(1, edge[1:2] * torch.tensor([0.0, 1, 1, 1, 1])), (3, edge), (4, edge[[6, 2, 3, 0, 1]])]
    outputs = []
    for batch, rois in runs:
        data = torch.randn(batch, channels, 8, 7, generator=generator)
        data[:, 0, 2:5] = float("nan")
        data[-1, -1, 3:] = -float("inf")
        data[-1, 1] = -data[-1, 1].abs()
        with torch.no_grad():
            outputs.append(net(data, rois)["out"])
        torch.testing.assert_close(program(data, rois)["out"], outputs[-1], rtol=0, atol=0, equal_nan=True,
                                   msg=f"batch {batch}, {rois.shape[0]} rois")
    assert torch.cat(outputs).isnan().any() == (layer_type == "PSROIPooling")  # a mean takes NaN, a max never
    partly_outside, outside = outputs[1][2], outputs[1][3]
    assert outside.eq(0).all() and partly_outside.eq(0).any() and not partly_outside.eq(0).all()
    with pytest.raises(RuntimeError, match=f"layer 'pool' \\({layer_type}\\): a roi's batch index is outside"):
        program(data[:2], edge)  # images 0 and 1, a roi of image 2
