"""The standard losses and Accuracy.

Each returns its raw loss as a 0-d tensor (the net applies loss_weight). Label bottoms
get no gradient, as in Caffe. Where Caffe's backward is not the exact derivative of its
forward (a clamp its backward ignores, an epsilon only its backward has), the loss keeps
Caffe's value and takes Caffe's gradient from a surrogate (`_with_gradient`).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..io.files import read_binaryproto
from .registry import CaffeLayer, LayerContext, register, register_source
from .softmax import canonical_softmax_axis

FLT_MIN = 1.17549435e-38  # Caffe clamps softmax probabilities here before the log
LOG_THRESHOLD = 1e-20  # Caffe's kLOG_THRESHOLD
_NORMALIZATIONS = {0: "FULL", 1: "VALID", 2: "BATCH_SIZE", 3: "NONE"}  # LossParameter.NormalizationMode


def _with_gradient(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass, differentiated as `surrogate`."""
    return value.detach() + (surrogate - surrogate.detach())


def _legacy_shape(ctx: LayerContext, index: int) -> Tuple[int, int, int, int]:
    """Caffe's num/channels/height/width view of a bottom (missing axes are 1)."""
    shape = tuple(ctx.bottom_shapes[index])
    if len(shape) > 4:
        raise ctx.error(f"bottom '{ctx.bottoms[index]}' must have at most 4 axes, got shape {shape}")
    return shape + (1,) * (4 - len(shape))


def _check_same_num(ctx: LayerContext) -> None:
    a, b = ctx.bottom_shapes[0], ctx.bottom_shapes[1]
    if not a or not b or a[0] != b[0]:
        raise ctx.error(f"bottoms '{ctx.bottoms[0]}' {a} and '{ctx.bottoms[1]}' {b} must have the same "
                        f"first dimension")


def _normalization(ctx: LayerContext, default: str) -> str:
    p = ctx.param.loss_param
    if p.HasField("normalization"):
        return _NORMALIZATIONS[p.normalization]
    if p.HasField("normalize"):  # the legacy flag
        return "VALID" if p.normalize else "BATCH_SIZE"
    return default


def _ignore_label(param) -> Optional[int]:
    return param.ignore_label if param.HasField("ignore_label") else None


def _normalize(total: torch.Tensor, mode: str, valid: Optional[torch.Tensor], labels: torch.Tensor):
    """Caffe's get_normalizer: divide by the valid count (VALID), the label count (FULL,
    and VALID without an ignore label), the outer count (BATCH_SIZE) or nothing, never
    by less than 1. `labels` has the outer count as its first axis."""
    if mode == "NONE":
        return total
    if mode == "VALID" and valid is not None:
        return total / valid.sum().clamp_min(1).to(total.dtype)
    if mode == "BATCH_SIZE":
        return total / labels.shape[0]
    return total / labels.numel()


def _labels_and_valid(label: torch.Tensor, inner: int, ignore_label: Optional[int]):
    """(labels as (outer, inner) integers, the mask of those not ignored or None, the
    labels with the ignored ones at class 0 so that they can index)."""
    labels = label.detach().reshape(-1, inner).long()  # Caffe truncates float labels
    valid = None if ignore_label is None else labels != ignore_label
    index = labels if valid is None else torch.where(valid, labels, torch.zeros_like(labels))
    return labels, valid, index


def _normalized_sum(per_label: torch.Tensor, mode: str, valid: Optional[torch.Tensor], labels: torch.Tensor):
    if valid is not None:
        per_label = torch.where(valid, per_label, torch.zeros_like(per_label))
    return _normalize(per_label.sum(), mode, valid, labels)


def _check_one_or_two_tops(ctx: LayerContext, what: str) -> None:
    if len(ctx.tops) not in (1, 2):
        raise ctx.error(f"has one or two tops ({what}), got {len(ctx.tops)}")


