"""Faster R-CNN's proposal layer, a `Python` layer whose python_param names
`rpn.proposal_layer.ProposalLayer` (rbgirshick/py-faster-rcnn, lib/rpn/proposal_layer.py),
computed natively so that a Faster R-CNN prototxt runs without the user's `rpn` package.

Its forward, in float32 as numpy computes it there: anchors (generate_anchors with the
param_str's scales) shifted by feat_stride over the score map, in (h, w, anchor) order;
bbox_transform_inv with the `+ 1` widths; clip_boxes to im_info's (height - 1, width - 1);
boxes narrower or lower than RPN_MIN_SIZE * im_info[2] dropped; the best
RPN_PRE_NMS_TOP_N by foreground score; NMS at RPN_NMS_THRESH as gpu_nms computes it
(USE_GPU_NMS is the default: `+ 1` areas, a box suppressed when its overlap with a kept
one is > the threshold); the first RPN_POST_NMS_TOP_N kept. cfg is the net's phase's
(fast_rcnn/config.py defaults: TEST 6000 / 300 / 0.7 / 16, TRAIN 12000 / 2000 / 0.7 / 16).
Top 0: rois (R, 5) with batch index 0; top 1 (optional): their scores (R, 1).

Where scores tie, numpy's `argsort()[::-1]` decides; here as with a stable sort reversed
(what numpy's sort gives up to 16 values). exp is the correctly rounded float32 value.
No gradient passes (the layer's backward does nothing). No ONNX export; under torch.export
(`convert -o model.pt2`) the layer runs `_kept_in_program`, which gives the same rois, ties
included, from the first image of the batch (py-faster-rcnn takes one-image batches)."""
from __future__ import annotations

import inspect

import numpy as np
import torch

from ..errors import CaffeCompatError
from ..params.roi import PROPOSAL_LAYER, ProposalSettings, proposal_settings, proposal_tops
from . import bbox
from .bbox import jaccard
from .python_layer import python_type
from .registry import CaffeLayer, LayerContext, register, register_source


