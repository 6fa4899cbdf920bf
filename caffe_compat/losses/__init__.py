"""Losses of the paper's Caffe fork as PyTorch modules."""
from .lifted import LiftedStructSimilaritySoftmaxLoss, NoPositivePairsWarning, lifted_struct_loss

__all__ = ["LiftedStructSimilaritySoftmaxLoss", "NoPositivePairsWarning", "lifted_struct_loss"]
