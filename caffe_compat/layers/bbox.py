"""The SSD fork's box arithmetic (src/caffe/util/bbox_util.cpp) on tensors, CPU or CUDA
alike: decoding, Jaccard overlap, the top_k candidates in std::stable_sort's order,
greedy NMS, and libstdc++'s std::sort for the one place the fork sorts unstably.

Each operation follows the fork's float32 arithmetic in its order, so that NMS meets
the same overlaps the fork met (the reference fixtures agree to the bit)."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from . import native

NMS_KERNEL_SOURCE = Path(__file__).with_name("nms_kernel.c")


def _corners(x0, y0, x1, y1):
    return torch.stack([x0, y0, x1, y1], dim=-1)


def decode(prior: torch.Tensor, variance: torch.Tensor, loc: torch.Tensor, code_type: str,
           variance_encoded_in_target: bool) -> torch.Tensor:
    """DecodeBBox: prior and variance (..., 4) against loc (..., 4), broadcast; the boxes
    (..., 4) as (xmin, ymin, xmax, ymax). Never clipped: DetectionOutput passes clip_bbox
    false."""
    p, v = prior, variance
    if code_type == "CORNER":
        return p + loc if variance_encoded_in_target else p + v * loc
    width = p[..., 2] - p[..., 0]
    height = p[..., 3] - p[..., 1]
    if code_type == "CORNER_SIZE":
        extent = torch.stack([width, height, width, height], dim=-1)
        return p + loc * extent if variance_encoded_in_target else p + v * loc * extent
    # CENTER_SIZE
    center_x = (p[..., 0] + p[..., 2]) / 2
    center_y = (p[..., 1] + p[..., 3]) / 2
    scaled = loc if variance_encoded_in_target else v * loc
    box_cx = scaled[..., 0] * width + center_x
    box_cy = scaled[..., 1] * height + center_y
    # exp(float) is float (glibc's expf is correctly rounded, as is a double exp
    # rounded to float, on any device); the product is float
    box_w = torch.exp(scaled[..., 2].double()).float() * width
    box_h = torch.exp(scaled[..., 3].double()).float() * height
    # `center -/+ size / 2.` is computed in double from two floats: exact before its one
    # rounding to float, as in float arithmetic
    return _corners(box_cx - box_w / 2, box_cy - box_h / 2, box_cx + box_w / 2, box_cy + box_h / 2)


def box_size(boxes: torch.Tensor) -> torch.Tensor:
    """BBoxSize (normalized): width * height, 0 for a box whose max is below its min."""
    width = boxes[..., 2] - boxes[..., 0]
    height = boxes[..., 3] - boxes[..., 1]
    inverted = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
    return torch.where(inverted, torch.zeros_like(width), width * height)


def jaccard(a: torch.Tensor, size_a: torch.Tensor, b: torch.Tensor, size_b: torch.Tensor,
            extent: float = 0.0) -> torch.Tensor:
    """JaccardOverlap of broadcast boxes a and b with their sizes; 0 where they do not meet.
    `extent` 1 counts the last pixel in, as py-faster-rcnn's boxes do (its NMS's
    `right - left + 1`)."""
    # in place after the first operation of each value: the same arithmetic, with fewer
    # buffers of the broadcast size (NMS's overlaps are most of DetectionOutput's time)
    inter_w = torch.minimum(a[..., 2], b[..., 2]).sub_(torch.maximum(a[..., 0], b[..., 0]))
    inter_h = torch.minimum(a[..., 3], b[..., 3]).sub_(torch.maximum(a[..., 1], b[..., 1]))
    if extent:
        inter_w += extent
        inter_h += extent
    meet = (inter_w > 0).logical_and_(inter_h > 0)  # false for NaN too
    inter = inter_w.mul_(inter_h)
    return inter.div_((size_a + size_b).sub_(inter)).masked_fill_(meet.logical_not_(), 0.0)


def stable_top(scores: torch.Tensor, count: int):
    """The first `count` of a stable sort by descending score along the last axis (equal
    scores in index order, as std::stable_sort leaves them): (scores, indices). One topk
    over keys unique per element, the score's float bits as an order-keeping integer and
    then the index reversed, in place of a sort of every element: the order is the same,
    ties included, and topk on CPU or CUDA selects before it sorts."""
    length = scores.shape[-1]
    bits = (scores + 0.0).view(torch.int32)  # + 0.0: -0 as +0, which compare equal
    # negative floats' bits count up as the value goes down: flip all but the sign bit
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    reversed_index = torch.arange(length - 1, -1, -1, device=scores.device)
    index = torch.topk(ordered * length + reversed_index, count, dim=-1, sorted=True).indices
    return torch.gather(scores, -1, index), index


# The overlaps computed at once for a block of candidates: at most this many values.
OVERLAP_BLOCK_VALUES = 1 << 24


def greedy_nms(boxes: torch.Tensor, sizes: torch.Tensor, valid: torch.Tensor, threshold: float,
               eta: float) -> torch.Tensor:
    """ApplyNMSFast on many lists at once: boxes (B, K, 4), sizes and valid (B, K), each
    list sorted as the fork sorts its candidates. A candidate is kept when its overlap
    with every box kept before it is <= the threshold, which then shrinks by eta
    while above 0.5 (adaptive NMS). The kept mask (B, K); no value leaves the device.
    On the CPU with eta 1, nms_kernel.c decides, as the PyTorch form would to the bit;
    under torch.export the PyTorch form is traced (see _greedy_nms_scanned)."""
    count, length = valid.shape
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
    fixed_on_cpu = (eta >= 1 and boxes.device.type == "cpu" and boxes.dtype == sizes.dtype == torch.float32
                    and not exporting)
    if fixed_on_cpu and _nms_kernel() is not None:
        return _greedy_nms_kernel(boxes, sizes, valid, threshold)
    # each corner's values side by side in memory, so that the overlaps' elementwise
    # operations read unit strides (a box's four corners would be 4 apart)
    boxes = boxes.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    if fixed_on_cpu and count * length * length <= OVERLAP_BLOCK_VALUES:
        return _greedy_nms_cpu(boxes, sizes, valid, threshold)
    limit = torch.full((count,), threshold, dtype=torch.float32, device=boxes.device)
    if exporting and _scan() is not None:
        return _greedy_nms_scanned(boxes, sizes, valid, limit, eta)
    kept = torch.zeros_like(valid)
    # B is the dynamic batch times the labels under torch.export: a block size computed from it would fix it
    block = length if exporting else max(1, min(64, OVERLAP_BLOCK_VALUES // max(1, count * length)))
    for start in range(0, length, block):
        stop = min(length, start + block)
        overlaps = jaccard(boxes[:, start:stop, None, :], sizes[:, start:stop, None],
                           boxes[:, None, :stop, :], sizes[:, None, :stop])
        rows = _clashes(overlaps, limit[:, None, None]) if eta >= 1 else overlaps
        for k in range(start, stop):
            keep, limit = _decide(kept if stop == length else kept[:, :stop], rows[:, k - start], valid[:, k],
                                  limit, eta)
            kept[:, k] = keep
    return kept


def _clashes(overlaps: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    # `overlap <= limit` is false for NaN overlaps too, as in the fork
    return ~(overlaps <= limit)


def _decide(kept, row, valid, limit, eta: float):
    """greedy_nms's decision on one candidate of every list: (kept or not, the limit after
    it). `kept` (B, J) the decisions so far, false from this candidate on; `row` (B, J) its
    clashes with those candidates where the limit is fixed (eta 1), else its overlaps."""
    clashes = row if eta >= 1 else _clashes(row, limit[:, None])
    keep = valid & ~(kept & clashes).any(dim=1)
    if eta < 1:
        limit = torch.where(keep & (limit > 0.5), limit * eta, limit)
    return keep, limit


def _scan():
    """torch's scan operator, which torch.export holds as one traced step (torch 2.6 on), or None."""
    try:
        from torch._higher_order_ops.scan import scan  # noqa: PLC0415
    except ImportError:
        return None
    return scan


