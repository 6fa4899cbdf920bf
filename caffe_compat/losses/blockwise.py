"""The lifted loss's arithmetic over row blocks of the distance matrix, as one
torch.autograd.Function with a hand-written backward.

Notation: x (n x d), D_ij = |x_i - x_j|, a_i = log sum_{k: y_k != y_i} exp(m - D_ik),
J_ij = max(0, logaddexp(a_i, a_j) + D_ij) over the N ordered positive pairs (i != j,
y_i == y_j), loss = sum J_ij^2 / (2N).

Memory. No n x n matrix is ever whole unless it fits SAVE_BYTES: rows are processed in
blocks of b rows, b chosen so that the few b x n temporaries of one block fit
BLOCK_BYTES (block_rows). The forward makes one pass over the blocks for the per-anchor
log-sum-exps and records the ordered positive pairs of each block (flat indices, a few
bytes per pair); the losses of the pairs then need only those. When the n x n quotient
softmax / D fits SAVE_BYTES, the forward keeps it and the backward is two matrix
products per block; otherwise the backward recomputes each block's distances (one more
product per block) and nothing n x n is held at all.

Precision (the default; caffe_exact=False). Distances are translation invariant, so the
batch is centred first: embeddings with a large common component (a fine-tuned net's
features) then no longer cancel in |x_i|^2 + |x_j|^2 - 2 x_i.x_j. Where that form still
cancels (pairs much closer than their distance to the centre: near-coincident pairs,
d = 1), rounding of order eps (|x_i|^2 + |x_j|^2) would swamp D_ij^2: every entry with
D_ij^2 <= NEAR_FRACTION (|x_i|^2 + max_k |x_k|^2) gets its distance from the
difference x_i - x_j instead, and its gradient term too (the matrix-product form of the
gradient cancels in the same way there). All other entries then have a relative error
of order eps / NEAR_FRACTION. A zero distance gets the zero subgradient.

caffe_exact=True keeps the fork's arithmetic: no centring, squared norms by a dot
product, D^2 = (-2 x_i.x_j + |x_i|^2) + |x_j|^2 unclamped (NaN where rounding makes it
negative), and division by zero distances (NaN gradients for coincident positives).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

BLOCK_BYTES = 64 * 2 ** 20
SAVE_BYTES = 64 * 2 ** 20
BLOCK_TEMPORARIES = 3  # b x n buffers of the embeddings' dtype alive at once (plus two bool masks)
NEAR_FRACTION = 1.0 / 16


def block_rows(n: int, itemsize: int) -> int:
    """Rows per block: as many as keep one block's temporaries within BLOCK_BYTES."""
    return max(1, min(n, BLOCK_BYTES // (BLOCK_TEMPORARIES * n * itemsize)))


class _Block:
    """What the forward records about rows [start, stop): flat indices (into the block's
    b x n entries) of its ordered positive pairs, with J / D there once the losses are
    known; its near entries (default arithmetic) with their exact distances and their
    softmax / D; and, in the saving mode, softmax / D for the whole block."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop
        self.positives: Tensor = None
        self.positive_quotients: Tensor = None  # D there in the forward, then J / D
        self.near: Optional[Tensor] = None
        self.near_distances: Optional[Tensor] = None
        self.near_quotients: Optional[Tensor] = None
        self.quotients: Optional[Tensor] = None

    def diagonal(self, matrix: Tensor) -> Tensor:
        return matrix[:, self.start:self.stop].diagonal()

    def pair_rows(self, flat: Tensor, n: int):
        return flat // n + self.start, flat % n


class _Geometry:
    """The embeddings as the block computations see them."""

    def __init__(self, x: Tensor, labels: Tensor, caffe_exact: bool):
        self.caffe_exact = caffe_exact
        # Differences of nearby rows are exact in the input (Sterbenz), not after
        # centring rounded each row: near entries use the input's rows.
        self.raw = x
        self.x = x if caffe_exact else x - x.mean(0)
        self.labels = labels
        sq_norms = torch.einsum("ij,ij->i", self.x, self.x)
        self.sq_norms = sq_norms
        if not caffe_exact:
            # [x, |x|^2, 1] . [-2x, 1, |x|^2] = D^2 in one product.
            ones = torch.ones_like(sq_norms).unsqueeze(1)
            self.left = torch.cat([self.x, sq_norms.unsqueeze(1), ones], 1)
            self.right = torch.cat([self.x * -2, ones, sq_norms.unsqueeze(1)], 1)
            self.near_threshold = (sq_norms + sq_norms.max()).mul_(NEAR_FRACTION)

    def distances(self, block: _Block, find_near: bool) -> Tensor:
        """D for the block's rows (b x n). find_near: detect the near entries and record
        them in `block`; otherwise reuse those recorded."""
        rows = slice(block.start, block.stop)
        if self.caffe_exact:
            dist_sq = torch.addmm(self.sq_norms[rows].unsqueeze(1), self.x[rows], self.x.T, alpha=-2)
            return dist_sq.add_(self.sq_norms).sqrt_()
        dist_sq = self.left[rows] @ self.right.T
        if find_near:
            near = dist_sq <= self.near_threshold[rows].unsqueeze(1)
            block.diagonal(near).fill_(False)
            block.near = _flat_nonzero(near)
            if block.near.numel():
                block.near_distances = _pair_distances(self.raw, *block.pair_rows(block.near, self.n))
        # Rounding-negative squares are all near entries, replaced just below.
        dist = dist_sq.sqrt_()
        if block.near.numel():
            dist.view(-1).index_copy_(0, block.near, block.near_distances)
        return dist

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def masked_softmax_numerators(self, block: _Block, dist: Tensor, nearest: Optional[Tensor]):
        """exp(nearest_i - D_ik) on negatives, 0 on same-label entries; and nearest_i,
        the distance to the anchor's nearest negative (computed when not given). A row
        without negatives has nearest = max and all numerators 1 (its hinges are 0)."""
        same = self.labels[block.start:block.stop].unsqueeze(1) == self.labels
        shifted = dist.masked_fill(same, torch.finfo(dist.dtype).max)
        if nearest is None:
            nearest = shifted.amin(1)
        numerators = torch.sub(nearest.unsqueeze(1), shifted, out=shifted).exp_()
        return numerators, nearest, same


def _flat_nonzero(mask: Tensor) -> Tensor:
    return mask.view(-1).nonzero().squeeze(1)


def _chunks(count: int, width: int, itemsize: int):
    step = max(1, BLOCK_BYTES // (3 * max(width, 1) * itemsize))
    return [slice(s, min(s + step, count)) for s in range(0, count, step)]


def _pair_distances(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """|x_r - x_c| from the differences, in chunks of bounded memory."""
    out = x.new_empty(rows.shape[0])
    for part in _chunks(rows.shape[0], x.shape[1], x.element_size()):
        out[part] = torch.linalg.vector_norm(x[rows[part]] - x[cols[part]], dim=1)
    return out


def _add_pair_gradients(grad: Tensor, x: Tensor, rows: Tensor, cols: Tensor, coef: Tensor):
    """grad_r += coef (x_r - x_c) and grad_c -= coef (x_r - x_c), from the differences."""
    for part in _chunks(rows.shape[0], x.shape[1], x.element_size()):
        r, c = rows[part], cols[part]
        step = (x[r] - x[c]).mul_(coef[part].unsqueeze(1))
        grad.index_add_(0, r, step)
        grad.index_add_(0, c, step, alpha=-1)


class LiftedStructLoss(torch.autograd.Function):
    """loss = LiftedStructLoss.apply(x, labels, num_ordered, margin, caffe_exact) for flat
    (n, d) x, labels as floats of x's dtype, N = num_ordered ordered positive pairs."""

    @staticmethod
    def forward(ctx, x: Tensor, labels: Tensor, num_ordered: int, margin: float, caffe_exact: bool):
        geometry = _Geometry(x, labels, caffe_exact)
        n = x.shape[0]
        save = n * n * x.element_size() <= SAVE_BYTES
        rows = block_rows(n, x.element_size())
        blocks = [_Block(s, min(s + rows, n)) for s in range(0, n, rows)]
        nearest, sums = x.new_empty(n), x.new_empty(n)
        for block in blocks:
            dist = geometry.distances(block, find_near=True)
            numerators, nearest[block.start:block.stop], same = \
                geometry.masked_softmax_numerators(block, dist, None)
            sums[block.start:block.stop] = numerators.sum(1)
            block.diagonal(same).fill_(False)
            block.positives = _flat_nonzero(same)
            block.positive_quotients = dist.view(-1)[block.positives]
            if block.near is not None and block.near.numel():
                # softmax numerator / D on near entries (0 on same-label ones, and at D = 0)
                near_numerators = numerators.view(-1)[block.near]
                block.near_quotients = torch.where(block.near_distances > 0,
                                                   near_numerators / block.near_distances, 0)
            if save:
                quotients = numerators.div_(dist)
                _zero_special_entries(block, quotients)
                block.quotients = quotients
        # a_i = m - nearest_i + log s_i: the exponents above were all <= 0 and s_i >= 1.
        anchor_lse = sums.log().sub_(nearest).add_(margin)
        total = x.new_zeros(())
        anchor_weights = x.new_zeros(n)  # w_i = sum_j sigmoid(a_i - a_j) J_ij
        for block in blocks:
            r, c = block.pair_rows(block.positives, n)
            hinge = torch.logaddexp(anchor_lse[r], anchor_lse[c]).add_(block.positive_quotients).clamp_min_(0)
            total += torch.dot(hinge, hinge)
            anchor_weights.index_add_(0, r, torch.sigmoid(anchor_lse[r] - anchor_lse[c]).mul_(hinge))
            block.positive_quotients = hinge.div_(block.positive_quotients)
        ctx.geometry, ctx.blocks, ctx.num_ordered = geometry, blocks, num_ordered
        # dLoss/dD_ik through a_i, times N: -2 w_i softmax_ik = -2 w_i / s_i * numerator_ik.
        ctx.negative_scale = anchor_weights.mul_(-2).div_(sums)
        ctx.nearest = nearest
        return total / (2 * max(num_ordered, 1))

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        geometry, n = ctx.geometry, ctx.geometry.n
        x = geometry.x
        with torch.autocast(x.device.type, enabled=False):
            # A = sum over blocks of C [x, 1] and C^T [x, 1]: grad_i = sum_j (C_ij + C_ji)(x_i - x_j)
            # = x_i * A_i,d - A_i,:d, with C = dLoss/dD / D (times N) over ordered entries.
            x1 = torch.cat([x, torch.ones_like(x[:, :1])], 1)
            accumulated = torch.zeros_like(x1)
            near_rows: List[Tensor] = []
            near_cols: List[Tensor] = []
            near_coefs: List[Tensor] = []
            for block in ctx.blocks:
                rows = slice(block.start, block.stop)
                scale = ctx.negative_scale[rows].unsqueeze(1)
                if block.quotients is not None:
                    coef = block.quotients * scale
                else:
                    dist = geometry.distances(block, find_near=False)
                    numerators, _, _ = geometry.masked_softmax_numerators(block, dist, ctx.nearest[rows])
                    coef = numerators.div_(dist)
                    _zero_special_entries(block, coef)
                    coef.mul_(scale)
                coef.view(-1).index_copy_(0, block.positives, block.positive_quotients)
                if block.near is not None and block.near.numel():
                    r, c = block.pair_rows(block.near, n)
                    near_coef = coef.view(-1)[block.near].addcmul_(block.near_quotients, scale.view(-1)[r - block.start])
                    coef.view(-1).index_fill_(0, block.near, 0)
                    near_rows.append(r)
                    near_cols.append(c)
                    near_coefs.append(torch.where(block.near_distances > 0, near_coef, 0))
                accumulated[rows].addmm_(coef, x1)
                accumulated.addmm_(coef.T, x1[rows])
            d = x.shape[1]
            grad = torch.addcmul(-accumulated[:, :d], x, accumulated[:, d:])
            if near_rows:
                _add_pair_gradients(grad, geometry.raw, torch.cat(near_rows), torch.cat(near_cols), torch.cat(near_coefs))
            grad.mul_(grad_loss / max(ctx.num_ordered, 1))
        return grad, None, None, None, None


def _zero_special_entries(block: _Block, quotients: Tensor) -> None:
    """The diagonal is never a pair, and near entries are handled from differences."""
    block.diagonal(quotients).zero_()
    if block.near is not None and block.near.numel():
        quotients.view(-1).index_fill_(0, block.near, 0)
