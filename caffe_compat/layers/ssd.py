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

from typing import Dict, Tuple

import numpy as np
import torch

from ..errors import CaffeCompatError
from ..ssd_params import (DetectionSettings, PriorBoxSettings, detection_settings, legacy_hw, prior_box_settings,
                          prior_box_top)
from .bbox import box_size, decode, greedy_nms, libstdcxx_sort
from .registry import CaffeLayer, LayerContext, register


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


class DetectionOutput(CaffeLayer):
    def __init__(self, settings: DetectionSettings, layer_name: str):
        super().__init__()
        self.settings = settings
        self.layer_name = layer_name

    def forward(self, loc, conf, prior):
        with torch.no_grad():
            return self._detect(loc.detach().float(), conf.detach().float(), prior.detach().float())

    def _detect(self, loc, conf, prior):
        s = self.settings
        num, priors, device = loc.shape[0], s.num_priors, loc.device
        if device.type == "meta":
            return torch.empty((1, 1, 1, 7), device="meta")
        flat = prior.reshape(-1)  # the first image's priors, then their variances
        prior_boxes_, variances = flat[:priors * 4].view(priors, 4), flat[priors * 4:priors * 8].view(priors, 4)
        boxes = decode(prior_boxes_, variances, loc.reshape(num, priors, s.num_loc_classes, 4), s.code_type,
                       s.variance_encoded_in_target)
        labels = [c for c in range(s.num_classes) if c != s.background_label_id]
        loc_class = torch.tensor([0 if s.share_location else c for c in labels], dtype=torch.long, device=device)
        scores = conf.reshape(num, priors, s.num_classes)[:, :, labels].transpose(1, 2)  # (num, labels, priors)
        class_boxes = boxes[:, :, loc_class].transpose(1, 2)  # (num, labels, priors, 4)
        # GetMaxScoreIndex: above the threshold, std::stable_sort by descending score, top_k
        passed = scores > s.confidence_threshold
        ranked, order = torch.sort(torch.where(passed, scores, torch.full_like(scores, -float("inf"))),
                                   dim=-1, descending=True, stable=True)
        counts = passed.sum(dim=-1)
        if s.top_k > -1:
            counts = counts.clamp(max=s.top_k)
        checks = [counts.max() if counts.numel() else torch.zeros((), dtype=torch.long, device=device)]
        if s.code_type != "CORNER":
            width = prior_boxes_[:, 2] - prior_boxes_[:, 0]
            height = prior_boxes_[:, 3] - prior_boxes_[:, 1]
            checks.append((~((width > 0) & (height > 0))).any().long())
        longest, *bad_prior = torch.stack(checks).tolist()
        if bad_prior and bad_prior[0] and (s.share_location or labels):
            raise CaffeCompatError(f"layer '{self.layer_name}' (DetectionOutput): a prior box has no positive "
                               f"width and height, which {s.code_type} decoding requires")
        if longest == 0:
            return self._nothing(num, device)
        order = order[..., :longest]
        valid = torch.arange(longest, device=device) < counts[..., None]
        candidates = torch.gather(class_boxes, 2, order[..., None].expand(-1, -1, -1, 4))
        kept = greedy_nms(candidates.reshape(-1, longest, 4), box_size(candidates).reshape(-1, longest),
                          valid.reshape(-1, longest), s.nms_threshold, s.eta).view(num, len(labels), longest)
        ranked = ranked[..., :longest]
        chosen, tied = kept, torch.zeros(num, dtype=torch.bool, device=device)
        if s.keep_top_k > -1:
            chosen, tied = self._keep_top_k(kept, ranked)
        total, *tied_images = torch.cat([chosen.sum().reshape(1), tied.long()]).tolist()
        if total == 0:
            return self._nothing(num, device)
        label_ids = torch.tensor(labels, dtype=torch.float32, device=device)

        def rows(image, label, position):
            return torch.cat([image.float()[:, None], label_ids[label][:, None],
                              ranked[image, label, position][:, None], candidates[image, label, position]], dim=1)

        table = rows(*chosen.nonzero(as_tuple=True))
        if any(tied_images):
            per_image = list(table.split(torch.bincount(table[:, 0].long(), minlength=num).tolist()))
            for i, is_tied in enumerate(tied_images):
                if is_tied:
                    label, position = self._fork_choice(kept[i], ranked[i])
                    per_image[i] = rows(torch.full_like(label, i), label, position)
            table = torch.cat(per_image)
        return table[None, None]

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


@register("DetectionOutput")
def build_detection_output(ctx: LayerContext):
    settings = detection_settings(ctx)
    return ctx.wire(DetectionOutput(settings, ctx.name), top_shapes=[(1, 1, 1, 7)],
                    bottoms=ctx.bottoms[:3])