def _greedy_nms_scanned(boxes, sizes, valid, limit, eta: float) -> torch.Tensor:
    """greedy_nms for torch.export: the decision traced once and scanned over the candidates,
    where the loop above, unrolled, grows the graph and the export time with their count
    (400 candidates: 100 s to export)."""
    overlaps = jaccard(boxes[:, :, None, :], sizes[:, :, None], boxes[:, None, :, :], sizes[:, None, :])
    return scanned_decisions(_clashes(overlaps, limit[:, None, None]) if eta >= 1 else overlaps, valid, limit, eta)


def scanned_decisions(rows, valid, limit, eta: float = 1.0) -> torch.Tensor:
    """_decide scanned over the candidates of B lists at once, for torch.export: `rows` (B, K, K)
    each candidate's clashes with every candidate (eta 1), else its overlaps; valid (B, K); the
    limits (B,). The kept mask (B, K). Also py-faster-rcnn's proposal layer's, on its own clashes."""
    length = valid.shape[1]

    def step(carry, candidate):
        kept, limit = carry
        row, valid_k, slot = candidate
        keep, after = _decide(kept, row, valid_k, limit, eta)
        # a step may not return an input as it is: a fixed limit goes on as a copy
        return (kept | (keep[:, None] & slot), after if after is not limit else limit.clone()), keep

    slots = torch.eye(length, dtype=torch.bool, device=valid.device)  # candidate k's column
    (kept, _), _ = _scan()(step, (torch.zeros_like(valid), limit), (rows.transpose(0, 1), valid.t(), slots))
    return kept


@functools.cache
def _nms_kernel():
    """nms_kernel.c's library with its argument types set, or None (see native.py)."""
    lib = native.library(NMS_KERNEL_SOURCE)
    if lib is not None:
        lib.nms_greedy.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_void_p]
        lib.nms_greedy.restype = ctypes.c_int
    return lib