def _inner_count(ctx: LayerContext, shape, axis: int) -> int:
    """The count after `axis` of the predictions, checked against the labels: one label
    per (outer, inner) position."""
    outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    labels = math.prod(ctx.bottom_shapes[1])
    if outer * inner != labels:
        raise ctx.error(f"bottom '{ctx.bottoms[1]}' holds {labels} labels, the predictions {shape} along "
                        f"axis {axis} need {outer * inner}")
    return inner


# ---------------------------------------------------------------- SoftmaxWithLoss

class _SoftmaxOfClasses(CaffeLayer):
    """What SoftmaxWithLoss and InfogainLoss share: a softmax over `classes` along `axis`,
    one label per (outer, inner) position, and an optional second top of probabilities."""

    def __init__(self, axis: int, classes: int, inner: int, ignore_label: Optional[int], normalization: str,
                 with_prob: bool):
        super().__init__()
        self.axis = axis
        self.classes = classes
        self.inner = inner
        self.ignore_label = ignore_label
        self.normalization = normalization
        self.with_prob = with_prob


class SoftmaxWithLoss(_SoftmaxOfClasses):
    """-log(max(softmax(x)[label], FLT_MIN)) summed over the labels, normalised. The
    label at (outer i, inner j) picks a class along `axis`. A second top gets the
    probabilities (Caffe's backward ignores its diff)."""

    def forward(self, scores, label):
        prob = torch.softmax(scores, self.axis)
        labels, valid, index = _labels_and_valid(label, self.inner, self.ignore_label)
        index = index.unsqueeze(1)
        picked = prob.reshape(-1, self.classes, self.inner).gather(1, index).squeeze(1)
        log_prob = torch.log_softmax(scores, self.axis).reshape(-1, self.classes, self.inner)
        # Caffe's gradient is prob - onehot even where the clamp bites.
        nll = _with_gradient(-torch.log(picked.clamp_min(FLT_MIN)), -log_prob.gather(1, index).squeeze(1))
        loss = _normalized_sum(nll, self.normalization, valid, labels)
        return (loss, prob.detach()) if self.with_prob else loss


@register("SoftmaxWithLoss")
def build_softmax_with_loss(ctx: LayerContext):
    ctx.expect_bottoms(2)
    _check_one_or_two_tops(ctx, "loss, probabilities")
    _check_same_num(ctx)
    shape = ctx.bottom_shapes[0]
    axis = canonical_softmax_axis(ctx)
    inner = _inner_count(ctx, shape, axis)
    module = SoftmaxWithLoss(axis, shape[axis], inner, _ignore_label(ctx.param.loss_param),
                             _normalization(ctx, "VALID"), len(ctx.tops) == 2)
    return ctx.wire(module, top_shapes=[()] + [shape] * (len(ctx.tops) - 1))


# ---------------------------------------------------------------- Accuracy

class Accuracy(CaffeLayer):
    """The fraction of labels whose score is among the top_k along `axis` (ties count
    against: a class scoring >= the true one ranks above it). A second top gets the
    accuracy per class (0 for classes without labels). No gradient."""

    def __init__(self, classes: int, inner: int, top_k: int, ignore_label: Optional[int], per_class: bool):
        super().__init__()
        self.classes = classes
        self.inner = inner
        self.top_k = top_k
        self.ignore_label = ignore_label
        self.per_class = per_class

    def forward(self, scores, label):
        scores = scores.detach().reshape(-1, self.classes, self.inner)
        labels = label.detach().reshape(-1, self.inner).long()
        valid = torch.ones_like(labels, dtype=torch.bool) if self.ignore_label is None \
            else labels != self.ignore_label
        index = torch.where(valid, labels, torch.zeros_like(labels))
        true_score = scores.gather(1, index.unsqueeze(1))
        at_least_as_good = (scores >= true_score).sum(1)  # counts the true class itself
        correct = valid & (at_least_as_good <= self.top_k)
        dtype = scores.dtype
        accuracy = correct.sum().to(dtype) / valid.sum().clamp_min(1).to(dtype)
        if not self.per_class:
            return accuracy
        is_class = (index.unsqueeze(-1) == torch.arange(self.classes, device=labels.device)) & valid.unsqueeze(-1)
        per_class_count = is_class.sum((0, 1)).to(dtype)
        per_class_correct = (is_class & correct.unsqueeze(-1)).sum((0, 1)).to(dtype)
        return accuracy, per_class_correct / per_class_count.clamp_min(1)


