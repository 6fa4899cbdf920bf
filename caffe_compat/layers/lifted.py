"""LiftedStructSimilaritySoftmaxLoss, the paper fork's loss layer."""
from __future__ import annotations

from ..losses.lifted import LiftedStructSimilaritySoftmaxLoss, lifted_shape_error
from .registry import Converted, LayerContext, no_source_form, register, register_source

LIFTED_PARAM_FIELD = "lifted_struct_sim_softmax_loss_param"
DEFAULT_MARGIN = 1.0  # the fork's caffe.proto default


def lifted_margin(param) -> float:
    """The layer's margin. A net parsed in the BVLC dialect has no such field (there
    field 145 is parameter_param), so it gets the fork's default."""
    if not hasattr(param, LIFTED_PARAM_FIELD):
        return DEFAULT_MARGIN
    return float(getattr(param, LIFTED_PARAM_FIELD).margin)


@register("LiftedStructSimilaritySoftmaxLoss")
def build_lifted(ctx: LayerContext) -> Converted:
    ctx.expect_bottoms(2)
    problem = lifted_shape_error(ctx.bottom_shapes[0], ctx.bottom_shapes[1])
    if problem:
        raise ctx.error(problem)
    return ctx.wire(LiftedStructSimilaritySoftmaxLoss(lifted_margin(ctx.param)), top_shapes=[()])


# The arithmetic of losses.blockwise (default precision) for one block of rows, its
# gradient left to autograd: the same forward numbers on batches of the paper's size.
LIFTED_SOURCE = '''
def lifted_struct_loss(embeddings, labels, margin):
    """The paper's lifted structured similarity softmax loss: over the ordered positive pairs
    (i, j), J_ij = max(0, log(sum_k exp(m - D_ik) + sum_l exp(m - D_jl)) + D_ij) with k, l the
    negatives of i and j, and loss = sum J_ij^2 / (2 N). Distances of the centred batch; those
    much smaller than the batch's spread from the differences themselves, as rounding would
    swamp them."""
    raw = embeddings.flatten(1)
    x = raw - raw.mean(0)
    labels = labels.reshape(-1).to(x.dtype)
    sq_norms = torch.linalg.vecdot(x, x)
    dist_sq = torch.addmm(sq_norms.unsqueeze(1), x, x.T, alpha=-2) + sq_norms
    dist_sq = dist_sq.fill_diagonal_(torch.inf)
    near = dist_sq <= sq_norms.max().item() * (2 / 16)
    if near.any():
        exact = torch.linalg.vector_norm(raw.unsqueeze(1) - raw, dim=2)
        dist_sq = torch.where(near, exact.square(), dist_sq)
    dist = dist_sq.sqrt()
    same = (labels.unsqueeze(1) == labels).to(x.dtype).fill_diagonal_(0)
    shifted = torch.add(dist, same, alpha=torch.finfo(dist.dtype).max)  # same-label entries: exp(-inf) = 0
    nearest = shifted.amin(1, keepdim=True)
    sums = (nearest - shifted).exp().sum(1, keepdim=True)
    anchor_lse = (sums.log() - nearest + margin).view(-1)
    rows, cols = torch.nonzero(same, as_tuple=True)
    if rows.numel() == 0:  # no positive pair: no term of the loss
        return raw.sum() * 0.0
    hinge = (torch.logaddexp(anchor_lse[rows], anchor_lse[cols]) + dist[rows, cols]).clamp_min(0)
    return torch.dot(hinge, hinge) * (1 / (2 * rows.numel()))
'''


@register_source("LiftedStructSimilaritySoftmaxLoss")
def lifted_to_source(src, ctx, module, inputs, outputs):
    if module.caffe_exact:
        raise no_source_form(ctx, "caffe_exact arithmetic")
    src.helper(LIFTED_SOURCE)
    src.assign(outputs, f"lifted_struct_loss({inputs[0]}, {inputs[1]}, {module.margin!r})")
