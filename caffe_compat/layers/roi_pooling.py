"""Fast R-CNN's ROIPooling (rbgirshick/caffe-fast-rcnn 4115385d, roi_pooling_layer.cpp)
and R-FCN's PSROIPooling (daijifeng001/caffe-rfcn 543f8f6a, psroi_pooling_layer.cu; the
same layer in Microsoft's fork).

Both read rois (R, 5) = (batch index, x1, y1, x2, y2) in image pixels and cut each into
bins in the forks' arithmetic: the batch index truncated to an int, corners rounded
half away from zero (C's round), bin edges floor / ceil of float32 products, clipped to
the feature map; an empty bin gives 0. ROIPooling takes each bin's maximum, the first
in row-major order among equal values, starting from -FLT_MAX with a strict `>` (NaN
never wins). PSROIPooling averages bin (ph, pw) of output channel d over input channel
(d * group_size + ph) * group_size + pw, summing in the kernel's order in float32.

Gradients: the fork's ROIPooling Backward_cpu is NOT_IMPLEMENTED; this follows its GPU
kernel, which sends each bin's diff to the element it took (its argmax), summed over
bins and rois, but only from rois well formed after rounding and from the bins its own
float32 arithmetic finds for the element. PSROIPooling's autograd spreads diff / area
over each bin, as R-FCN's GPU kernel does. Neither passes a gradient to the rois. ONNX: onnxruntime's MaxRoiPool starts
each bin at FLT_MIN (a positive number), so a bin of negative values differs from the
fork's; no standard operator computes PSROIPooling; ONNX export refuses both, naming the layer.
torch.export (`convert -o model.pt2`) traces roi_pool_by_table and psroi_pool_looped instead,
which give the same values with no Python loop over the rois' bins."""
from __future__ import annotations

import inspect

import torch

from ..errors import CaffeCompatError
from ..params.roi import (PSROIPoolingSettings, ROIPoolingSettings, psroi_pooling_settings, psroi_pooling_top,
                          roi_pooling_settings, roi_pooling_top)
from .pooling import FLT_MAX, FLT_MAX_SOURCE
from .registry import CaffeLayer, LayerContext, register, register_source


def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    """C's round() of float32 values, as int64: in float64, where adding 1/2 is exact."""
    wide = values.double()
    return torch.trunc(wide + torch.copysign(torch.full_like(wide, 0.5), wide)).long()


def _batch_indices(rois: torch.Tensor, batch: int, layer_name: str, layer_type: str) -> torch.Tensor:
    """`int roi_batch_ind = bottom_rois[0]` (truncation), checked against the batch."""
    index = rois[:, 0].to(torch.int64)
    bad = ((index < 0) | (index >= batch)).nonzero()
    if bad.numel():
        first = int(bad[0, 0])
        raise CaffeCompatError(f"layer '{layer_name}' ({layer_type}): roi {first} has batch index "
                               f"{float(rois[first, 0])}, outside the {batch} image(s) of the batch")
    return index


def _bins(start: torch.Tensor, bin_size: torch.Tensor, pooled: int, limit: int, offset_before_clip: bool) -> tuple:
    """[start, end) of each roi's `pooled` bins along one axis, clipped to [0, limit]:
    floor(p * bin_size) and ceil((p + 1) * bin_size) in float32, the roi's start added
    after (ROIPooling, integer start) or inside the float sum (PSROIPooling)."""
    steps = torch.arange(pooled + 1, dtype=torch.float32, device=bin_size.device)
    edges = steps[None, :] * bin_size[:, None]
    if offset_before_clip:
        low = torch.floor(edges[:, :-1]).long() + start[:, None]
        high = torch.ceil(edges[:, 1:]).long() + start[:, None]
    else:
        low = torch.floor(edges[:, :-1] + start[:, None]).long()
        high = torch.ceil(edges[:, 1:] + start[:, None]).long()
    return low.clamp(0, limit), high.clamp(0, limit)


