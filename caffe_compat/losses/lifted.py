"""The lifted structured similarity softmax loss (Oh Song et al., CVPR 2016) as the
paper's Caffe fork computes it (LiftedStructSimilaritySoftmaxLossLayer).

For embeddings x (n x d), labels y and margin m, with D_ij the Euclidean distance and
P the number of positive pairs i < j (y_i == y_j):

    J_ij = max(0, log(sum_{k: y_k != y_i} exp(m - D_ik) + sum_{l: y_l != y_j} exp(m - D_jl)) + D_ij)
    loss = sum_{i<j positive} J_ij^2 / (2 P)

How it is computed (caffe_compat.losses.blockwise): pure tensor algebra over row blocks
of the distance matrix, one masked log-sum-exp per anchor, a_i = log sum_k exp(m - D_ik),
and per pair log(e^a_i + e^a_j) = logaddexp(a_i, a_j), which stays finite for any
distance and margin; a hand-written backward (the exact derivative, checked against
autograd in the tests); O(n^2 d) time, O(n x block) memory beyond the positive pairs.
"""
from __future__ import annotations

import math
import warnings
from typing import Tuple

import torch
from torch import Tensor, nn

from ..errors import CaffeCompatError
from .blockwise import LiftedStructLoss, one_block_loss

__all__ = ["LiftedStructSimilaritySoftmaxLoss", "NoPositivePairsWarning", "lifted_struct_loss",
           "lifted_shape_error"]


class NoPositivePairsWarning(UserWarning):
    """The batch has no two samples with the same label: the loss is 0 and teaches nothing
    (NaN with caffe_exact, as in the fork)."""


def lifted_shape_error(embedding_shape: Tuple[int, ...], label_shape: Tuple[int, ...]):
    """What is wrong with these bottom shapes for the loss, or None when they are fine.

    Caffe's rule: embeddings (n, d) with any trailing axes of size 1 (blobs are often
    (n, d, 1, 1)); labels (n,) with any trailing axes of size 1; at most 4 axes."""
    embedding_shape, label_shape = tuple(embedding_shape), tuple(label_shape)
    if not 2 <= len(embedding_shape) <= 4 or any(s != 1 for s in embedding_shape[2:]):
        return f"embeddings must have shape (n, d) or (n, d, 1, 1), got {embedding_shape}"
    if not 1 <= len(label_shape) <= 4 or any(s != 1 for s in label_shape[1:]):
        return f"labels must have shape (n,) or (n, 1, 1, 1), got {label_shape}"
    if label_shape[0] != embedding_shape[0]:
        return (f"{label_shape[0]} labels for {embedding_shape[0]} embeddings: "
                f"need one label per embedding")
    return None


