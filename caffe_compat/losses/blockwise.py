"""The lifted loss's arithmetic over row blocks of the distance matrix, as one
torch.autograd.Function with a hand-written backward.

Notation: x (n x d), D_ij = |x_i - x_j|, a_i = log sum_{k: y_k != y_i} exp(m - D_ik),
J_ij = max(0, logaddexp(a_i, a_j) + D_ij) over the N ordered positive pairs (i != j,
y_i == y_j), loss = sum J_ij^2 / (2N).

Memory. No n x n matrix is ever whole unless it fits SAVE_BYTES: rows are processed in
blocks of b rows, b chosen so that the few b x n temporaries of one block fit
BLOCK_BYTES (block_rows). The forward makes one pass over the blocks for the per-anchor
log-sum-exps and records the ordered positive pairs of each block (their indices, 16
bytes a pair); the losses of the pairs then need only those. When the n x n quotient
softmax / D fits SAVE_BYTES, the forward keeps it and the backward is two matrix
products per block; otherwise the backward recomputes each block's distances (one more
product per block) and nothing n x n is held at all.

Precision (the default; caffe_exact=False). Distances are translation invariant, so the
batch is centred first: embeddings with a large common component (a fine-tuned net's
features) then no longer cancel in |x_i|^2 + |x_j|^2 - 2 x_i.x_j. Where that form still
cancels (pairs much closer than their distance to the centre: near-coincident pairs,
d = 1), rounding of order eps (|x_i|^2 + |x_j|^2) would swamp D_ij^2: every entry with
D_ij^2 <= 2 NEAR_FRACTION max_k |x_k|^2 (centred) gets its distance from the
difference x_i - x_j instead, and its gradient term too (the matrix-product form of the
gradient cancels in the same way there). All other entries then have a relative error
of order eps / NEAR_FRACTION. A zero distance gets the zero subgradient.

caffe_exact=True keeps the fork's arithmetic: no centring, squared norms by a dot
product, D^2 = (-2 x_i.x_j + |x_i|^2) + |x_j|^2 unclamped (NaN where rounding makes it
negative), division by zero distances (NaN gradients for coincident positives), and the fork's
division by a zero pair count (NaN loss and gradient for a batch without positive pairs).
"""
from __future__ import annotations

import torch
from torch import Tensor

BLOCK_BYTES = 64 * 2 ** 20
SAVE_BYTES = 64 * 2 ** 20
BLOCK_TEMPORARIES = 3  # b x n buffers of the embeddings' dtype alive at once
NEAR_FRACTION = 1.0 / 16