def roi_pool(data, rois, batch, pooled_h: int, pooled_w: int, spatial_scale: float):
    """ROIPooling of data (N, C, H, W) over rois (R, 5) whose batch indices `batch` are checked:
    (R, C, pooled_h, pooled_w)."""
    num, channels, height, width = data.shape
    with torch.no_grad():
        start_w, start_h, end_w, end_h = _round_half_away(rois[:, 1:] * spatial_scale).unbind(1)
        # malformed rois are forced to 1x1; the sizes are ints turned into float32
        bin_h = (end_h - start_h + 1).clamp(min=1).float() / pooled_h
        bin_w = (end_w - start_w + 1).clamp(min=1).float() / pooled_w
        h0, h1 = _bins(start_h, bin_h, pooled_h, height, True)
        w0, w1 = _bins(start_w, bin_w, pooled_w, width, True)
        best, taken_at = _roi_scan(data, batch, h0, h1, w0, w1)
        sends = _roi_backward_reach(taken_at, (start_h, end_h, bin_h), (start_w, end_w, bin_w), height, width)
    # the values again, gathered at each bin's argmax, so that autograd sends a bin's
    # gradient there where the GPU kernel does
    flat = data.permute(0, 2, 3, 1).reshape(num * height * width, channels)
    taken = flat.gather(0, taken_at.clamp(min=0).reshape(-1, channels)).view(taken_at.shape)
    out = torch.where(sends, taken, best)
    return out.permute(0, 3, 1, 2).contiguous()