def _flatten_checked(embeddings: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    if not isinstance(embeddings, Tensor) or not isinstance(labels, Tensor):
        raise CaffeCompatError(f"embeddings and labels must be tensors, got "
                               f"{type(embeddings).__name__} and {type(labels).__name__}")
    problem = lifted_shape_error(embeddings.shape, labels.shape)
    if problem:
        raise CaffeCompatError(f"LiftedStructSimilaritySoftmaxLoss: {problem}")
    if not embeddings.is_floating_point():
        raise CaffeCompatError(f"LiftedStructSimilaritySoftmaxLoss: embeddings must be floating "
                               f"point, got {embeddings.dtype}")
    if labels.is_complex():
        raise CaffeCompatError(f"LiftedStructSimilaritySoftmaxLoss: labels must be real, got {labels.dtype}")
    if labels.device != embeddings.device:
        raise CaffeCompatError(f"LiftedStructSimilaritySoftmaxLoss: labels on {labels.device}, "
                               f"embeddings on {embeddings.device}")
    if labels.is_floating_point():
        if torch.compiler.is_exporting():  # the program checks them when run
            torch._assert_async(~torch.isnan(labels).any(), "LiftedStructSimilaritySoftmaxLoss: labels contain NaN")
        elif torch.isnan(labels).any():
            raise CaffeCompatError("LiftedStructSimilaritySoftmaxLoss: labels contain NaN")
    x = embeddings.reshape(embeddings.shape[0], embeddings.shape[1])
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # half precision: distances and log-sum-exps in float32
    return x, _label_keys(labels.reshape(-1).detach(), x.dtype)


def _label_keys(labels: Tensor, dtype: torch.dtype) -> Tensor:
    """Labels as floats of the embeddings' precision, as Caffe's blobs hold them (and a
    same-dtype comparison is several times faster than a mixed one). Integer ids beyond
    2^24, which float32 would merge, are compared in float64 (always, in a program: equal
    either way below that)."""
    if dtype == torch.float32 and not labels.is_floating_point() and (
            torch.compiler.is_exporting() or labels.numel() and labels.abs().max().item() > 2 ** 24):
        dtype = torch.float64
    return labels.to(dtype)


def lifted_struct_loss(embeddings: Tensor, labels: Tensor, margin: float = 1.0,
                       caffe_exact: bool = False) -> Tensor:
    """The loss as a 0-d tensor (float64 for float64 embeddings, else float32).

    embeddings: (n, d) or (n, d, 1, 1); labels: (n,) or (n, 1, 1, 1), compared for
    equality as floats (see _label_keys). caffe_exact=False (default) computes as exactly as
    the dtype allows (centred batch, small distances from differences; see blockwise)
    and gives a zero subgradient at a zero distance; True reproduces the fork's
    arithmetic, NaN included (a positive pair at distance 0 makes its gradient NaN). A batch
    without positive pairs (a batch of one among them) has no term of the loss: it gives 0
    with a zero gradient (still connected to the graph) and a NoPositivePairsWarning; with
    caffe_exact=True it gives NaN and a NaN gradient, as the fork divides by its zero
    pair count. Under torch.export it traces blockwise.one_block_loss, the same forward
    numbers without branches on values: no warning, NaN labels checked by the program when run.
    """
    margin = float(margin)
    if not math.isfinite(margin):
        raise CaffeCompatError(f"LiftedStructSimilaritySoftmaxLoss: margin must be finite, got {margin}")
    x, labels = _flatten_checked(embeddings, labels)
    if not x.shape[0]:  # no data layer of Caffe's gives one; there is no anchor to take a loss over
        raise CaffeCompatError("LiftedStructSimilaritySoftmaxLoss: the batch holds no embeddings")
    device_type = x.device.type
    if torch.compiler.is_exporting():
        # a program's fixed graph: the forward alone, with no warning and no check of the value
        return one_block_loss(x, labels, margin, caffe_exact)
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):  # distances in full precision
            loss, num_ordered = LiftedStructLoss.apply(x, labels, margin, caffe_exact)
    else:
        loss, num_ordered = LiftedStructLoss.apply(x, labels, margin, caffe_exact)
    if num_ordered == 0:
        value = "NaN (the fork's 0 / 0, kept by caffe_exact)" if caffe_exact else "0"
        warnings.warn(f"LiftedStructSimilaritySoftmaxLoss: no positive pair among {x.shape[0]} samples "
                      f"(every label distinct); the loss is {value}", NoPositivePairsWarning, stacklevel=2)
    # Checked after the fact, as one non-finite input makes the loss non-finite, and
    # this costs nothing in the usual case.
    if not math.isfinite(loss.item()):
        if not torch.isfinite(x).all().item():
            raise CaffeCompatError("LiftedStructSimilaritySoftmaxLoss: embeddings contain NaN or inf")
        if not caffe_exact:
            raise CaffeCompatError(f"LiftedStructSimilaritySoftmaxLoss: squared distances overflow "
                                   f"{x.dtype} (embeddings too large)")
    return loss


class LiftedStructSimilaritySoftmaxLoss(nn.Module):
    """Caffe's LiftedStructSimilaritySoftmaxLoss layer: loss(embeddings, labels) -> 0-d
    tensor. See lifted_struct_loss for shapes, dtypes and degenerate batches."""

    def __init__(self, margin: float = 1.0, caffe_exact: bool = False):
        super().__init__()
        self.margin = float(margin)  # validated at each call, as it may be reassigned
        self.caffe_exact = bool(caffe_exact)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return lifted_struct_loss(embeddings, labels, self.margin, self.caffe_exact)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, caffe_exact={self.caffe_exact}"
