"""The lifted loss as it was before the blockwise form (commit f8de6b4): five n x n
matrices, the Gram form on the raw batch. Kept so that benchmarks/lifted_loss.py can
time and check the blockwise form against it side by side."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from caffe_compat.losses.lifted import _flatten_checked


def _distances(x: Tensor, caffe_exact: bool) -> Tensor:
    gram = x @ x.T
    # Squared norms from the Gram diagonal (not a separate sum): then coincident rows,
    # the diagonal included, get a squared distance of exactly 0, not rounding noise.
    sq_norms = gram.diagonal()
    dist_sq = torch.sub(sq_norms.unsqueeze(1) + sq_norms, gram, alpha=2)
    if not caffe_exact:
        # The fork takes sqrt of a rounding-negative value and gets NaN.
        dist_sq.clamp_min_(0)
    return dist_sq.sqrt_()


class _LiftedStructLoss(torch.autograd.Function):
    """The loss over flat (n, d) embeddings, given the label structure: `same` (n x n,
    1.0 where y_i == y_j, the diagonal included) and the number of ordered positive
    pairs (i != j), which is 2P."""

    @staticmethod
    def forward(ctx, x: Tensor, same: Tensor, num_ordered: int, margin: float, caffe_exact: bool):
        dist = _distances(x, caffe_exact)
        # Per-anchor log-sum-exp over negatives, a_i = log sum_k exp(m - D_ik), shifted by
        # the nearest negative: a_i = m - nearest_i + log s_i with every exponent <= 0
        # and s_i >= 1. Same-label entries are pushed beyond any distance (+max, so
        # that their exponent underflows to exactly 0), which masks them for free.
        shifted = torch.add(dist, same, alpha=torch.finfo(x.dtype).max)
        nearest = shifted.amin(1, keepdim=True)
        scaled_softmax = torch.sub(nearest, shifted).exp_()
        sums = scaled_softmax.sum(1, keepdim=True)
        # A batch of one class has no negatives: there every a_i is about -max, finite,
        # so all its hinges are 0 with no inf - inf anywhere.
        anchor_lse = sums.log().sub_(nearest).add_(margin)
        # J over ordered pairs: both (i, j) and (j, i) of each positive pair, so the sum
        # of squares is 2 * sum_{i<j} and the divisor 2 * (2P).
        hinge = torch.logaddexp(anchor_lse, anchor_lse.T).add_(dist).clamp_min_(0).mul_(same)
        hinge.diagonal().zero_()
        flat = hinge.view(-1)
        loss = torch.dot(flat, flat) / (2 * max(num_ordered, 1))
        ctx.save_for_backward(x, dist, scaled_softmax, sums, anchor_lse, hinge)
        ctx.num_ordered = num_ordered
        ctx.caffe_exact = caffe_exact
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        x, dist, scaled_softmax, sums, anchor_lse, hinge = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            # d logaddexp(a_i, a_j) / d a_i = sigmoid(a_i - a_j); weighted by the pair's
            # hinge and summed over the anchor's positive partners.
            anchor_weight = torch.sigmoid(anchor_lse - anchor_lse.T).mul_(hinge).sum(1, keepdim=True)
            # dLoss/dD_ij over ordered entries, times 2P: the hinge on positives, minus
            # 2 * weight * softmax on negatives (disjoint masks); then / D_ij, as
            # dD_ij/dx_i = (x_i - x_j) / D_ij.
            coef = torch.addcmul(hinge, anchor_weight.div_(sums), scaled_softmax, value=-2)
            coef.div_(dist)
            if ctx.caffe_exact:
                coef.diagonal().zero_()  # the fork never visits (i, i)
            else:
                # At D_ij = 0 the direction is undefined: use the zero subgradient.
                coef.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            # D_ij and D_ji are one distance: grad_i = sum_j (C_ij + C_ji)(x_i - x_j),
            # with C and C^T as two products rather than a transposed (slow) add.
            row_weight = coef.sum(1) + coef.sum(0)
            grad = torch.addmm(x * row_weight.unsqueeze(1), coef, x, alpha=-1)
            grad.addmm_(coef.T, x, alpha=-1).mul_(grad_loss / max(ctx.num_ordered, 1))
        return grad, None, None, None, None


def dense_lifted_loss(embeddings: Tensor, labels: Tensor, margin: float = 1.0,
                      caffe_exact: bool = False) -> Tensor:
    """The former lifted_struct_loss, checks included (its error paths left out)."""
    margin = float(margin)
    assert math.isfinite(margin)
    x, labels = _flatten_checked(embeddings, labels)
    n = x.shape[0]
    same = torch.empty((n, n), dtype=x.dtype, device=x.device)
    torch.eq(labels.unsqueeze(1), labels, out=same)
    num_ordered = int(same.sum(1).sum(dtype=torch.float64).item()) - n
    torch.is_autocast_enabled(x.device.type)
    loss = _LiftedStructLoss.apply(x, same, num_ordered, margin, caffe_exact)
    assert math.isfinite(loss.item())
    return loss