@register("Accuracy")
def build_accuracy(ctx: LayerContext):
    ctx.expect_bottoms(2)
    _check_one_or_two_tops(ctx, "accuracy, per-class accuracy")
    p = ctx.param.accuracy_param
    shape = ctx.bottom_shapes[0]
    rank = len(shape)
    if not -rank <= p.axis < rank:
        raise ctx.error(f"axis {p.axis} is out of range for bottom '{ctx.bottoms[0]}' of rank {rank}")
    axis = p.axis % rank
    inner = _inner_count(ctx, shape, axis)
    if p.top_k > shape[axis]:
        raise ctx.error(f"top_k {p.top_k} exceeds the number of classes {shape[axis]}")
    module = Accuracy(shape[axis], inner, p.top_k, _ignore_label(p), len(ctx.tops) == 2)
    return ctx.wire(module, top_shapes=[()] + [(shape[axis],)] * (len(ctx.tops) - 1))


# ---------------------------------------------------------------- EuclideanLoss

class EuclideanLoss(CaffeLayer):
    """sum((a - b)^2) / (2 num); both bottoms get gradients."""

    def forward(self, a, b):
        diff = a - b.reshape(a.shape)
        return (diff * diff).sum() / a.shape[0] / 2


@register("EuclideanLoss")
def build_euclidean_loss(ctx: LayerContext):
    ctx.expect_bottoms(2)
    _check_same_num(ctx)
    a, b = ctx.bottom_shapes
    if math.prod(a[1:]) != math.prod(b[1:]):
        raise ctx.error(f"bottoms '{ctx.bottoms[0]}' {a} and '{ctx.bottoms[1]}' {b} must have the same "
                        f"size per sample")
    return ctx.wire(EuclideanLoss(), top_shapes=[()])


# ---------------------------------------------------------------- ContrastiveLoss

class ContrastiveLoss(CaffeLayer):
    """Over pairs (a_i, b_i) with d_i = ||a_i - b_i||: d^2 for similar pairs (label
    != 0 after truncation), max(margin - d, 0)^2 for dissimilar ones (legacy:
    max(margin - d^2, 0)), summed and divided by 2 num."""

    def __init__(self, channels: int, margin: float, legacy_version: bool):
        super().__init__()
        self.channels = channels
        self.margin = margin
        self.legacy_version = legacy_version

    def forward(self, a, b, similar):
        diff = a.reshape(-1, self.channels) - b.reshape(-1, self.channels)
        dist_sq = (diff * diff).sum(1)
        is_similar = similar.detach().reshape(-1).long() != 0
        if self.legacy_version:
            dissimilar = torch.relu(self.margin - dist_sq)
        else:
            dist = torch.sqrt(dist_sq.detach())
            shortfall = torch.relu(self.margin - dist)
            # Caffe's backward divides by d + 1e-4 where the derivative has d.
            weight = shortfall / (dist + 1e-4)
            dissimilar = _with_gradient(shortfall * shortfall, -weight * dist_sq)
        per_pair = torch.where(is_similar, dist_sq, dissimilar)
        return per_pair.sum() / diff.shape[0] / 2


@register("ContrastiveLoss")
def build_contrastive_loss(ctx: LayerContext):
    ctx.expect_bottoms(3)
    _check_same_num(ctx)
    a, b, similar = (_legacy_shape(ctx, i) for i in range(3))
    if a[1] != b[1] or a[2:] != (1, 1) or b[2:] != (1, 1) or similar[1:] != (1, 1, 1):
        raise ctx.error(f"needs bottoms (num, channels, 1, 1) twice and (num, 1, 1, 1), got "
                        f"{[tuple(s) for s in ctx.bottom_shapes]}")
    p = ctx.param.contrastive_loss_param
    return ctx.wire(ContrastiveLoss(a[1], p.margin, p.legacy_version), top_shapes=[()])


