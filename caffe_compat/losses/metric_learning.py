"""The paper's lifted loss as a pytorch-metric-learning loss, for the training loops that
library serves (`loss_fn(embeddings, labels)`, its reducers and embedding regularizers).
Imported on demand: `caffe_compat.losses` does not import this module, so
pytorch-metric-learning stays optional (`pip install 'caffe-compat[pml]'`).

What the paper fixes, and this class therefore does not take from pml's conventions:
- the distance is Euclidean (pml's `LpDistance(p=2, power=1)`); by default unnormalized,
  as the fork computes it, while `normalize_embeddings=True` L2-normalizes first;
- the mining is the loss's own: every positive pair of the batch, each against all of
  both members' negatives through a log-sum-exp (the paper's smooth hardest negative).
  A miner's `indices_tuple` and a reference set (`ref_emb`) are refused. Batches built as
  the paper's (same-class pairs) come from `caffe_compat.data.ClassBatchSampler`;
- the value is the fork's mean over positive pairs, handed to the reducer already
  reduced, so every pml reducer passes it through unchanged.
"""
from __future__ import annotations

from ..errors import CaffeCompatError
from .lifted import lifted_struct_loss

try:
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import BaseMetricLossFunction
except ImportError:
    raise CaffeCompatError("caffe_compat.losses.metric_learning needs pytorch-metric-learning: "
                           "pip install 'caffe-compat[pml]'") from None

__all__ = ["CaffeLiftedStructureLoss"]


class CaffeLiftedStructureLoss(BaseMetricLossFunction):
    """The fork's LiftedStructSimilaritySoftmaxLoss (value and gradient) with pml's call:
    loss_fn(embeddings, labels) -> 0-d tensor. Not pml's own `LiftedStructureLoss`, which
    is the paper's generalized form with different arithmetic.

    margin: the fork's `lifted_struct_sim_softmax_loss_param.margin`; caffe_exact: see
    caffe_compat.losses.lifted_struct_loss; distance: an `LpDistance(p=2, power=1)`
    (default: without normalization); other keywords (reducer, embedding_regularizer,
    embedding_reg_weight) go to pml's base class."""

    def __init__(self, margin: float = 1.0, caffe_exact: bool = False, **kwargs):
        kwargs.setdefault("distance", LpDistance(p=2, power=1, normalize_embeddings=False))
        super().__init__(**kwargs)
        distance = self.distance
        if type(distance) is not LpDistance or distance.p != 2 or distance.power != 1:
            raise CaffeCompatError(f"CaffeLiftedStructureLoss: the paper's loss is over Euclidean distances "
                                   f"(LpDistance(p=2, power=1)), got {type(distance).__name__}"
                                   f"(p={getattr(distance, 'p', None)}, power={getattr(distance, 'power', None)})")
        self.margin = float(margin)
        self.caffe_exact = bool(caffe_exact)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if labels is None:
            raise CaffeCompatError("CaffeLiftedStructureLoss: the paper's loss needs labels")
        if indices_tuple is not None:
            raise CaffeCompatError("CaffeLiftedStructureLoss: the paper's loss mines its own pairs (every positive "
                                   "pair, negatives by log-sum-exp); give no indices_tuple")
        if ref_emb is not embeddings:
            raise CaffeCompatError("CaffeLiftedStructureLoss: the paper's loss compares a batch with itself; "
                                   "give no ref_emb")
        loss = lifted_struct_loss(self.distance.maybe_normalize(embeddings), labels, self.margin, self.caffe_exact)
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}

    def extra_repr(self) -> str:
        return f"margin={self.margin}, caffe_exact={self.caffe_exact}"