def _greedy_nms_kernel(boxes, sizes, valid, threshold: float) -> torch.Tensor:
    """greedy_nms with a fixed threshold on the CPU in C: each candidate's overlaps with
    the boxes kept before it only, the same float operations as `jaccard`."""
    boxes, sizes, valid = boxes.contiguous(), sizes.contiguous(), valid.contiguous()
    kept = torch.empty_like(valid)
    # c_float rounds the threshold to float32 as torch.tensor(threshold, float32) does
    if _nms_kernel().nms_greedy(boxes.data_ptr(), sizes.data_ptr(), valid.data_ptr(), *valid.shape, threshold,
                                kept.data_ptr()):
        raise MemoryError(f"greedy NMS: the C kernel could not allocate its columns ({valid.shape[1]} boxes)")
    return kept


def _greedy_nms_cpu(boxes, sizes, valid, threshold: float) -> torch.Tensor:
    """greedy_nms with a fixed threshold on the CPU where nms_kernel.c cannot be built:
    every overlap at once in torch, as above, then the candidate-by-candidate decisions
    in NumPy, whose small operations cost microseconds where torch's cost tens."""
    import numpy as np  # noqa: PLC0415

    overlaps = jaccard(boxes[:, :, None, :], sizes[:, :, None], boxes[:, None, :, :], sizes[:, None, :])
    # `overlap <= limit` is false for NaN overlaps too, as in the fork
    clashes = (~(overlaps <= torch.tensor(threshold, dtype=torch.float32))).numpy()
    allowed = valid.numpy()
    kept = np.zeros_like(allowed)
    for k in range(allowed.shape[1]):
        kept[:, k] = allowed[:, k] & ~(kept[:, :k] & clashes[:, k, :k]).any(axis=1)
    return torch.from_numpy(kept)


def libstdcxx_sort(items: list, before) -> None:
    """std::sort as GCC's libstdc++ (4.9 on) implements it, in place, `before(a, b)` its
    comparison: introsort with a median-of-three pivot, heapsort past 2 log2(n) levels, a
    final insertion sort. Its order among equal items is what Caffe's unstable sorts produced."""
    n = len(items)
    if n > 1:
        _introsort_loop(items, 0, n, 2 * (n.bit_length() - 1), before)
        _final_insertion_sort(items, 0, n, before)


_THRESHOLD = 16


def _introsort_loop(a, first, last, depth, before):
    while last - first > _THRESHOLD:
        if depth == 0:
            _make_heap(a, first, last, before)
            _sort_heap(a, first, last, before)
            return
        depth -= 1
        mid = first + (last - first) // 2
        _move_median_to_first(a, first, first + 1, mid, last - 1, before)
        cut = _unguarded_partition(a, first + 1, last, first, before)
        _introsort_loop(a, cut, last, depth, before)
        last = cut


def _move_median_to_first(a, result, x, y, z, before):
    if before(a[x], a[y]):
        if before(a[y], a[z]):
            pick = y
        elif before(a[x], a[z]):
            pick = z
        else:
            pick = x
    elif before(a[x], a[z]):
        pick = x
    elif before(a[y], a[z]):
        pick = z
    else:
        pick = y
    a[result], a[pick] = a[pick], a[result]


def _unguarded_partition(a, first, last, pivot, before):
    while True:
        while before(a[first], a[pivot]):
            first += 1
        last -= 1
        while before(a[pivot], a[last]):
            last -= 1
        if not first < last:
            return first
        a[first], a[last] = a[last], a[first]
        first += 1


def _final_insertion_sort(a, first, last, before):
    if last - first > _THRESHOLD:
        _insertion_sort(a, first, first + _THRESHOLD, before)
        for i in range(first + _THRESHOLD, last):
            _unguarded_linear_insert(a, i, before)
    else:
        _insertion_sort(a, first, last, before)


def _insertion_sort(a, first, last, before):
    for i in range(first + 1, last):
        if before(a[i], a[first]):
            a[first:i + 1] = [a[i]] + a[first:i]
        else:
            _unguarded_linear_insert(a, i, before)


def _unguarded_linear_insert(a, last, before):
    value = a[last]
    while before(value, a[last - 1]):
        a[last] = a[last - 1]
        last -= 1
    a[last] = value


def _adjust_heap(a, first, hole, length, value, before):
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if before(a[first + child], a[first + child - 1]):
            child -= 1
        a[first + hole] = a[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        a[first + hole] = a[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and before(a[first + parent], value):
        a[first + hole] = a[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    a[first + hole] = value


def _make_heap(a, first, last, before):
    length = last - first
    for parent in range((length - 2) // 2, -1, -1):
        _adjust_heap(a, first, parent, length, a[first + parent], before)


def _sort_heap(a, first, last, before):
    while last - first > 1:
        last -= 1
        value = a[last]
        a[last] = a[first]
        _adjust_heap(a, first, 0, last - first, value, before)