# ---------------------------------------------------------------- SigmoidCrossEntropyLoss

class SigmoidCrossEntropyLoss(CaffeLayer):
    """Cross-entropy of sigmoid(x) against targets in [0, 1], in Caffe's overflow-free
    form; targets equal to ignore_label (after truncation) are skipped."""

    def __init__(self, ignore_label: Optional[int], normalization: str):
        super().__init__()
        self.ignore_label = ignore_label
        self.normalization = normalization

    def forward(self, x, target):
        target = target.detach().reshape(x.shape)
        positive = (x >= 0).to(x.dtype)
        per_element = torch.log(1 + torch.exp(x - 2 * x * positive)) - x * (target - positive)
        valid = None if self.ignore_label is None else target.long() != self.ignore_label
        if valid is not None:
            per_element = torch.where(valid, per_element, torch.zeros_like(per_element))
        # Caffe's outer count is the batch axis, its label count all elements.
        return _normalize(per_element.sum(), self.normalization, valid, target)


@register("SigmoidCrossEntropyLoss")
def build_sigmoid_cross_entropy_loss(ctx: LayerContext):
    ctx.expect_bottoms(2)
    _check_same_num(ctx)
    if math.prod(ctx.bottom_shapes[0]) != math.prod(ctx.bottom_shapes[1]):
        raise ctx.error(f"bottoms '{ctx.bottoms[0]}' {ctx.bottom_shapes[0]} and '{ctx.bottoms[1]}' "
                        f"{ctx.bottom_shapes[1]} must have the same count")
    # Unlike SoftmaxWithLoss, Caffe defaults to BATCH_SIZE here.
    module = SigmoidCrossEntropyLoss(_ignore_label(ctx.param.loss_param), _normalization(ctx, "BATCH_SIZE"))
    return ctx.wire(module, top_shapes=[()])


# ---------------------------------------------------------------- HingeLoss

class HingeLoss(CaffeLayer):
    """One-vs-all hinge: max(0, 1 - x) for the true class, max(0, 1 + x) for the others,
    summed (L1) or squared and summed (L2), divided by num."""

    def __init__(self, dim: int, squared: bool):
        super().__init__()
        self.dim = dim
        self.squared = squared

    def forward(self, x, label):
        x = x.reshape(-1, self.dim)
        labels = label.detach().reshape(-1, 1).long()
        is_true = labels == torch.arange(self.dim, device=labels.device)
        margins = torch.relu(1 + torch.where(is_true, -x, x))
        total = (margins * margins).sum() if self.squared else margins.sum()
        return total / x.shape[0]


@register("HingeLoss")
def build_hinge_loss(ctx: LayerContext):
    ctx.expect_bottoms(2)
    _check_same_num(ctx)
    shape = ctx.bottom_shapes[0]
    if math.prod(ctx.bottom_shapes[1]) != shape[0]:
        raise ctx.error(f"bottom '{ctx.bottoms[1]}' {ctx.bottom_shapes[1]} must hold one label per sample")
    norm = ctx.param.hinge_loss_param.norm
    if norm not in (1, 2):  # HingeLossParameter.Norm L1, L2
        raise ctx.error(f"unknown norm {norm}")
    return ctx.wire(HingeLoss(math.prod(shape[1:]), norm == 2), top_shapes=[()])


# ---------------------------------------------------------------- MultinomialLogisticLoss