def numpy_descending(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argsort()[::-1]`: ascending (equal scores in index order), reversed."""
    return torch.sort(scores, stable=True).indices.flip(0)


def shifted_anchors(anchors: np.ndarray, stride: float, height: int, width: int) -> np.ndarray:
    """Every anchor at every score map cell, rows in (h, w, anchor) order, float64."""
    shift_x, shift_y = np.meshgrid(np.arange(width) * stride, np.arange(height) * stride)
    shifts = np.stack([shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel()], axis=1)
    return (anchors[None, :, :] + shifts[:, None, :]).reshape(-1, 4)


def decode(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """bbox_transform_inv in float32: (K, 4) anchors and deltas -> boxes."""
    widths = anchors[:, 2] - anchors[:, 0] + 1.0
    heights = anchors[:, 3] - anchors[:, 1] + 1.0
    center_x = anchors[:, 0] + 0.5 * widths
    center_y = anchors[:, 1] + 0.5 * heights
    pred_x = deltas[:, 0] * widths + center_x
    pred_y = deltas[:, 1] * heights + center_y
    pred_w = torch.exp(deltas[:, 2].double()).float() * widths
    pred_h = torch.exp(deltas[:, 3].double()).float() * heights
    return torch.stack([pred_x - 0.5 * pred_w, pred_y - 0.5 * pred_h,
                        pred_x + 0.5 * pred_w, pred_y + 0.5 * pred_h], dim=1)


def pixel_nms(boxes: torch.Tensor, threshold: float, most: int) -> torch.Tensor:
    """gpu_nms on boxes sorted best first: each box in turn is kept unless its overlap
    (devIoU: float32, `+ 1` sides) with a box kept before it is > the threshold; the
    kept indices, at most `most` of them (all if `most` <= 0). One step per kept box."""
    sizes = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    limit = torch.tensor(threshold, dtype=torch.float32, device=boxes.device)
    index = torch.arange(boxes.shape[0], device=boxes.device)
    kept = []
    # the boxes still in play shrink by boolean masks (far faster than gathers by index)
    while index.numel() and (most <= 0 or len(kept) < most):
        kept.append(index[0])
        overlap = jaccard(boxes[0], sizes[0], boxes[1:], sizes[1:], extent=1.0)
        survive = ~(overlap > limit)  # a NaN overlap suppresses nothing, as `>` in the kernel
        boxes, sizes, index = boxes[1:][survive], sizes[1:][survive], index[1:][survive]
    return torch.stack(kept) if kept else index


class Proposal(CaffeLayer):
    def __init__(self, settings: ProposalSettings, tops: int, layer_name: str):
        super().__init__()
        self.settings = settings
        self.tops = tops
        self.layer_name = layer_name
        self._anchors = {}  # (height, width, device) -> the shifted anchors, float32

    def forward(self, scores, deltas, im_info):
        if scores.device.type == "meta":
            rois = torch.empty((1, 5), device="meta")
            return (rois, torch.empty((1, 1), device="meta")) if self.tops == 2 else rois
        if scores.shape[0] != 1 and not torch.compiler.is_exporting():
            raise CaffeCompatError(f"layer '{self.layer_name}' (Python, py-faster-rcnn's proposal layer): it takes "
                                   f"one image at a time, as py-faster-rcnn does; its scores hold a batch of "
                                   f"{scores.shape[0]}")
        with torch.no_grad():
            rois, kept_scores = self._propose(scores.detach().float(), deltas.detach().float(),
                                              im_info.detach().float())
        return (rois, kept_scores) if self.tops == 2 else rois

    def _propose(self, scores, deltas, im_info):
        s, config = self.settings, self.settings.config
        count = len(s.anchors)
        height, width = scores.shape[-2:]
        exporting = torch.compiler.is_exporting()
        key = (height, width, scores.device)
        anchors = self._anchors.get(key)
        if anchors is None:
            grid = shifted_anchors(np.asarray(s.anchors), s.feat_stride, height, width)
            anchors = torch.from_numpy(grid.astype(np.float32)).to(scores.device)
            if not exporting:  # the program holds them as a constant; a traced value is no cache
                self._anchors[key] = anchors
        if exporting:
            # py-faster-rcnn takes one-image batches; the program, traced at batch 2, the first image's maps
            scores, deltas = scores[:1], deltas[:1]
        # the second `count` channels are the foreground probabilities
        fg = scores[:, count:].permute(0, 2, 3, 1).reshape(-1)
        boxes = decode(anchors, deltas.permute(0, 2, 3, 1).reshape(-1, 4))
        info = im_info.reshape(im_info.shape[0], -1)[0]
        limits = torch.stack([info[1] - 1, info[0] - 1, info[1] - 1, info[0] - 1])
        boxes = torch.maximum(torch.minimum(boxes, limits), torch.zeros((), device=boxes.device))
        least = float(config.min_size) * info[2]  # an exact float32 product for min size 16
        big = (boxes[:, 2] - boxes[:, 0] + 1 >= least) & (boxes[:, 3] - boxes[:, 1] + 1 >= least)
        boxes, fg = self._kept_in_program(boxes, fg, big) if exporting else self._kept(boxes, fg, big)
        rois = torch.cat([torch.zeros((boxes.shape[0], 1), device=boxes.device), boxes], dim=1)
        return rois, fg[:, None]

    def _kept(self, boxes, fg, big):
        """The boxes NMS keeps, in its order, and their scores."""
        config = self.settings.config
        keep = big.nonzero()[:, 0]
        boxes, fg = boxes[keep], fg[keep]
        order = numpy_descending(fg)
        if config.pre_nms_top_n > 0:
            order = order[:config.pre_nms_top_n]
        boxes, fg = boxes[order], fg[order]
        # gpu_nms sorts its input again the same way
        order = numpy_descending(fg)
        boxes, fg = boxes[order], fg[order]
        chosen = pixel_nms(boxes, config.nms_thresh, config.post_nms_top_n)
        return boxes[chosen], fg[chosen]

    def _kept_in_program(self, boxes, fg, big):
        """_kept for torch.export, which holds no count read from values: the boxes
        too small stay, masked (`big` false), in slots of a static count, min(pre_nms_top_n,
        the anchors); pixel_nms's decisions scanned over every slot; the rows picked by a mask,
        their count unbacked. The same sorts as the eager layer's, so the same order, ties too."""
        config = self.settings.config
        if bbox._scan() is None:
            raise CaffeCompatError(f"layer '{self.layer_name}' (Python): a program needs torch's scan operator "
                                   f"(torch 2.6 or later) for the proposal layer's NMS, whose count of rois "
                                   f"follows from the scores")
        order = _big_first(numpy_descending(fg), big)
        cap = min(config.pre_nms_top_n, len(order)) if config.pre_nms_top_n > 0 else len(order)
        order = order[:cap]
        boxes, fg, big = boxes[order], fg[order], big[order]
        order = _big_first(numpy_descending(fg), big)  # gpu_nms's sort of its input
        boxes, fg, valid = boxes[order], fg[order], big[order]  # the big ones, then the masked
        sizes = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
        limit = torch.tensor([config.nms_thresh], dtype=torch.float32, device=boxes.device)
        overlaps = jaccard(boxes[:, None], sizes[:, None], boxes[None], sizes[None], extent=1.0)
        # `>` as pixel_nms: a NaN overlap suppresses nothing
        kept = bbox.scanned_decisions((overlaps > limit)[None], valid[None], limit)[0]
        if config.post_nms_top_n > 0:
            kept &= kept.cumsum(0) <= config.post_nms_top_n
        return boxes[kept], fg[kept]


def _big_first(order: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """`order` with the slots where `big` is false moved after the others, each part in its
    order: what sorting the big ones alone gives, as a stable sort keeps its order in any subset."""
    return order[torch.sort((~big[order]).to(torch.uint8), stable=True).indices]


@register(python_type(*PROPOSAL_LAYER.rsplit(".", 1)))
def build_proposal(ctx: LayerContext):
    settings = proposal_settings(ctx, ctx.phase)
    # im_info is read, not differentiated: the layer's backward passes nothing
    return ctx.wire(Proposal(settings, len(ctx.tops), ctx.name), top_shapes=proposal_tops(ctx))


# ---------------------------------------------------------------- standalone source

PROPOSAL_SOURCE = """
class Proposal(nn.Module):
    \"\"\"py-faster-rcnn's proposal layer (rpn.proposal_layer.ProposalLayer): its anchors shifted by
    feat_stride over the score map, decoded by the deltas, clipped to im_info's image, those smaller
    than min_size * im_info[2] dropped, the best pre_nms_top_n by foreground score, NMS at nms_thresh,
    the first post_nms_top_n kept: rois (R, 5) with batch index 0, and their scores (R, 1) if `tops` is 2.\"\"\"

    def __init__(self, anchors, feat_stride, pre_nms_top_n, post_nms_top_n, nms_thresh, min_size, tops):
        super().__init__()
        self.anchors, self.feat_stride, self.tops = anchors, feat_stride, tops
        self.pre_nms_top_n, self.post_nms_top_n = pre_nms_top_n, post_nms_top_n
        self.nms_thresh, self.min_size = nms_thresh, min_size

    @torch.no_grad()
    def forward(self, scores, deltas, im_info):
        scores, deltas, im_info = scores.detach().float(), deltas.detach().float(), im_info.detach().float()
        height, width = scores.shape[-2:]
        shift_y, shift_x = torch.meshgrid(torch.arange(height, dtype=torch.float64) * self.feat_stride,
                                          torch.arange(width, dtype=torch.float64) * self.feat_stride, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=1)
        anchors = torch.tensor(self.anchors, dtype=torch.float64)[None, :, :] + shifts[:, None, :]
        anchors = anchors.reshape(-1, 4).float().to(scores.device)  # rows in (h, w, anchor) order
        # the second len(anchors) channels are the foreground probabilities
        fg = scores[:, len(self.anchors):].permute(0, 2, 3, 1).reshape(-1)
        boxes = decode(anchors, deltas.permute(0, 2, 3, 1).reshape(-1, 4))
        info = im_info.reshape(im_info.shape[0], -1)[0]
        limits = torch.stack([info[1] - 1, info[0] - 1, info[1] - 1, info[0] - 1])
        boxes = torch.maximum(torch.minimum(boxes, limits), torch.zeros((), device=boxes.device))
        least = float(self.min_size) * info[2]
        keep = ((boxes[:, 2] - boxes[:, 0] + 1 >= least) & (boxes[:, 3] - boxes[:, 1] + 1 >= least)).nonzero()[:, 0]
        boxes, fg = boxes[keep], fg[keep]
        order = numpy_descending(fg)
        if self.pre_nms_top_n > 0:
            order = order[:self.pre_nms_top_n]
        boxes, fg = boxes[order], fg[order]
        order = numpy_descending(fg)  # gpu_nms sorts its input again the same way
        boxes, fg = boxes[order], fg[order]
        chosen = pixel_nms(boxes, self.nms_thresh, self.post_nms_top_n)
        boxes, fg = boxes[chosen], fg[chosen]
        rois = torch.cat([torch.zeros((boxes.shape[0], 1), device=boxes.device), boxes], dim=1)
        return (rois, fg[:, None]) if self.tops == 2 else rois
"""


@register_source(python_type(*PROPOSAL_LAYER.rsplit(".", 1)))
def proposal_to_source(src, ctx, module: Proposal, inputs, outputs):
    s, config = module.settings, module.settings.config
    src.helper("\n\n\n".join(inspect.getsource(fn).strip("\n")
                               for fn in (numpy_descending, decode, bbox.jaccard, pixel_nms)))
    src.helper(PROPOSAL_SOURCE)
    layer = src.attribute(ctx, f"Proposal({tuple(tuple(a) for a in s.anchors)}, {s.feat_stride!r}, "
                               f"{config.pre_nms_top_n}, {config.post_nms_top_n}, {config.nms_thresh!r}, "
                               f"{config.min_size}, {module.tops})", {})
    src.assign(outputs, f"{layer}({', '.join(inputs)})")
