"""The lifted loss over the global batch of a torch.distributed job.

Each rank all-gathers every rank's embeddings and labels and computes the same loss
over the concatenation (in rank order), so the negatives of an anchor come from the
whole global batch, as in single-process training on that batch. Ranks may hold
different batch sizes; the feature dimension, and the dtypes, must agree. Every rank
computes the whole N x N loss (N the global batch): redundant, but one all-gather is
all the communication, which suits global batches of a few thousand.

Gradient scaling, and why. Every rank computes the same global loss L, so the gradient
of L with respect to a rank's own embeddings is its slice of dL/dX: the backward of the
gather needs no communication. DDP then *averages* the parameter gradients of the k
ranks. Each rank's parameters only see dL/dX through its own rows, so that average is
(1/k) * dL/dtheta. With `ddp_average=True` (the default) the slice is multiplied by k,
and after DDP's averaging the parameter gradients equal those of single-process
training on the concatenated batch. Use `ddp_average=False` when gradients are summed
over ranks instead of averaged (or not reduced at all): then each rank's embedding
gradient is exactly its slice of dL/dX. The returned loss is never scaled.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import CaffeCompatError
from .lifted import lifted_shape_error, lifted_struct_loss

__all__ = ["DistributedLiftedStructSimilaritySoftmaxLoss"]


def _all_gather_rows(local: Tensor, counts: List[int], group) -> Tensor:
    """Concatenate every rank's `local` rows; rows beyond a rank's count are padding."""
    padded = local.new_zeros((max(counts),) + tuple(local.shape[1:]))
    padded[:local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([part[:count] for part, count in zip(gathered, counts)])


class _GatherEmbeddings(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor, counts: List[int], rank: int, grad_scale: float, group):
        ctx.rows = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
        ctx.grad_scale = grad_scale
        return _all_gather_rows(local, counts, group)

    @staticmethod
    def backward(ctx, grad_global: Tensor):
        # Every rank holds the gradient of the same loss: no reduction needed.
        return grad_global[ctx.rows] * ctx.grad_scale, None, None, None, None


def _gather_batch(local: Tensor, labels: Tensor, counts: List[int], group,
                  ddp_average: bool) -> Tuple[Tensor, Tensor]:
    world_size = dist.get_world_size(group)
    scale = float(world_size) if ddp_average else 1.0
    embeddings = _GatherEmbeddings.apply(local, counts, dist.get_rank(group), scale, group)
    return embeddings, _all_gather_rows(labels.detach(), counts, group)


class DistributedLiftedStructSimilaritySoftmaxLoss(nn.Module):
    """LiftedStructSimilaritySoftmaxLoss over the global batch of all ranks of `group`
    (default: the world). loss(embeddings, labels) takes this rank's (n_r, d) or
    (n_r, d, 1, 1) embeddings and (n_r,) or (n_r, 1, 1, 1) labels and returns the same
    0-d loss on every rank. Call it on every rank of the group (it communicates).
    See the module docstring for `ddp_average`."""

    def __init__(self, margin: float = 1.0, caffe_exact: bool = False, group=None,
                 ddp_average: bool = True):
        super().__init__()
        self.margin = float(margin)
        self.caffe_exact = bool(caffe_exact)
        self.group = group
        self.ddp_average = bool(ddp_average)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if not dist.is_available() or not dist.is_initialized():
            raise CaffeCompatError("DistributedLiftedStructSimilaritySoftmaxLoss needs an initialised "
                                   "torch.distributed process group; use "
                                   "LiftedStructSimilaritySoftmaxLoss in a single process")
        problem = lifted_shape_error(embeddings.shape, labels.shape)
        # Every rank learns every rank's shape (and whether it is valid) before any
        # gather of rows, so a bad input fails on all ranks instead of hanging them.
        rows, dims = (embeddings.shape[0], embeddings.shape[1]) if problem is None else (0, 0)
        descriptor = torch.tensor([rows, dims, problem is not None], dtype=torch.int64,
                                  device=embeddings.device)
        descriptors = [torch.empty_like(descriptor) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(descriptors, descriptor, group=self.group)
        descriptors = [tuple(d.tolist()) for d in descriptors]
        name = type(self).__name__
        if problem is not None:
            raise CaffeCompatError(f"{name}: {problem}")
        bad_ranks = [r for r, d in enumerate(descriptors) if d[2]]
        if bad_ranks:
            raise CaffeCompatError(f"{name}: rank(s) {bad_ranks} passed malformed inputs")
        if len({d[1] for d in descriptors}) != 1:
            raise CaffeCompatError(f"{name}: ranks disagree on the embedding dimension: "
                                   f"{[d[1] for d in descriptors]}")
        local = embeddings.reshape(rows, dims)
        global_embeddings, global_labels = _gather_batch(
            local, labels.reshape(-1), [d[0] for d in descriptors], self.group, self.ddp_average)
        return lifted_struct_loss(global_embeddings, global_labels, self.margin, self.caffe_exact)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, caffe_exact={self.caffe_exact}, ddp_average={self.ddp_average}"