class MultinomialLogisticLoss(CaffeLayer):
    """-log(max(p[label], 1e-20)) averaged over num, for probabilities p. Caffe's
    gradient -1 / (num max(p, 1e-20)) holds where the clamp bites too."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, prob, label):
        prob = prob.reshape(-1, self.dim)
        labels = label.detach().reshape(-1, 1).long()
        picked = prob.gather(1, labels).squeeze(1)
        clamped = picked.clamp_min(LOG_THRESHOLD)
        nll = _with_gradient(-torch.log(clamped), -picked / clamped.detach())
        return nll.sum() / prob.shape[0]


@register("MultinomialLogisticLoss")
def build_multinomial_logistic_loss(ctx: LayerContext):
    ctx.expect_bottoms(2)
    _check_same_num(ctx)
    if _legacy_shape(ctx, 1)[1:] != (1, 1, 1):
        raise ctx.error(f"bottom '{ctx.bottoms[1]}' must have shape (num, 1, 1, 1), got {ctx.bottom_shapes[1]}")
    return ctx.wire(MultinomialLogisticLoss(math.prod(ctx.bottom_shapes[0][1:])), top_shapes=[()])


# ---------------------------------------------------------------- InfogainLoss

class InfogainLoss(_SoftmaxOfClasses):
    """-sum_l H[label, l] log(max(softmax(x)_l, 1e-20)) over the labels, normalised as
    SoftmaxWithLoss. H (classes x classes) is the third bottom, or the `source` file's
    blob held here. A second top gets the probabilities (Caffe's backward ignores its
    diff); H gets no gradient. Caffe's gradient, p rowsum(H)[label] - H[label], ignores
    the clamp."""

    def __init__(self, axis: int, classes: int, inner: int, ignore_label: Optional[int], normalization: str,
                 with_prob: bool, infogain: Optional[torch.Tensor]):
        super().__init__(axis, classes, inner, ignore_label, normalization, with_prob)
        self.register_buffer("infogain", infogain, persistent=False)

    def forward(self, scores, label, infogain=None):
        weights = (self.infogain if infogain is None else infogain).detach()
        weights = weights.reshape(self.classes, self.classes).to(scores.dtype)
        prob = torch.softmax(scores, self.axis)
        labels, valid, index = _labels_and_valid(label, self.inner, self.ignore_label)
        rows = weights[index].transpose(1, 2)  # (outer, classes, inner): H[label, l]
        log_prob = torch.log_softmax(scores, self.axis).reshape(-1, self.classes, self.inner)
        clamped = torch.log(prob.reshape(-1, self.classes, self.inner).clamp_min(LOG_THRESHOLD))
        per_label = _with_gradient(-(rows * clamped).sum(1), -(rows * log_prob).sum(1))
        loss = _normalized_sum(per_label, self.normalization, valid, labels)
        return (loss, prob.detach()) if self.with_prob else loss


@register("InfogainLoss")
def build_infogain_loss(ctx: LayerContext):
    ctx.expect_bottoms(2, 3)
    _check_one_or_two_tops(ctx, "loss, probabilities")
    _check_same_num(ctx)
    if ctx.param.loss_param.HasField("normalize"):
        raise ctx.error("loss_param.normalize is deprecated here; use normalization")
    shape = ctx.bottom_shapes[0]
    axis = ctx.canonical_axis(ctx.param.infogain_loss_param.axis, len(shape))
    classes = shape[axis]
    inner = _inner_count(ctx, shape, axis)
    infogain = None
    if len(ctx.bottoms) == 3:
        count = math.prod(ctx.bottom_shapes[2])
    else:
        source = ctx.param.infogain_loss_param.source
        if not source:
            raise ctx.error("needs the infogain matrix: a third bottom or infogain_loss_param.source")
        infogain = torch.from_numpy(read_binaryproto(source).astype("float32").reshape(-1))
        count = infogain.numel()
    if count != classes * classes:
        raise ctx.error(f"the infogain matrix holds {count} values, {classes} classes need {classes * classes}")
    module = InfogainLoss(axis, classes, inner, _ignore_label(ctx.param.loss_param),
                          _normalization(ctx, "VALID"), len(ctx.tops) == 2, infogain)
    return ctx.wire(module, top_shapes=[()] + [shape] * (len(ctx.tops) - 1))


# ---------------------------------------------------------------- standalone source

FLT_MIN_SOURCE = f"FLT_MIN = {FLT_MIN!r}  # Caffe clamps softmax probabilities here before the log"

SOFTMAX_LOSS_SOURCE = '''
def softmax_with_loss(scores, label, axis, classes, inner, ignore_label, normalization):
    """Caffe's SoftmaxWithLoss: -log(max(softmax(scores)[label], FLT_MIN)) summed over the labels
    (one per position before and after `axis`; those equal to ignore_label left out), divided by
    the valid count (VALID), the label count (FULL), the outer count (BATCH_SIZE) or nothing
    (NONE), never by less than 1. Its gradient is prob - onehot, even where the clamp bites.
    Returns the loss and the probabilities."""
    prob = torch.softmax(scores, axis)
    labels = label.detach().reshape(-1, inner).long()  # Caffe truncates float labels
    valid = None if ignore_label is None else labels != ignore_label
    index = (labels if valid is None else torch.where(valid, labels, torch.zeros_like(labels))).unsqueeze(1)
    picked = prob.reshape(-1, classes, inner).gather(1, index).squeeze(1)
    surrogate = -torch.log_softmax(scores, axis).reshape(-1, classes, inner).gather(1, index).squeeze(1)
    nll = (-torch.log(picked.clamp_min(FLT_MIN))).detach() + (surrogate - surrogate.detach())
    if valid is not None:
        nll = torch.where(valid, nll, torch.zeros_like(nll))
    total = nll.sum()
    if normalization == "VALID" and valid is not None:
        total = total / valid.sum().clamp_min(1).to(total.dtype)
    elif normalization == "BATCH_SIZE":
        total = total / labels.shape[0]
    elif normalization != "NONE":
        total = total / labels.numel()
    return total, prob.detach()
'''

ACCURACY_SOURCE = '''
def accuracy(scores, label, classes, inner, top_k, ignore_label):
    """Caffe's Accuracy: the fraction of labels whose score is among the top_k of its position
    (ties count against), labels equal to ignore_label left out; and the accuracy per class."""
    scores = scores.detach().reshape(-1, classes, inner)
    labels = label.detach().reshape(-1, inner).long()
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_label is None else labels != ignore_label
    index = torch.where(valid, labels, torch.zeros_like(labels))
    correct = valid & ((scores >= scores.gather(1, index.unsqueeze(1))).sum(1) <= top_k)
    dtype = scores.dtype
    overall = correct.sum().to(dtype) / valid.sum().clamp_min(1).to(dtype)
    is_class = (index.unsqueeze(-1) == torch.arange(classes, device=labels.device)) & valid.unsqueeze(-1)
    per_class_correct = (is_class & correct.unsqueeze(-1)).sum((0, 1)).to(dtype)
    return overall, per_class_correct / is_class.sum((0, 1)).to(dtype).clamp_min(1)
'''

EUCLIDEAN_SOURCE = '''
def euclidean_loss(a, b):
    """Caffe's EuclideanLoss: sum((a - b)^2) / (2 num)."""
    diff = a - b.reshape(a.shape)
    return (diff * diff).sum() / a.shape[0] / 2