def _roi_backward_reach(taken_at, along_h, along_w, height: int, width: int):
    """Where ROIPoolBackward (the GPU kernel) adds a bin's diff to its argmax: the
    element lies in the roi as rounded (none for a malformed roi, end < start) and
    the bin is among those it computes, in float32, that could have pooled it."""
    reach = taken_at >= 0
    position = taken_at.clamp(min=0)
    for axis, (start, end, bin_size), coordinate in ((1, along_h, position // width % height),
                                                     (2, along_w, position % width)):
        pooled = taken_at.shape[axis]
        view = (-1, 1, 1, 1)
        start, end, bin_size = start.view(view), end.view(view), bin_size.view(view)
        offset = coordinate - start
        first = torch.floor(offset.float() / bin_size).long().clamp(0, pooled)
        last = torch.ceil((offset + 1).float() / bin_size).long().clamp(0, pooled)
        index = torch.arange(pooled, device=taken_at.device).view((1, -1, 1, 1) if axis == 1 else (1, 1, -1, 1))
        reach &= (coordinate >= start) & (coordinate <= end) & (index >= first) & (index < last)
    return reach


def _roi_scan(data, batch, h0, h1, w0, w1):
    """Each bin's max over its window, scanned as the fork scans it (rows, then
    columns, strict >), one window offset at a time, over the rois whose windows
    reach that far: (values, flat positions in (N * H * W), -1 where nothing was
    taken), both (R, pooled_h, pooled_w, C)."""
    num, channels, height, width = data.shape
    # positions outside a bin read a row of -inf, which is never > the bin's best
    flat = torch.cat([data.detach().permute(0, 2, 3, 1).reshape(num * height * width, channels),
                      torch.full((1, channels), -float("inf"), dtype=data.dtype, device=data.device)])
    count, ph, pw = batch.shape[0], h0.shape[1], w0.shape[1]
    empty = (h1 <= h0)[:, :, None] | (w1 <= w0)[:, None, :]
    best = torch.full((count, ph, pw, channels), -FLT_MAX, dtype=data.dtype, device=data.device)
    best[empty] = 0
    taken_step = torch.full((count, ph, pw, channels), -1, dtype=torch.int32, device=data.device)
    roi_reach_h = (h1 - h0).clamp(min=0).amax(1) if count else h0.new_zeros(0)
    roi_reach_w = (w1 - w0).clamp(min=0).amax(1) if count else w0.new_zeros(0)
    reach_h = int(roi_reach_h.max()) if count else 0
    reach_w = int(roi_reach_w.max()) if count else 0
    for i in range(reach_h):
        for j in range(reach_w):
            active = ((roi_reach_h > i) & (roi_reach_w > j)).nonzero()[:, 0]
            every = active.numel() == count
            pick = (lambda t: t) if every else (lambda t: t.index_select(0, active))
            row, column = pick(h0) + i, pick(w0) + j
            inside = (row < pick(h1))[:, :, None] & (column < pick(w1))[:, None, :]
            position = (pick(batch)[:, None, None] * height + row[:, :, None]) * width + column[:, None, :]
            position = torch.where(inside, position, num * height * width)
            values = flat.index_select(0, position.reshape(-1)).view(-1, ph, pw, channels)
            current, steps = pick(best), pick(taken_step)
            better = values > current
            new_best = torch.where(better, values, current)
            new_steps = torch.where(better, i * reach_w + j, steps)
            if every:
                best, taken_step = new_best, new_steps
            else:
                best.index_copy_(0, active, new_best)
                taken_step.index_copy_(0, active, new_steps)
    step = taken_step.long().clamp(min=0)
    row = h0[:, :, None, None] + step // max(reach_w, 1)
    column = w0[:, None, :, None] + step % max(reach_w, 1)
    position = (batch[:, None, None, None] * height + row) * width + column
    return best, torch.where(taken_step >= 0, position, -1)


def _range_max_table(values: torch.Tensor, axis: int) -> torch.Tensor:
    """Level k of a sparse table along `axis` of `values`, stacked in a new dim 0: the max of
    the 2^k elements from each position on (the clipped end repeats the last element, which
    no query whose window fits reaches)."""
    size = values.shape[axis]
    levels = [values]
    while 2 ** len(levels) <= size:
        half = 2 ** (len(levels) - 1)
        last = levels[-1]
        ahead = torch.cat([last.narrow(axis, half, size - half),
                           last.narrow(axis, size - 1, 1).expand_as(last.narrow(axis, 0, half))], axis)
        levels.append(torch.maximum(last, ahead))
    return torch.stack(levels)


def _floor_log2(length: torch.Tensor, levels: int) -> torch.Tensor:
    """floor(log2(length)) of lengths >= 1, below 2^levels, without a branch."""
    return sum(((length >= 2 ** k).long() for k in range(1, levels)), torch.zeros_like(length))


def roi_pool_by_table(data, rois, pooled_h: int, pooled_w: int, spatial_scale: float, layer_name: str):
    """roi_pool's forward for torch.export, whose graph cannot loop over windows of sizes known
    only from the rois: each bin's max from a 2-D sparse table of the map (levels along W,
    then H; O(N C H W log H log W) memory), the max of the four power-of-two windows that
    cover it. A max computes no value, so any order gives roi_pool's bits (but for the sign
    of a zero among equal zeros); NaN never wins, a bin's start is -FLT_MAX, an empty one
    is 0. The batch indices are checked when the program runs."""
    num, channels, height, width = data.shape
    batch = rois[:, 0].to(torch.int64)
    torch._assert_async(((batch >= 0) & (batch < num)).all(),
                        f"layer '{layer_name}' (ROIPooling): a roi's batch index is outside the batch")
    start_w, start_h, end_w, end_h = _round_half_away(rois[:, 1:] * spatial_scale).unbind(1)
    bin_h = (end_h - start_h + 1).clamp(min=1).float() / pooled_h
    bin_w = (end_w - start_w + 1).clamp(min=1).float() / pooled_w
    h0, h1 = _bins(start_h, bin_h, pooled_h, height, True)
    w0, w1 = _bins(start_w, bin_w, pooled_w, width, True)
    values = data.detach().permute(0, 2, 3, 1)
    values = torch.where(torch.isnan(values), -float("inf"), values)
    table = _range_max_table(_range_max_table(values, 2), 2)  # (levels H, levels W, N, H, W, C)
    levels_h, levels_w = table.shape[:2]
    table = table.reshape(-1, channels)
    level_h = _floor_log2((h1 - h0).clamp(min=1), levels_h)
    level_w = _floor_log2((w1 - w0).clamp(min=1), levels_w)
    level = level_h[:, :, None] * levels_w + level_w[:, None, :]
    best = None
    for row in (h0, h1 - 2 ** level_h):  # the windows from each end of the bin
        for column in (w0, w1 - 2 ** level_w):
            at = ((level * num + batch[:, None, None]) * height
                  + row.clamp(0, height - 1)[:, :, None]) * width + column.clamp(0, width - 1)[:, None, :]
            found = table.index_select(0, at.reshape(-1)).view(*at.shape, channels)
            best = found if best is None else torch.maximum(best, found)
    empty = (h1 <= h0)[:, :, None] | (w1 <= w0)[:, None, :]
    best = torch.where(empty[..., None], 0.0, best.clamp_min(-FLT_MAX))
    return best.permute(0, 3, 1, 2).contiguous()


def _psroi_bins(data, rois, group: int, spatial_scale: float) -> tuple:
    """[start, end) of each roi's bins along H and W, (R, group) each, as the kernel computes them."""
    height, width = data.shape[2:]
    corners = _round_half_away(rois[:, 1:]).float()  # static_cast<Dtype>(round(x))
    start_w, start_h = corners[:, 0] * spatial_scale, corners[:, 1] * spatial_scale
    end_w, end_h = (corners[:, 2] + 1) * spatial_scale, (corners[:, 3] + 1) * spatial_scale
    # too small rois are forced to 0.1 (the float nearest 0.1: the kernel's max with
    # a double 0.1 gives the same float)
    tenth = torch.tensor(0.1, dtype=torch.float32, device=data.device)
    bin_h = torch.maximum(end_h - start_h, tenth) / group
    bin_w = torch.maximum(end_w - start_w, tenth) / group
    return _bins(start_h, bin_h, group, height, False) + _bins(start_w, bin_w, group, width, False)


def _psroi_table(data, group: int, dim: int) -> tuple:
    """Rows (n, h, w, ph, pw) of output_dim values: bin (ph, pw) reads channel
    (d * group + ph) * group + pw of each d; and each bin's (ph, pw) offset in them."""
    num, channels, height, width = data.shape
    table = data.reshape(num, dim, group * group, height, width).permute(0, 3, 4, 2, 1).reshape(-1, dim)
    cell = (torch.arange(group, device=data.device)[:, None] * group
            + torch.arange(group, device=data.device)[None, :])
    return table, cell


def _psroi_add(total, table, cell, batch, bins, i, j, height: int, width: int):
    """The kernel's sums with their element at offset (i, j) of each bin added, where the bin reaches it."""
    h0, h1, w0, w1 = bins
    group = cell.shape[0]
    row, column = h0 + i, w0 + j
    inside = (row < h1)[:, :, None] & (column < w1)[:, None, :]
    position = ((batch[:, None, None] * height + row[:, :, None]) * width + column[:, None, :]) \
        * (group * group) + cell
    position = torch.where(inside, position, torch.zeros_like(position))
    return total + torch.where(inside[..., None], table[position], torch.zeros((), dtype=table.dtype,
                                                                               device=table.device))


def _psroi_average(total, bins):
    """(R, dim, group, group): each bin's sum over its area, 0 for an empty bin."""
    h0, h1, w0, w1 = bins
    empty = (h1 <= h0)[:, :, None] | (w1 <= w0)[:, None, :]
    area = ((h1 - h0)[:, :, None] * (w1 - w0)[:, None, :]).to(total.dtype)
    out = torch.where(empty[..., None], torch.zeros_like(total), total / area.clamp(min=1)[..., None])
    return out.permute(0, 3, 1, 2).contiguous()


def psroi_pool(data, rois, batch, group: int, dim: int, spatial_scale: float):
    """PSROIPooling of data (N, dim * group^2, H, W) over rois (R, 5) whose batch indices
    `batch` are checked: (R, dim, group, group)."""
    height, width = data.shape[2:]
    count = rois.shape[0]
    with torch.no_grad():
        bins = _psroi_bins(data, rois, group, spatial_scale)
        h0, h1, w0, w1 = bins
        reach_h = int((h1 - h0).max()) if count else 0
        reach_w = int((w1 - w0).max()) if count else 0
    table, cell = _psroi_table(data, group, dim)
    total = torch.zeros((count, group, group, dim), dtype=data.dtype, device=data.device)
    for i in range(reach_h):  # the kernel's loops: rows, then columns, one float sum
        for j in range(reach_w):
            total = _psroi_add(total, table, cell, batch, bins, i, j, height, width)
    return _psroi_average(total, bins)


def psroi_pool_looped(data, rois, group: int, dim: int, spatial_scale: float, layer_name: str):
    """psroi_pool's forward for torch.export: its loops over the bins' offsets as one
    while_loop whose trip count is taken from the rois when run, so each sum is added in
    the same order, to the same bits. The batch indices are checked when the program runs."""
    from torch._higher_order_ops.while_loop import while_loop  # private, and absent before torch 2.4

    height, width = data.shape[2:]
    batch = rois[:, 0].to(torch.int64)
    torch._assert_async(((batch >= 0) & (batch < data.shape[0])).all(),
                        f"layer '{layer_name}' (PSROIPooling): a roi's batch index is outside the batch")
    bins = _psroi_bins(data, rois, group, spatial_scale)
    h0, h1, w0, w1 = bins
    reach_h, reach_w = (h1 - h0).amax(), (w1 - w0).amax().clamp(min=1)
    table, cell = _psroi_table(data, group, dim)

    def more(step, total):
        return step < reach_h * reach_w

    def add(step, total):
        return step + 1, _psroi_add(total, table, cell, batch, bins, step // reach_w, step % reach_w, height, width)

    total = torch.zeros((rois.shape[0], group, group, dim), dtype=data.dtype, device=data.device)
    _, total = while_loop(more, add, (torch.zeros((), dtype=torch.int64, device=data.device), total))
    return _psroi_average(total, bins)


class ROIPooling(CaffeLayer):
    def __init__(self, settings: ROIPoolingSettings, layer_name: str):
        super().__init__()
        self.settings = settings
        self.layer_name = layer_name

    def forward(self, data, rois):
        s = self.settings
        num, channels = data.shape[:2]
        rois = rois.detach().reshape(rois.shape[0], 5).float()
        if data.device.type == "meta":
            return torch.empty((rois.shape[0], channels, s.pooled_h, s.pooled_w), dtype=data.dtype, device="meta")
        if torch.compiler.is_exporting():
            return roi_pool_by_table(data, rois, s.pooled_h, s.pooled_w, s.spatial_scale, self.layer_name)
        batch = _batch_indices(rois, num, self.layer_name, "ROIPooling")
        return roi_pool(data, rois, batch, s.pooled_h, s.pooled_w, s.spatial_scale)


class PSROIPooling(CaffeLayer):
    def __init__(self, settings: PSROIPoolingSettings, layer_name: str):
        super().__init__()
        self.settings = settings
        self.layer_name = layer_name

    def forward(self, data, rois):
        s = self.settings
        rois = rois.detach().reshape(rois.shape[0], 5).float()
        if data.device.type == "meta":
            return torch.empty((rois.shape[0], s.output_dim, s.group_size, s.group_size), dtype=data.dtype,
                               device="meta")
        if torch.compiler.is_exporting():
            return psroi_pool_looped(data, rois, s.group_size, s.output_dim, s.spatial_scale, self.layer_name)
        batch = _batch_indices(rois, data.shape[0], self.layer_name, "PSROIPooling")
        return psroi_pool(data, rois, batch, s.group_size, s.output_dim, s.spatial_scale)


@register("ROIPooling")
def build_roi_pooling(ctx: LayerContext):
    settings = roi_pooling_settings(ctx)
    return ctx.wire(ROIPooling(settings, ctx.name), top_shapes=[roi_pooling_top(ctx, settings)])


@register("PSROIPooling")
def build_psroi_pooling(ctx: LayerContext):
    settings = psroi_pooling_settings(ctx)
    return ctx.wire(PSROIPooling(settings, ctx.name), top_shapes=[psroi_pooling_top(ctx, settings)])


# ---------------------------------------------------------------- standalone source
# The functions above, written into the file as they are, behind a batch-index check of its own.

ROI_BATCH_SOURCE = """
def roi_batch(data, rois, layer):
    \"\"\"The rois (R, 5) as float32 and their batch indices (the first value truncated), checked.\"\"\"
    rois = rois.detach().reshape(rois.shape[0], 5).float()
    batch = rois[:, 0].to(torch.int64)
    if ((batch < 0) | (batch >= data.shape[0])).any():
        raise ValueError(f"{layer}: a roi's batch index is outside the {data.shape[0]} image(s) of the batch")
    return rois, batch
"""


def _sources(*functions) -> str:
    return "\n\n\n".join(inspect.getsource(fn).strip("\n") for fn in functions)


@register_source("ROIPooling")
def roi_pooling_to_source(src, ctx, module: ROIPooling, inputs, outputs):
    s = module.settings
    src.helper(FLT_MAX_SOURCE)
    src.helper(ROI_BATCH_SOURCE)
    src.helper(_sources(_round_half_away, _bins))
    src.helper(_sources(roi_pool, _roi_backward_reach, _roi_scan))
    src.assign(outputs, f"roi_pool({inputs[0]}, *roi_batch({inputs[0]}, {inputs[1]}, {ctx.name!r}), {s.pooled_h}, "
                        f"{s.pooled_w}, {s.spatial_scale!r})")


@register_source("PSROIPooling")
def psroi_pooling_to_source(src, ctx, module: PSROIPooling, inputs, outputs):
    s = module.settings
    src.helper(ROI_BATCH_SOURCE)
    src.helper(_sources(_round_half_away, _bins))
    src.helper(_sources(_psroi_bins, _psroi_table, _psroi_add, _psroi_average, psroi_pool))
    src.assign(outputs, f"psroi_pool({inputs[0]}, *roi_batch({inputs[0]}, {inputs[1]}, {ctx.name!r}), "
                        f"{s.group_size}, {s.output_dim}, {s.spatial_scale!r})")
