"""The SSD fork's PriorBox and DetectionOutput (weiliu89/caffe, branch ssd,
src/caffe/layers/{prior_box,detection_output}_layer.cpp).

PriorBox depends on shapes only: its boxes are computed once per feature map and image
size, in the fork's mix of float and double, and kept on the device they were asked on.
DetectionOutput decodes, thresholds, runs greedy NMS per image and class, keeps the
`keep_top_k` best per image and emits rows [image, label, score, xmin, ymin, xmax, ymax]
in the fork's order: by image, then label, then score. PriorBox passes no gradient to
its bottoms, DetectionOutput has none (the fork's is not implemented). The fork's
save_output_param and visualize write files and draw; here they are read and not acted
on, and a fourth bottom (the images to draw on) is not read."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Dict, Tuple

import numpy as np
import torch

from ..errors import CaffeCompatError
from ..params.ssd import (DetectionSettings, PriorBoxSettings, detection_settings, legacy_hw, prior_box_settings,
                          prior_box_top)
from . import bbox
from .bbox import box_size, decode, greedy_nms, libstdcxx_sort, stable_top
from .onnx_graph import FLOAT, OnnxGraph
from .registry import CaffeLayer, LayerContext, register, register_onnx, register_source

BOOL, DOUBLE = 9, 11  # TensorProto.DataType
# What DetectionOutput's ONNX output holds, for the model's metadata.
DETECTION_ROWS = ("(1, 1, rows, 7): rows [image, label, score, xmin, ymin, xmax, ymax], coordinates "
                  "normalized to the image; by image, label, then descending score; one row "
                  "[image, -1, -1, -1, -1, -1, -1] per image when no image has a detection")


def prior_boxes(s: PriorBoxSettings, layer_h: int, layer_w: int, img_h: int, img_w: int) -> np.ndarray:
    """Forward_cpu of the fork's PriorBoxLayer: (1, 2, layer_h * layer_w * priors * 4) float32."""
    f32 = np.float32
    if s.step_h == 0 or s.step_w == 0:
        step_w, step_h = f32(img_w) / f32(layer_w), f32(img_h) / f32(layer_h)
    else:
        step_w, step_h = f32(s.step_w), f32(s.step_h)
    sizes = []  # (box_width, box_height) as floats, in the fork's order per position
    for i, min_size in enumerate(s.min_sizes):
        side = int(min_size)  # the fork reads each size into an int
        sizes.append((f32(side), f32(side)))
        if s.max_sizes:
            root = f32(np.sqrt(float(side * int(s.max_sizes[i]))))  # sqrt(int) is double
            sizes.append((root, root))
        for ratio in s.aspect_ratios:
            if abs(float(ratio) - 1.0) < 1e-6:
                continue
            root = np.sqrt(f32(ratio))  # sqrt(float) is float, and so is the product
            sizes.append((f32(side) * root, f32(side) / root))
    widths = np.array([w for w, _ in sizes], dtype=np.float64)
    heights = np.array([h for _, h in sizes], dtype=np.float64)
    offset = f32(s.offset)
    center_x = ((np.arange(layer_w, dtype=f32) + offset) * step_w).astype(np.float64)
    center_y = ((np.arange(layer_h, dtype=f32) + offset) * step_h).astype(np.float64)
    cx = center_x[None, :, None]
    cy = center_y[:, None, None]
    boxes = np.stack(np.broadcast_arrays((cx - widths / 2.0) / img_w, (cy - heights / 2.0) / img_h,
                                         (cx + widths / 2.0) / img_w, (cy + heights / 2.0) / img_h),
                     axis=-1).astype(f32).reshape(-1)
    if s.clip:
        boxes = np.minimum(np.maximum(boxes, f32(0)), f32(1))
    variances = np.broadcast_to(np.array(s.variances, dtype=f32), (boxes.size // len(s.variances), len(s.variances)))
    return np.stack([boxes, variances.reshape(-1)])[None]


class _NoBackward(torch.autograd.Function):
    """The priors as a blob in the backward pass: gradients reach it (Caffe's diffs of
    the layers above are computed as usual) and stop there, since the fork's PriorBox
    backward leaves its bottoms' diffs alone."""

    @staticmethod
    def forward(ctx, priors, feature):
        return priors.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, None


class PriorBox(CaffeLayer):
    def __init__(self, settings: PriorBoxSettings):
        super().__init__()
        self.settings = settings
        self._cache: Dict[Tuple, torch.Tensor] = {}

    # Under torch.compile the priors stay a cached lookup: tracing it would recompile per
    # feature-map size, one PriorBox after another, up to dynamo's recompile limit.
    @torch.compiler.disable
    def forward(self, feature, image=None):
        layer_h, layer_w = legacy_hw(tuple(feature.shape))
        if self.settings.img_h and self.settings.img_w:
            img_h, img_w = self.settings.img_h, self.settings.img_w
        else:
            img_h, img_w = legacy_hw(tuple(image.shape))
        if feature.device.type == "meta":
            count = layer_h * layer_w * self.settings.num_priors * 4
            return torch.empty((1, 2, count), device="meta")
        key = (layer_h, layer_w, img_h, img_w, feature.device)
        if key not in self._cache:
            # float32 whatever the feature's type: the fork's values, which bf16 would round
            values = prior_boxes(self.settings, layer_h, layer_w, img_h, img_w)
            self._cache[key] = torch.from_numpy(values).to(feature.device)
        return _NoBackward.apply(self._cache[key], feature)


@register("PriorBox")
def build_prior_box(ctx: LayerContext):
    settings = prior_box_settings(ctx)
    top = prior_box_top(ctx, settings)
    # the image bottom only lends its size, and only when img_size/img_h/img_w are not given
    return ctx.wire(PriorBox(settings), top_shapes=[top])


PRIOR_BOX_SOURCE = """
class PriorBox(nn.Module):
    \"\"\"The SSD fork's PriorBox: boxes and their variances, (1, 2, count), that depend only on the
    feature map's size and the image's; computed by caffe-compat for the sizes the net was converted
    at and saved with the weights (other sizes are refused: convert the net at those).\"\"\"

    def __init__(self, count, feature_size, image_size=None):
        super().__init__()
        self.register_buffer("priors", torch.zeros(1, 2, count))
        self.sizes = (feature_size, image_size)  # image_size None: fixed by the layer's img_size

    def forward(self, feature, image=None):
        sizes = (tuple(feature.shape[2:4]), None if self.sizes[1] is None else tuple(image.shape[2:4]))
        if sizes != self.sizes:
            raise ValueError(f"PriorBox: converted for feature map and image sizes {self.sizes}, given {sizes}")
        return self.priors
"""


@register_source("PriorBox")
def prior_box_to_source(src, ctx, module: PriorBox, inputs, outputs):
    s = module.settings
    layer_h, layer_w = legacy_hw(tuple(ctx.bottom_shapes[0]))
    if s.img_h and s.img_w:
        (img_h, img_w), image_size = (s.img_h, s.img_w), ""
    else:
        img_h, img_w = legacy_hw(tuple(ctx.bottom_shapes[1]))
        image_size = f", {tuple(ctx.bottom_shapes[1][2:4])}"
    priors = torch.from_numpy(prior_boxes(s, layer_h, layer_w, img_h, img_w))
    src.helper(PRIOR_BOX_SOURCE)
    layer = src.attribute(ctx, f"PriorBox({priors.shape[-1]}, {tuple(ctx.bottom_shapes[0][2:4])}{image_size})",
                          {"priors": priors})
    src.assign(outputs, f"{layer}({', '.join(inputs)})")


class DetectionOutput(CaffeLayer):
    def __init__(self, settings: DetectionSettings, layer_name: str):
        super().__init__()
        self.settings = settings
        self.layer_name = layer_name

    # Data-dependent sizes and a few host reads: run eagerly inside a compiled net.
    @torch.compiler.disable
    def forward(self, loc, conf, prior):
        with torch.no_grad():
            return self._detect(loc.detach().float(), conf.detach().float(), prior.detach().float())

    def _detect(self, loc, conf, prior):
        s = self.settings
        num, priors, device = loc.shape[0], s.num_priors, loc.device
        if device.type == "meta":
            return torch.empty((1, 1, 1, 7), device="meta")
        # torch.export's program holds no host read: every candidate slot up to the static cap
        # goes through NMS, those under the threshold masked, and the rows are picked by a mask
        exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
        flat = prior.reshape(-1)  # the first image's priors, then their variances
        prior_boxes_, variances = flat[:priors * 4].view(priors, 4), flat[priors * 4:priors * 8].view(priors, 4)
        labels = [c for c in range(s.num_classes) if c != s.background_label_id]
        scores = _columns(conf.reshape(num, priors, s.num_classes), labels).transpose(1, 2)  # (num, labels, priors)
        # GetMaxScoreIndex: above the threshold, std::stable_sort by descending score, top_k
        passed = scores > s.confidence_threshold
        counts = passed.sum(dim=-1)
        if s.top_k > -1:
            counts = counts.clamp(max=s.top_k)
        if exporting:
            # the cap is static; the priors' widths go unchecked, as a program cannot raise the
            # error (the CaffeNet, run on the same priors, names the layer)
            longest = min(s.top_k, priors) if s.top_k > -1 else priors
        else:
            longest = self._longest(counts, prior_boxes_, labels, device)
        if longest == 0 or not labels:
            return self._nothing(num, device)
        ranked, order = stable_top(torch.where(passed, scores, torch.full_like(scores, -float("inf"))), longest)
        valid = torch.arange(longest, device=device) < counts[..., None]
        # decode the candidates only: (num, labels, longest, 4)
        loc_class = torch.tensor([0 if s.share_location else c for c in labels], dtype=torch.long, device=device)
        image = torch.arange(num, device=device)[:, None, None]
        candidates = decode(prior_boxes_[order], variances[order],
                            loc.reshape(num, priors, s.num_loc_classes, 4)[image, order, loc_class[:, None]],
                            s.code_type, s.variance_encoded_in_target)
        kept = greedy_nms(candidates.reshape(-1, longest, 4), box_size(candidates).reshape(-1, longest),
                          valid.reshape(-1, longest), s.nms_threshold, s.eta).view(num, len(labels), longest)
        chosen, tied = kept, torch.zeros(num, dtype=torch.bool, device=device)
        if s.keep_top_k > -1:
            chosen, tied = self._keep_top_k(kept, ranked)
        label_ids = torch.tensor(labels, dtype=torch.float32, device=device)

        def rows(image, label, position):
            return torch.cat([image.float()[:, None], label_ids[label][:, None],
                              ranked[image, label, position][:, None], candidates[image, label, position]], dim=1)

        if exporting:
            # the fork's -1 rows where no image has a detection, chosen by a mask
            found = rows(*chosen.nonzero(as_tuple=True))
            picked = torch.cat([torch.ones(found.shape[0], dtype=torch.bool, device=device),
                                (~chosen.any()).expand(num)])
            return torch.cat([found, self._nothing(num, device)[0, 0]])[picked][None, None]
        total, *tied_images = torch.cat([chosen.sum().reshape(1), tied.long()]).tolist()
        if total == 0:
            return self._nothing(num, device)
        table = rows(*chosen.nonzero(as_tuple=True))
        if any(tied_images):
            per_image = list(table.split(torch.bincount(table[:, 0].long(), minlength=num).tolist()))
            for i, is_tied in enumerate(tied_images):
                if is_tied:
                    label, position = self._fork_choice(kept[i], ranked[i])
                    per_image[i] = rows(torch.full_like(label, i), label, position)
            table = torch.cat(per_image)
        return table[None, None]

    def _longest(self, counts, prior_boxes_, labels, device) -> int:
        """The most candidates of any image and label, read in one transfer with the check
        that the priors have the positive widths and heights the fork's decoding requires."""
        s = self.settings
        checks = [counts.max() if counts.numel() else torch.zeros((), dtype=torch.long, device=device)]
        if s.code_type != "CORNER":
            width = prior_boxes_[:, 2] - prior_boxes_[:, 0]
            height = prior_boxes_[:, 3] - prior_boxes_[:, 1]
            checks.append((~((width > 0) & (height > 0))).any().long())
        longest, *bad_prior = torch.stack(checks).tolist()
        if bad_prior and bad_prior[0] and (s.share_location or labels):
            raise CaffeCompatError(f"layer '{self.layer_name}' (DetectionOutput): a prior box has no positive "
                                   f"width and height, which {s.code_type} decoding requires")
        return longest

    def _keep_top_k(self, kept, ranked):
        """The keep_top_k best of each image's kept boxes: (the chosen mask, the images
        where equal scores make the fork's unstable std::sort decide)."""
        num, classes, longest = kept.shape
        flat = torch.where(kept, ranked, torch.full_like(ranked, -float("inf"))).reshape(num, -1)
        best, order = torch.sort(flat, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=kept.device).expand_as(order))
        chosen = kept & (rank.view(num, classes, longest) < self.settings.keep_top_k)
        detections = kept.sum(dim=(1, 2))
        ties = ((best[:, 1:] == best[:, :-1]) & (best[:, 1:] > -float("inf"))).any(dim=1)
        return chosen, ties & (detections > self.settings.keep_top_k)

    def _fork_choice(self, kept, ranked):
        """One image's keep_top_k choice where equal scores meet the cut or share a label:
        its kept boxes in the fork's push order (label, then NMS order) sorted by
        libstdc++'s std::sort on descending score, the first keep_top_k, grouped by label
        in that order. One transfer of the image's kept scores."""
        label, position = kept.nonzero(as_tuple=True)
        items = list(enumerate(ranked[label, position].tolist()))
        libstdcxx_sort(items, lambda a, b: a[1] > b[1])
        labels = label.tolist()
        picked = sorted((j for j, _ in items[:self.settings.keep_top_k]), key=lambda j: labels[j])  # stable
        picked = torch.tensor(picked, dtype=torch.long, device=kept.device)
        return label[picked], position[picked]

    @staticmethod
    def _nothing(num: int, device) -> torch.Tensor:
        """The fork's rows when no image has a detection: one [i, -1, ..., -1] per image."""
        rows = torch.full((1, 1, num, 7), -1.0, device=device)
        rows[0, 0, :, 0] = torch.arange(num, dtype=torch.float32, device=device)
        return rows


def _columns(x: torch.Tensor, columns: list) -> torch.Tensor:
    """x[..., columns]: a view where the columns are one run, as the labels are when the
    background is the first or last class or none (a list index copies, in a tenth of
    DetectionOutput's time at batch 1)."""
    start = columns[0] if columns else 0
    if columns == list(range(start, start + len(columns))):
        return x[..., start:start + len(columns)]
    return x.index_select(-1, torch.tensor(columns, dtype=torch.long, device=x.device))


@register_onnx("PriorBox")
def prior_box_to_onnx(g: OnnxGraph, ctx, module: PriorBox, inputs, outputs):
    """A constant: the priors depend on the exported shapes only (one set for any batch)."""
    s = module.settings
    layer_h, layer_w = legacy_hw(tuple(ctx.bottom_shapes[0]))
    img_h, img_w = (s.img_h, s.img_w) if s.img_h and s.img_w else legacy_hw(tuple(ctx.bottom_shapes[1]))
    g.node("Constant", [], outputs, value=g.tensor(prior_boxes(s, layer_h, layer_w, img_h, img_w)))


DETECTION_OUTPUT_SOURCE = """
def decode_boxes(prior, variance, loc, code_type, variance_encoded_in_target):
    \"\"\"The SSD fork's DecodeBBox: priors and variances (P, 4) against loc (..., P, L, 4) in its
    float32 arithmetic; boxes (..., P, L, 4) as (xmin, ymin, xmax, ymax), not clipped.\"\"\"
    p, v = prior[:, None, :], variance[:, None, :]
    if code_type == "CORNER":
        return p + loc if variance_encoded_in_target else p + v * loc
    width, height = p[..., 2] - p[..., 0], p[..., 3] - p[..., 1]
    if code_type == "CORNER_SIZE":
        extent = torch.stack([width, height, width, height], dim=-1)
        return p + loc * extent if variance_encoded_in_target else p + v * loc * extent
    center_x, center_y = (p[..., 0] + p[..., 2]) / 2, (p[..., 1] + p[..., 3]) / 2
    scaled = loc if variance_encoded_in_target else v * loc
    box_cx, box_cy = scaled[..., 0] * width + center_x, scaled[..., 1] * height + center_y
    box_w = torch.exp(scaled[..., 2].double()).float() * width  # expf, correctly rounded
    box_h = torch.exp(scaled[..., 3].double()).float() * height
    return torch.stack([box_cx - box_w / 2, box_cy - box_h / 2, box_cx + box_w / 2, box_cy + box_h / 2], dim=-1)


def box_size(boxes):
    \"\"\"The fork's BBoxSize: width * height, 0 for a box whose max is below its min.\"\"\"
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    inverted = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
    return torch.where(inverted, torch.zeros_like(width), width * height)


def greedy_nms(boxes, sizes, valid, threshold, eta):
    \"\"\"The fork's ApplyNMSFast on lists (B, K) sorted as it sorts them: a candidate is kept when
    its overlap with every box kept before it is <= the threshold (false for NaN), which then
    shrinks by eta while above 0.5.\"\"\"
    a, b = boxes[:, :, None, :], boxes[:, None, :, :]
    inter_w = torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])
    inter_h = torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])
    inter = inter_w * inter_h
    overlaps = inter / (sizes[:, :, None] + sizes[:, None, :] - inter)
    overlaps = torch.where((inter_w > 0) & (inter_h > 0), overlaps, torch.zeros_like(overlaps))
    kept = torch.zeros_like(valid)
    limit = torch.full((valid.shape[0],), threshold, dtype=torch.float32, device=boxes.device)
    for k in range(valid.shape[1]):
        clash = (kept[:, :k] & ~(overlaps[:, k, :k] <= limit[:, None])).any(dim=1)
        kept[:, k] = valid[:, k] & ~clash
        if eta < 1:
            limit = torch.where(kept[:, k] & (limit > 0.5), limit * eta, limit)
    return kept


class DetectionOutput(nn.Module):
    \"\"\"The SSD fork's DetectionOutput: boxes decoded, each class's scores above the threshold
    ranked (top_k), greedy NMS, then each image's keep_top_k best, as rows (1, 1, rows, 7) of
    [image, label, score, xmin, ymin, xmax, ymax] by image, label and score; one row
    [image, -1, ...] per image when no image has one. Where equal scores meet the keep_top_k cut,
    libstdc++'s std::sort decides, as in the fork. No gradient.\"\"\"

    def __init__(self, **settings):
        super().__init__()
        self.settings = settings

    @torch.no_grad()
    def forward(self, loc, conf, prior):
        s = self.settings
        loc, conf, prior = loc.detach().float(), conf.detach().float(), prior.detach().float()
        num, priors = loc.shape[0], s["num_priors"]
        flat = prior.reshape(-1)  # the first image's priors, then their variances
        prior_boxes, variances = flat[:priors * 4].view(priors, 4), flat[priors * 4:priors * 8].view(priors, 4)
        loc_classes = 1 if s["share_location"] else s["num_classes"]
        boxes = decode_boxes(prior_boxes, variances, loc.reshape(num, priors, loc_classes, 4), s["code_type"],
                             s["variance_encoded_in_target"])
        labels = [c for c in range(s["num_classes"]) if c != s["background_label_id"]]
        loc_class = torch.tensor([0 if s["share_location"] else c for c in labels], dtype=torch.long, device=loc.device)
        scores = conf.reshape(num, priors, s["num_classes"])[:, :, labels].transpose(1, 2)
        class_boxes = boxes[:, :, loc_class].transpose(1, 2)  # (num, labels, priors, 4)
        passed = scores > s["confidence_threshold"]
        ranked, order = torch.sort(torch.where(passed, scores, torch.full_like(scores, -float("inf"))),
                                   dim=-1, descending=True, stable=True)
        counts = passed.sum(dim=-1)
        if s["top_k"] > -1:
            counts = counts.clamp(max=s["top_k"])
        extent = prior_boxes[:, 2:] - prior_boxes[:, :2]
        if s["code_type"] != "CORNER" and (s["share_location"] or labels) and not (extent > 0).all():
            raise ValueError(f"DetectionOutput: a prior box has no positive width and height, which "
                             f"{s['code_type']} decoding requires")
        longest = int(counts.max()) if counts.numel() else 0
        if longest == 0:
            return self.nothing(num, loc.device)
        order, ranked = order[..., :longest], ranked[..., :longest]
        valid = torch.arange(longest, device=loc.device) < counts[..., None]
        candidates = torch.gather(class_boxes, 2, order[..., None].expand(-1, -1, -1, 4))
        kept = greedy_nms(candidates.reshape(-1, longest, 4), box_size(candidates).reshape(-1, longest),
                          valid.reshape(-1, longest), s["nms_threshold"], s["eta"]).view(num, len(labels), longest)
        chosen, tied = (kept, None) if s["keep_top_k"] < 0 else self.keep_top_k(kept, ranked)
        if not chosen.any():
            return self.nothing(num, loc.device)
        label_ids = torch.tensor(labels, dtype=torch.float32, device=loc.device)

        def rows(image, label, position):
            return torch.cat([image.float()[:, None], label_ids[label][:, None],
                              ranked[image, label, position][:, None], candidates[image, label, position]], dim=1)

        table = rows(*chosen.nonzero(as_tuple=True))
        if tied is not None and tied.any():  # those images' rows as the fork's std::sort orders them
            per_image = list(table.split(torch.bincount(table[:, 0].long(), minlength=num).tolist()))
            for i in tied.nonzero()[:, 0].tolist():
                label, position = self.fork_choice(kept[i], ranked[i])
                per_image[i] = rows(torch.full_like(label, i), label, position)
            table = torch.cat(per_image)
        return table[None, None]

    def keep_top_k(self, kept, ranked):
        \"\"\"The keep_top_k best of each image's kept boxes: (the chosen mask, the images where equal
        scores make the fork's unstable std::sort decide).\"\"\"
        num, classes, longest = kept.shape
        keep = self.settings["keep_top_k"]
        flat = torch.where(kept, ranked, torch.full_like(ranked, -float("inf"))).reshape(num, -1)
        best, order = torch.sort(flat, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=kept.device).expand_as(order))
        ties = ((best[:, 1:] == best[:, :-1]) & (best[:, 1:] > -float("inf"))).any(dim=1)
        return kept & (rank.view(num, classes, longest) < keep), ties & (kept.sum(dim=(1, 2)) > keep)

    def fork_choice(self, kept, ranked):
        \"\"\"One image's keep_top_k choice where equal scores decide: its kept boxes in the fork's
        push order (label, then NMS order) sorted by libstdc++'s std::sort on descending score,
        the first keep_top_k, grouped by label in that order.\"\"\"
        label, position = kept.nonzero(as_tuple=True)
        items = list(enumerate(ranked[label, position].tolist()))
        libstdcxx_sort(items, lambda a, b: a[1] > b[1])
        labels = label.tolist()
        picked = sorted((j for j, _ in items[:self.settings["keep_top_k"]]), key=lambda j: labels[j])  # stable
        picked = torch.tensor(picked, dtype=torch.long, device=kept.device)
        return label[picked], position[picked]

    @staticmethod
    def nothing(num, device):
        \"\"\"The fork's rows when no image has a detection.\"\"\"
        rows = torch.full((1, 1, num, 7), -1.0, device=device)
        rows[0, 0, :, 0] = torch.arange(num, dtype=torch.float32, device=device)
        return rows
"""


# libstdc++'s std::sort, the package's own functions written into the file as they are
LIBSTDCXX_SORT_SOURCE = "\n\n\n".join(
    [f"_THRESHOLD = {bbox._THRESHOLD}"] + [inspect.getsource(fn).strip("\n") for fn in (
        bbox.libstdcxx_sort, bbox._introsort_loop, bbox._move_median_to_first, bbox._unguarded_partition,
        bbox._final_insertion_sort, bbox._insertion_sort, bbox._unguarded_linear_insert, bbox._adjust_heap,
        bbox._make_heap, bbox._sort_heap)])


@register_source("DetectionOutput")
def detection_output_to_source(src, ctx, module: DetectionOutput, inputs, outputs):
    src.helper(LIBSTDCXX_SORT_SOURCE)
    src.helper(DETECTION_OUTPUT_SOURCE)
    settings = ", ".join(f"{key}={value!r}" for key, value in dataclasses.asdict(module.settings).items())
    layer = src.attribute(ctx, f"DetectionOutput({settings})", {})
    src.assign(outputs, f"{layer}({', '.join(inputs[:3])})")


@register("DetectionOutput")
def build_detection_output(ctx: LayerContext):
    settings = detection_settings(ctx)
    return ctx.wire(DetectionOutput(settings, ctx.name), top_shapes=[(1, 1, 1, 7)],
                    bottoms=ctx.bottoms[:3])


@register_onnx("DetectionOutput")
def detection_output_to_onnx(g: OnnxGraph, ctx, module: DetectionOutput, inputs, outputs):
    """DetectionOutput in standard operators: the forward above with ONNX's NonMaxSuppression
    as ApplyNMSFast. Each image and label is its own NMS batch over its top_k candidates,
    already ranked as the fork ranks them (TopK breaks ties by the lower index, as
    std::stable_sort does); NonMaxSuppression keeps a candidate above the score threshold
    unless its overlap with a kept one is above the NMS threshold, in the same float
    arithmetic, and lists them per batch in that order, which is the rows' order. Boxes
    whose max is below their min, which the fork neither suppresses nor lets suppress,
    enter NMS as empty boxes (ONNX Runtime would reorder their corners). Adaptive NMS
    (eta < 1) is refused. Where keep_top_k cuts, equal scores within an image are taken
    by lower label and rank, where the fork's std::sort picks its own way."""
    s, name = module.settings, ctx.name
    if s.eta < 1:
        raise CaffeCompatError(f"layer '{name}' (DetectionOutput): nms_param.eta {s.eta:g} (adaptive NMS) has "
                               f"no equivalent in ONNX's NonMaxSuppression; export it with eta 1")
    g.metadata[f"output.{ctx.tops[0]}"] = DETECTION_ROWS
    loc, conf, prior = inputs[:3]
    priors, loc_classes = s.num_priors, s.num_loc_classes
    labels = [c for c in range(s.num_classes) if c != s.background_label_id]
    candidates = priors if s.top_k < 0 else min(s.top_k, priors)
    keep = -1 if s.keep_top_k < 0 else min(s.keep_top_k, len(labels) * candidates)

    def op(op_type, *args, hint, **attributes):
        return g.node(op_type, list(args), hint=f"{name}/{hint}", **attributes)[0]

    def ints(values, hint):
        return g.ints(values, f"{name}/{hint}")

    (num,) = g.node("Slice", [g.node("Shape", [loc], hint=f"{name}/loc_shape")[0], ints([0], "zero"),
                              ints([1], "one")], hint=f"{name}/num")
    if not labels or candidates == 0 or keep == 0:
        g.node("Unsqueeze", [_no_detections(g, name, num), ints([0, 1], "row_axes")], outputs)
        return
    # decode: priors (P, 1, 4) against locations (N, P, L, 4), as bbox.decode computes
    flat_prior = op("Reshape", prior, ints([-1], "flat"), hint="prior_flat")
    boxes_of = op("Reshape", op("Slice", flat_prior, ints([0], "zero_"), ints([priors * 4], "boxes_end"),
                               hint="prior_values"), ints([priors, 1, 4], "prior_shape"), hint="priors")
    variances = op("Reshape", op("Slice", flat_prior, ints([priors * 4], "variances_start"),
                                 ints([priors * 8], "variances_end"), hint="variance_values"),
                   ints([priors, 1, 4], "variance_shape"), hint="variances")
    locations = op("Reshape", loc, ints([0, priors, loc_classes, 4], "loc_shape"), hint="locations")
    boxes = _decode_onnx(g, name, boxes_of, variances, locations, s.code_type, s.variance_encoded_in_target)
    # per (image, label): boxes (N * labels, P, 4) and scores (N * labels, P)
    loc_class = ints([0 if s.share_location else c for c in labels], "loc_class")
    class_boxes = op("Reshape", op("Transpose", op("Gather", boxes, loc_class, hint="class_boxes_npl", axis=2),
                                   hint="class_boxes_nlp", perm=[0, 2, 1, 3]),
                     ints([-1, priors, 4], "class_boxes_shape"), hint="class_boxes")
    scores = op("Gather", op("Reshape", conf, ints([0, priors, s.num_classes], "conf_shape"), hint="scores_npc"),
                ints(labels, "labels"), hint="scores_npl", axis=2)
    scores = op("Reshape", op("Transpose", scores, hint="scores_nlp", perm=[0, 2, 1]),
                ints([-1, priors], "scores_shape"), hint="class_scores")
    # GetMaxScoreIndex's ranking and top_k; the threshold is NonMaxSuppression's
    ranked, order = g.node("TopK", [scores, ints([candidates], "top_k")],
                           [g.fresh(f"{name}/ranked"), g.fresh(f"{name}/order")], axis=1, largest=1, sorted=1)
    candidate_boxes = op("GatherElements", class_boxes,
                         op("Expand", op("Unsqueeze", order, ints([2], "last"), hint="order_column"),
                            ints([1, 1, 4], "four"), hint="order_boxes"),
                         hint="candidate_boxes", axis=1)
    corners = [op("Slice", candidate_boxes, ints([i], f"c{i}"), ints([i + 1], f"c{i}_end"), ints([2], "axis2"),
                  hint=f"corner{i}") for i in range(4)]
    inverted = op("Or", op("Less", corners[2], corners[0], hint="x_inverted"),
                  op("Less", corners[3], corners[1], hint="y_inverted"), hint="inverted")
    nms_boxes = op("Where", inverted, g.floats(0.0, f"{name}/empty"), candidate_boxes, hint="nms_boxes")
    selected = op("NonMaxSuppression", nms_boxes, op("Unsqueeze", ranked, ints([1], "class_axis"), hint="nms_scores"),
                  ints([candidates], "max_boxes"), g.floats([s.nms_threshold], f"{name}/nms_threshold"),
                  g.floats([s.confidence_threshold], f"{name}/confidence_threshold"), hint="selected")
    batch = op("Slice", selected, ints([0], "col0"), ints([1], "col0_end"), ints([1], "axis1"), hint="nms_batch")
    rank = op("Slice", selected, ints([2], "col2"), ints([3], "col2_end"), ints([1], "axis1_"), hint="rank")
    where = op("Concat", batch, rank, hint="where", axis=1)  # (M, 2): NMS batch, candidate rank
    score = op("GatherND", ranked, where, hint="score")
    if keep > 0:
        where, score = _keep_top_k(g, name, ranked, where, score, len(labels) * candidates, keep, num)
        batch = op("Slice", where, ints([0], "col0_"), ints([1], "col0_end_"), ints([1], "axis1__"),
                   hint="kept_batch")
    image = op("Div", batch, ints([len(labels)], "label_count"), hint="image")
    label_at = op("Mod", batch, ints([len(labels)], "label_count_"), hint="label_index")
    label = op("Gather", g.floats(labels, f"{name}/label_ids"), op("Squeeze", label_at, ints([1], "squeeze"),
                                                                    hint="label_flat"), hint="label", axis=0)
    box = op("GatherND", candidate_boxes, where, hint="box")
    rows = op("Concat", op("Cast", image, hint="image_float", to=FLOAT), op("Unsqueeze", label, ints([1], "col"),
                                                                            hint="label_column"),
              op("Unsqueeze", score, ints([1], "col_"), hint="score_column"), box, hint="rows", axis=1)
    # the fork's rows when no image has a detection, chosen without a branch
    count = op("Slice", op("Shape", rows, hint="rows_shape"), ints([0], "zero__"), ints([1], "one_"), hint="count")
    end = op("Where", op("Equal", count, ints([0], "none"), hint="nothing"), num, count, hint="end")
    table = op("Slice", op("Concat", rows, _no_detections(g, name, num), hint="rows_or_nothing", axis=0),
               ints([0], "start"), end, ints([0], "axis0"), hint="table")
    g.node("Unsqueeze", [table, ints([0, 1], "row_axes")], outputs)


def _keep_top_k(g: OnnxGraph, name, ranked, where, score, length, keep, num):
    """The rows among `where` (and their scores) whose score is among their image's
    `keep` best kept ones, in the order they came."""
    def op(op_type, *args, hint, **attributes):
        return g.node(op_type, list(args), hint=f"{name}/{hint}", **attributes)[0]

    shape = op("Shape", ranked, hint="ranked_shape")
    lowest = op("ConstantOfShape", shape, hint="unkept", value=g.tensor(np.array([-np.inf], np.float32)))
    kept = op("Reshape", op("ScatterND", lowest, where, score, hint="kept_scores"),
              op("Concat", num, g.ints([length], f"{name}/image_length"), hint="per_image_shape", axis=0),
              hint="image_scores")
    best, position = g.node("TopK", [kept, g.ints([keep], f"{name}/keep_top_k")], axis=1, largest=1, sorted=1,
                            outputs=[g.fresh(f"{name}/best"), g.fresh(f"{name}/best_at")])
    real = op("Cast", op("Greater", best, g.floats(-np.inf, f"{name}/minus_inf"), hint="is_kept"),
              hint="is_kept_float", to=FLOAT)
    chosen = op("ScatterElements", op("ConstantOfShape", op("Shape", kept, hint="image_scores_shape"),
                                      hint="none_chosen", value=g.tensor(np.array([0], np.float32))),
                position, real, hint="chosen_flat", axis=1)
    chosen = op("Cast", op("GatherND", op("Reshape", chosen, shape, hint="chosen"), where, hint="row_chosen"),
                hint="row_chosen_bool", to=BOOL)
    return (op("Compress", where, chosen, hint="kept_where", axis=0),
            op("Compress", score, chosen, hint="kept_score", axis=0))


def _no_detections(g: OnnxGraph, name, num):
    """(N, 7): [i, -1, -1, -1, -1, -1, -1] for each image i."""
    def op(op_type, *args, hint, **attributes):
        return g.node(op_type, list(args), hint=f"{name}/{hint}", **attributes)[0]

    count = op("Squeeze", num, g.ints([0], f"{name}/nothing_axis"), hint="image_count")
    images = op("Cast", op("Range", g.ints(0, f"{name}/range_start"), count, g.ints(1, f"{name}/range_step"),
                           hint="image_ids"), hint="image_ids_float", to=FLOAT)
    rest = op("ConstantOfShape", op("Concat", num, g.ints([6], f"{name}/six"), hint="nothing_shape", axis=0),
              hint="minus_ones", value=g.tensor(np.array([-1], np.float32)))
    return op("Concat", op("Unsqueeze", images, g.ints([1], f"{name}/image_column"), hint="image_column"), rest,
              hint="nothing", axis=1)


def _decode_onnx(g: OnnxGraph, name, prior, variance, loc, code_type, in_target):
    """bbox.decode in ONNX operators, op for op."""
    def op(op_type, *args, hint):
        return g.node(op_type, list(args), hint=f"{name}/{hint}")[0]

    def column(x, i, hint):
        return g.node("Slice", [x, g.ints([i], f"{name}/at{i}"), g.ints([i + 1], f"{name}/at{i}_end"),
                                g.ints([-1], f"{name}/last_axis")], hint=f"{name}/{hint}")[0]

    scaled = loc if in_target else op("Mul", variance, loc, hint="scaled")
    if code_type == "CORNER":
        return op("Add", prior, scaled, hint="boxes")
    x0, y0, x1, y1 = (column(prior, i, f"prior{i}") for i in range(4))
    width, height = op("Sub", x1, x0, hint="prior_width"), op("Sub", y1, y0, hint="prior_height")
    if code_type == "CORNER_SIZE":
        extent = g.node("Concat", [width, height, width, height], hint=f"{name}/extent", axis=-1)[0]
        return op("Add", prior, op("Mul", scaled, extent, hint="offsets"), hint="boxes")
    two = g.floats(2.0, f"{name}/two")
    center_x = op("Div", op("Add", x0, x1, hint="prior_x_sum"), two, hint="prior_center_x")
    center_y = op("Div", op("Add", y0, y1, hint="prior_y_sum"), two, hint="prior_center_y")
    box_cx = op("Add", op("Mul", column(scaled, 0, "dx"), width, hint="dx_scaled"), center_x, hint="box_cx")
    box_cy = op("Add", op("Mul", column(scaled, 1, "dy"), height, hint="dy_scaled"), center_y, hint="box_cy")

    def extent_of(i, size, hint):
        wide = g.node("Cast", [column(scaled, i, f"d{hint}")], hint=f"{name}/d{hint}_double", to=DOUBLE)[0]
        grown = g.node("Cast", [op("Exp", wide, hint=f"exp_{hint}")], hint=f"{name}/exp_{hint}_float", to=FLOAT)[0]
        return op("Div", op("Mul", grown, size, hint=f"box_{hint}"), two, hint=f"half_{hint}")

    half_w, half_h = extent_of(2, width, "w"), extent_of(3, height, "h")
    return g.node("Concat", [op("Sub", box_cx, half_w, hint="xmin"), op("Sub", box_cy, half_h, hint="ymin"),
                             op("Add", box_cx, half_w, hint="xmax"), op("Add", box_cy, half_h, hint="ymax")],
                  hint=f"{name}/boxes", axis=-1)[0]