'''

CONTRASTIVE_SOURCE = '''
def contrastive_loss(a, b, similar, channels, margin, legacy_version):
    """Caffe's ContrastiveLoss over pairs (a_i, b_i), d_i = |a_i - b_i|: d^2 for similar pairs
    (label != 0), max(margin - d, 0)^2 for the others (legacy: max(margin - d^2, 0)), summed and
    divided by 2 num. Caffe's backward divides by d + 1e-4 where the derivative has d."""
    diff = a.reshape(-1, channels) - b.reshape(-1, channels)
    dist_sq = (diff * diff).sum(1)
    is_similar = similar.detach().reshape(-1).long() != 0
    if legacy_version:
        dissimilar = torch.relu(margin - dist_sq)
    else:
        dist = torch.sqrt(dist_sq.detach())
        shortfall = torch.relu(margin - dist)
        surrogate = -(shortfall / (dist + 1e-4)) * dist_sq
        dissimilar = (shortfall * shortfall).detach() + (surrogate - surrogate.detach())
    return torch.where(is_similar, dist_sq, dissimilar).sum() / diff.shape[0] / 2
'''


@register_source("SoftmaxWithLoss")
def softmax_loss_to_source(src, ctx, module: SoftmaxWithLoss, inputs, outputs):
    src.helper(FLT_MIN_SOURCE)
    src.helper(SOFTMAX_LOSS_SOURCE)
    call = (f"softmax_with_loss({', '.join(inputs)}, {module.axis}, {module.classes}, {module.inner}, "
            f"{module.ignore_label!r}, {module.normalization!r})")
    src.assign(outputs, call if len(outputs) == 2 else f"{call}[0]")


@register_source("Accuracy")
def accuracy_to_source(src, ctx, module: Accuracy, inputs, outputs):
    src.helper(ACCURACY_SOURCE)
    call = (f"accuracy({', '.join(inputs)}, {module.classes}, {module.inner}, {module.top_k}, "
            f"{module.ignore_label!r})")
    src.assign(outputs, call if module.per_class else f"{call}[0]")


@register_source("EuclideanLoss")
def euclidean_loss_to_source(src, ctx, module: EuclideanLoss, inputs, outputs):
    src.helper(EUCLIDEAN_SOURCE)
    src.assign(outputs, f"euclidean_loss({', '.join(inputs)})")


@register_source("ContrastiveLoss")
def contrastive_loss_to_source(src, ctx, module: ContrastiveLoss, inputs, outputs):
    src.helper(CONTRASTIVE_SOURCE)
    src.assign(outputs, f"contrastive_loss({', '.join(inputs)}, {module.channels}, {module.margin!r}, "
                        f"{module.legacy_version!r})")


LOG_THRESHOLD_SOURCE = f"LOG_THRESHOLD = {LOG_THRESHOLD!r}  # Caffe's kLOG_THRESHOLD: probabilities clamped here"

NORMALIZED_SOURCE = '''
def normalized(total, normalization, valid, labels):
    """Caffe's get_normalizer: total divided by the valid count (VALID with an ignore label), the
    outer count (BATCH_SIZE: labels' first axis), nothing (NONE) or the label count, never by less than 1."""
    if normalization == "NONE":
        return total
    if normalization == "VALID" and valid is not None:
        return total / valid.sum().clamp_min(1).to(total.dtype)
    if normalization == "BATCH_SIZE":
        return total / labels.shape[0]
    return total / labels.numel()
