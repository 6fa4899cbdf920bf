"""Losses of the paper's Caffe fork as PyTorch modules."""
from .distributed import DistributedLiftedStructSimilaritySoftmaxLoss
from .lifted import LiftedStructSimilaritySoftmaxLoss, NoPositivePairsWarning, lifted_struct_loss

__all__ = ["DistributedLiftedStructSimilaritySoftmaxLoss", "LiftedStructSimilaritySoftmaxLoss",
           "NoPositivePairsWarning", "lifted_struct_loss"]