def block_rows(n: int, itemsize: int) -> int:
    """Rows per block: as many as keep one block's temporaries within BLOCK_BYTES."""
    return max(1, min(n, BLOCK_BYTES // (BLOCK_TEMPORARIES * n * itemsize)))


class _Block:
    """What the forward records about rows [start, stop): the (row in block, column)
    indices of its ordered positive pairs, with D there and, once the hinges are known,
    J / D; its near entries (default arithmetic; None when there are none) with their
    exact distances and softmax numerator / D; and, when saving, numerator / D for the
    whole block."""

    __slots__ = ("start", "stop", "positives", "positive_quotients", "near", "near_distances",
                 "near_quotients", "quotients")

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop
        self.near = self.near_distances = self.near_quotients = self.quotients = None

    def square(self, matrix: Tensor) -> Tensor:
        """The block's columns start:stop, whose diagonal is the pairs (i, i)."""
        return matrix[:, self.start:self.stop] if self.start or self.stop < matrix.shape[1] else matrix

    def global_rows(self, rows: Tensor) -> Tensor:
        return rows + self.start if self.start else rows


class _Geometry:
    """The embeddings as the block computations see them."""

    def __init__(self, x: Tensor, labels: Tensor, caffe_exact: bool):
        self.caffe_exact, self.n = caffe_exact, x.shape[0]
        self.labels, self.label_column = labels, labels.unsqueeze(1)
        # Differences of nearby rows are exact in the input (Sterbenz), not after
        # centring has rounded each row: near entries use the input's rows.
        self.raw = x
        self.x = x if caffe_exact else x - x.mean(0)
        self.sq_norms = torch.linalg.vecdot(self.x, self.x)
        if not caffe_exact:
            self.near_threshold = self.sq_norms.max().item() * (2 * NEAR_FRACTION)

    def distances(self, block: _Block, find_near: bool) -> Tensor:
        """D for the block's rows (b x n), inf on the diagonal (never a pair: that masks
        it everywhere). find_near: detect the near entries and record them in `block`;
        otherwise reuse those recorded."""
        rows = slice(block.start, block.stop)
        # The fork's order: -2 x_i.x_j + |x_i|^2, then + |x_j|^2.
        dist_sq = torch.addmm(self.sq_norms[rows].unsqueeze(1), self.x[rows], self.x.T, alpha=-2)
        dist_sq.add_(self.sq_norms)
        block.square(dist_sq).fill_diagonal_(torch.inf)
        if not self.caffe_exact:
            # Near entries are rare: one min over the block tells whether to look for them.
            if find_near and dist_sq.amin().item() <= self.near_threshold:
                near_rows, near_cols = torch.nonzero(dist_sq <= self.near_threshold, as_tuple=True)
                block.near = (near_rows, near_cols)
                block.near_distances = _pair_distances(self.raw, block.global_rows(near_rows), near_cols)
            if block.near is not None:
                # Rounding-negative squares are all near entries: replaced here.
                dist_sq.index_put_(block.near, block.near_distances.square())
        return dist_sq.sqrt_()

    def softmax_numerators(self, block: _Block, dist: Tensor, nearest: Tensor, find_nearest: bool):
        """exp(nearest_i - D_ik) on negatives and 0 on same-label entries (b x n), with
        nearest_i the distance to the anchor's nearest negative (written into `nearest`
        when find_nearest), and the positive pairs' mask (1.0, the diagonal excluded).
        A row without negatives gets nearest = max and numerators 1: its hinges are 0.
        (Float masks: comparisons into bool, and masked_fill, are several times slower.)"""
        same = dist.new_empty(dist.shape)
        torch.eq(self.label_column[block.start:block.stop], self.labels, out=same)
        block.square(same).fill_diagonal_(0)
        # + max pushes same-label distances beyond any other, so their exponent is -inf.
        shifted = torch.add(dist, same, alpha=torch.finfo(dist.dtype).max)
        if find_nearest:
            torch.amin(shifted, 1, keepdim=True, out=nearest)
        return torch.sub(nearest, shifted, out=shifted).exp_(), same


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
    """grad_r += coef (x_r - x_c), grad_c -= coef (x_r - x_c), from the differences."""
    for part in _chunks(rows.shape[0], x.shape[1], x.element_size()):
        r, c = rows[part], cols[part]
        step = (x[r] - x[c]).mul_(coef[part].unsqueeze(1))
        grad.index_add_(0, r, step)
        grad.index_add_(0, c, step, alpha=-1)


class LiftedStructLoss(torch.autograd.Function):
    """loss, N = LiftedStructLoss.apply(x, labels, margin, caffe_exact) for flat (n, d)
    x and labels as floats of x's dtype; N (an int) is the number of ordered positive
    pairs. A batch without any (a batch of one included) gives loss 0 and a zero
    gradient; with caffe_exact NaN and a NaN gradient, as the fork's 0 / 0."""

    @staticmethod
    def forward(ctx, x: Tensor, labels: Tensor, margin: float, caffe_exact: bool):
        geometry = _Geometry(x, labels, caffe_exact)
        n = geometry.n
        save = n * n * x.element_size() <= SAVE_BYTES
        rows_per_block = block_rows(n, x.element_size())
        blocks = [_Block(s, min(s + rows_per_block, n)) for s in range(0, n, rows_per_block)]
        nearest, sums = x.new_empty(n, 1), x.new_empty(n, 1)
        for block in blocks:
            rows = slice(block.start, block.stop)
            dist = geometry.distances(block, find_near=True)
            numerators, same = geometry.softmax_numerators(block, dist, nearest[rows], True)
            torch.sum(numerators, 1, keepdim=True, out=sums[rows])
            block.positives = torch.nonzero(same, as_tuple=True)
            block.positive_quotients = dist[block.positives]
            if block.near is not None:
                # numerator / D on near entries: 0 on same-label ones and at D = 0
                block.near_quotients = torch.where(block.near_distances > 0,
                                                   numerators[block.near] / block.near_distances, 0)
            if save:
                block.quotients = numerators.div_(dist)
                _zero_near_entries(block, block.quotients)
        # a_i = m - nearest_i + log s_i: the exponents above were all <= 0 and s_i >= 1.
        anchor_lse = sums.log().sub_(nearest).add_(margin).view(-1)
        squares, num_ordered = [], 0
        anchor_weights = x.new_zeros(n)  # -2 w_i, w_i = sum_j sigmoid(a_i - a_j) J_ij
        for block in blocks:
            r, c = block.global_rows(block.positives[0]), block.positives[1]
            anchors, partners = anchor_lse[r], anchor_lse[c]
            hinge = torch.logaddexp(anchors, partners).add_(block.positive_quotients).clamp_min_(0)
            squares.append(torch.dot(hinge, hinge))
            num_ordered += hinge.numel()
            anchor_weights.index_add_(0, r, anchors.sub_(partners).sigmoid_().mul_(hinge), alpha=-2)
            block.positive_quotients = hinge.div_(block.positive_quotients)
        ctx.geometry, ctx.blocks, ctx.num_ordered, ctx.nearest = geometry, blocks, num_ordered, nearest
        # dLoss/dD_ik through a_i, times N: -2 w_i softmax_ik = -2 w_i / s_i * numerator_ik.
        ctx.negative_scale = anchor_weights.view(-1, 1).div_(sums)
        ctx.mark_non_differentiable(labels)
        total = squares[0] if len(squares) == 1 else torch.stack(squares).sum()
        if num_ordered == 0:
            # No positive pair, no term of the loss: 0. The fork divides its zero sum by
            # its zero pair count (NaN), which caffe_exact keeps; see backward.
            return total.fill_(torch.nan if caffe_exact else 0), 0
        return total.mul_(1 / (2 * num_ordered)), num_ordered

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        geometry = ctx.geometry
        if ctx.num_ordered == 0:
            # Zero, not the arithmetic below: an anchor without negatives (a batch of one)
            # has softmax 0 / 0 there. The fork scales its zero diffs by 1 / 0: NaN.
            return torch.full_like(geometry.raw, torch.nan if geometry.caffe_exact else 0), None, None, None
        x = geometry.x
        with torch.autocast(x.device.type, enabled=False):
            # C = dLoss/dD / D (times N) over ordered entries; grad_i = sum_j (C_ij + C_ji)
            # (x_i - x_j) = x_i (row_i + column_i sums of C) - (C x)_i - (C^T x)_i.
            # (An augmented [x, 1] would give the sums inside the products, but matrix
            # products with d + 1 columns run far slower than with d.)
            grad = None if len(ctx.blocks) == 1 else torch.zeros_like(x)
            weights = None if len(ctx.blocks) == 1 else x.new_zeros(x.shape[0])
            near_rows, near_cols, near_coefs = [], [], []
            for block in ctx.blocks:
                rows = slice(block.start, block.stop)
                scale = ctx.negative_scale[rows]
                if block.quotients is not None:
                    coef = block.quotients * scale
                else:
                    dist = geometry.distances(block, find_near=False)
                    coef = geometry.softmax_numerators(block, dist, ctx.nearest[rows], False)[0].div_(dist)
                    _zero_near_entries(block, coef)
                    coef.mul_(scale)
                coef.index_put_(block.positives, block.positive_quotients)
                if block.near is not None:
                    near_coef = coef[block.near].addcmul_(block.near_quotients, scale.view(-1)[block.near[0]])
                    coef.index_put_(block.near, near_coef.new_zeros(()))
                    near_rows.append(block.global_rows(block.near[0]))
                    near_cols.append(block.near[1])
                    near_coefs.append(torch.where(block.near_distances > 0, near_coef, 0))
                if grad is None:  # one block
                    weights = coef.sum(1).add_(coef.sum(0))
                    grad = torch.addmm(x * weights.unsqueeze(1), coef, x, alpha=-1)
                else:
                    weights[rows] += coef.sum(1)
                    weights += coef.sum(0)
                    grad[rows].addmm_(coef, x, alpha=-1)
                grad.addmm_(coef.T, x[rows], alpha=-1)
            if len(ctx.blocks) > 1:
                grad.addcmul_(x, weights.unsqueeze(1))
            if near_rows:
                _add_pair_gradients(grad, geometry.raw, torch.cat(near_rows), torch.cat(near_cols),
                                    torch.cat(near_coefs))
            grad.mul_(grad_loss / ctx.num_ordered)
        return grad, None, None, None


def _zero_near_entries(block: _Block, quotients: Tensor) -> None:
    """Near entries are handled from differences."""
    if block.near is not None:
        quotients.index_put_(block.near, quotients.new_zeros(()))


def one_block_loss(x: Tensor, labels: Tensor, margin: float, caffe_exact: bool) -> Tensor:
    """LiftedStructLoss's forward without branches on values, for torch.export: the same
    operations as its one block (every batch of fewer than block_rows' bound, about 2300 rows
    of float32 embeddings), so the same bits; larger batches round their per-block sums apart.
    Its entries and pairs come from nonzero (a size known only when run), its thresholds and
    the pair count stay tensors, and no gradient is defined (programs are exported for eval)."""
    raw = x
    x = x if caffe_exact else x - x.mean(0)
    sq_norms = torch.linalg.vecdot(x, x)
    dist_sq = torch.addmm(sq_norms.unsqueeze(1), x, x.T, alpha=-2).add(sq_norms)
    diagonal = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    dist_sq = dist_sq.masked_fill(diagonal, torch.inf)
    if not caffe_exact:
        near = torch.nonzero(dist_sq <= sq_norms.amax() * (2 * NEAR_FRACTION), as_tuple=True)
        exact = torch.linalg.vector_norm(raw[near[0]] - raw[near[1]], dim=1)
        dist_sq = dist_sq.index_put(near, exact.square())
    dist = dist_sq.sqrt()
    same = torch.eq(labels.unsqueeze(1), labels).to(dist.dtype).masked_fill(diagonal, 0)
    shifted = torch.add(dist, same, alpha=torch.finfo(dist.dtype).max)
    nearest = shifted.amin(1, keepdim=True)
    sums = (nearest - shifted).exp().sum(1, keepdim=True)
    anchor_lse = sums.log().sub(nearest).add(margin).view(-1)
    rows, cols = torch.nonzero(same, as_tuple=True)
    hinge = torch.logaddexp(anchor_lse[rows], anchor_lse[cols]).add(dist[rows, cols]).clamp_min(0)
    count = torch.count_nonzero(same)
    # 1 / (2N) rounded as the eager Python float is, then to the loss's dtype
    scale = (1 / (2 * count).double()).to(dist.dtype)
    empty = torch.full((), torch.nan if caffe_exact else 0, dtype=dist.dtype, device=dist.device)
    return torch.where(count == 0, empty, torch.dot(hinge, hinge) * scale)