'''

SIGMOID_CROSS_ENTROPY_SOURCE = '''
def sigmoid_cross_entropy_loss(x, target, ignore_label, normalization):
    """Caffe's SigmoidCrossEntropyLoss: the cross-entropy of sigmoid(x) against targets in [0, 1],
    in its overflow-free form, targets equal to ignore_label (truncated) left out."""
    target = target.detach().reshape(x.shape)
    positive = (x >= 0).to(x.dtype)
    per_element = torch.log(1 + torch.exp(x - 2 * x * positive)) - x * (target - positive)
    valid = None if ignore_label is None else target.long() != ignore_label
    if valid is not None:
        per_element = torch.where(valid, per_element, torch.zeros_like(per_element))
    return normalized(per_element.sum(), normalization, valid, target)
'''

HINGE_SOURCE = '''
def hinge_loss(x, label, dim, squared):
    """Caffe's HingeLoss, one-vs-all: max(0, 1 - x) for the true class, max(0, 1 + x) for the others,
    summed (L1) or squared and summed (L2), divided by num."""
    x = x.reshape(-1, dim)
    labels = label.detach().reshape(-1, 1).long()
    is_true = labels == torch.arange(dim, device=labels.device)
    margins = torch.relu(1 + torch.where(is_true, -x, x))
    total = (margins * margins).sum() if squared else margins.sum()
    return total / x.shape[0]
'''

MULTINOMIAL_SOURCE = '''
def multinomial_logistic_loss(prob, label, dim):
    """Caffe's MultinomialLogisticLoss: -log(max(p[label], LOG_THRESHOLD)) averaged over num; its
    gradient -1 / (num max(p, LOG_THRESHOLD)) holds where the clamp bites too."""
    prob = prob.reshape(-1, dim)
    picked = prob.gather(1, label.detach().reshape(-1, 1).long()).squeeze(1)
    clamped = picked.clamp_min(LOG_THRESHOLD)
    surrogate = -picked / clamped.detach()
    nll = (-torch.log(clamped)).detach() + (surrogate - surrogate.detach())
    return nll.sum() / prob.shape[0]
'''

INFOGAIN_SOURCE = '''
class InfogainLoss(nn.Module):
    """Caffe's InfogainLoss: -sum_l H[label, l] log(max(softmax(x)_l, LOG_THRESHOLD)) over the labels
    (those equal to ignore_label left out), normalised as SoftmaxWithLoss; H is the third input or
    the layer's source file's matrix, saved with the weights. Caffe's gradient ignores the clamp.
    Returns the loss and the probabilities."""

    def __init__(self, axis, classes, inner, ignore_label, normalization, stored_infogain=False):
        super().__init__()
        self.axis, self.classes, self.inner = axis, classes, inner
        self.ignore_label, self.normalization = ignore_label, normalization
        self.register_buffer("infogain", torch.zeros(classes * classes) if stored_infogain else None)

    def forward(self, scores, label, infogain=None):
        classes, inner = self.classes, self.inner
        weights = (self.infogain if infogain is None else infogain).detach()
        weights = weights.reshape(classes, classes).to(scores.dtype)
        prob = torch.softmax(scores, self.axis)
        labels = label.detach().reshape(-1, inner).long()  # Caffe truncates float labels
        valid = None if self.ignore_label is None else labels != self.ignore_label
        index = labels if valid is None else torch.where(valid, labels, torch.zeros_like(labels))
        rows = weights[index].transpose(1, 2)  # (outer, classes, inner): H[label, l]
        log_prob = torch.log_softmax(scores, self.axis).reshape(-1, classes, inner)
        clamped = torch.log(prob.reshape(-1, classes, inner).clamp_min(LOG_THRESHOLD))
        surrogate = -(rows * log_prob).sum(1)
        per_label = (-(rows * clamped).sum(1)).detach() + (surrogate - surrogate.detach())
        if valid is not None:
            per_label = torch.where(valid, per_label, torch.zeros_like(per_label))
        return normalized(per_label.sum(), self.normalization, valid, labels), prob.detach()
'''


@register_source("SigmoidCrossEntropyLoss")
def sigmoid_cross_entropy_to_source(src, ctx, module: SigmoidCrossEntropyLoss, inputs, outputs):
    src.helper(NORMALIZED_SOURCE)
    src.helper(SIGMOID_CROSS_ENTROPY_SOURCE)
    src.assign(outputs, f"sigmoid_cross_entropy_loss({', '.join(inputs)}, {module.ignore_label!r}, "
                        f"{module.normalization!r})")


@register_source("HingeLoss")
def hinge_loss_to_source(src, ctx, module: HingeLoss, inputs, outputs):
    src.helper(HINGE_SOURCE)
    src.assign(outputs, f"hinge_loss({', '.join(inputs)}, {module.dim}, {module.squared!r})")


@register_source("MultinomialLogisticLoss")
def multinomial_logistic_loss_to_source(src, ctx, module: MultinomialLogisticLoss, inputs, outputs):
    src.helper(LOG_THRESHOLD_SOURCE)
    src.helper(MULTINOMIAL_SOURCE)
    src.assign(outputs, f"multinomial_logistic_loss({', '.join(inputs)}, {module.dim})")


@register_source("InfogainLoss")
def infogain_loss_to_source(src, ctx, module: InfogainLoss, inputs, outputs):
    src.helper(LOG_THRESHOLD_SOURCE)
    src.helper(NORMALIZED_SOURCE)
    src.helper(INFOGAIN_SOURCE)
    stored = module.infogain is not None
    layer = src.attribute(ctx, f"InfogainLoss({module.axis}, {module.classes}, {module.inner}, "
                               f"{module.ignore_label!r}, {module.normalization!r}"
                               + (", stored_infogain=True)" if stored else ")"),
                          {"infogain": module.infogain} if stored else {})
    call = f"{layer}({', '.join(inputs)})"
    src.assign(outputs, call if len(outputs) == 2 else f"{call}[0]")
