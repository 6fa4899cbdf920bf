"""Batches for metric learning from image lists, in place of the list order:
  "pairs"   batch_size/2 pairs of same-class images (the paper's layout), or
  "pk:P,K"  P classes x K images per batch (P*K == batch_size).
Caffe's schema has no field for this, hence an option outside the prototxt (`--sampler`).
ClassBatchSampler gives the same batches to a torch DataLoader (`batch_sampler=`).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import CaffeCompatError

SAMPLER_SPECS = "sequential, pairs or pk:P,K"


def parse_sampler(spec: str, batch_size: Optional[int], where: str) -> Optional[Tuple[int, int]]:
    """(classes, images per class) of a batch for `spec`; None for 'sequential' (Caffe's
    order). With batch_size None only the spelling is checked."""
    spec = spec.strip().lower()
    if spec == "sequential":
        return None
    if spec == "pairs":
        if batch_size is None:
            return None
        if batch_size % 2:
            raise CaffeCompatError(f"{where}: the pairs sampler needs an even batch_size, got {batch_size}")
        return batch_size // 2, 2
    if spec.startswith("pk:"):
        try:
            classes, per_class = (int(v) for v in spec[3:].split(","))
        except ValueError:
            raise CaffeCompatError(f"sampler '{spec}': expected pk:P,K with two integers") from None
        if classes < 1 or per_class < 1:
            raise CaffeCompatError(f"sampler '{spec}': P and K must be at least 1")
        if batch_size is not None and classes * per_class != batch_size:
            raise CaffeCompatError(f"{where}: sampler pk:{classes},{per_class} gives {classes * per_class} "
                                   f"images per batch, batch_size is {batch_size}")
        return classes, per_class
    raise CaffeCompatError(f"unknown sampler '{spec}': expected {SAMPLER_SPECS}")


class BatchSampler:
    """Draws the indices of one batch: `classes` labels, then `per_class` images of each
    (with replacement only where a label has too few)."""

    def __init__(self, classes: int, per_class: int, labels: Sequence[int], where: str, spec: str):
        labels = np.asarray(labels)
        self.classes, self.per_class = classes, per_class
        self.members: Dict[int, np.ndarray] = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
        if len(self.members) < 2:
            raise CaffeCompatError(f"{where} has {len(self.members)} class(es); the {spec} sampler needs at "
                                   f"least 2")
        self.names = np.asarray(sorted(self.members))

    def draw(self, rng: np.random.Generator) -> List[int]:
        chosen = rng.choice(self.names, size=self.classes, replace=len(self.names) < self.classes)
        indices = []
        for label in chosen:
            members = self.members[int(label)]
            indices.extend(rng.choice(members, size=self.per_class, replace=len(members) < self.per_class).tolist())
        return indices


class ClassBatchSampler(torch.utils.data.Sampler):
    """A DataLoader's `batch_sampler` drawing batches as `--sampler` does: 'pairs' (the
    paper's batches: batch_size/2 classes, two images of each) or 'pk:P,K'.

    labels: one per dataset item (a sequence or 1-d tensor); batches: per epoch, by default
    len(labels) // batch_size. Epochs differ; the whole run is fixed by `seed`."""

    def __init__(self, labels, batch_size: int, spec: str = "pairs", batches: Optional[int] = None, seed: int = 0):
        super().__init__()
        where = "ClassBatchSampler"
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise CaffeCompatError(f"{where}: labels must be one integer per item, got shape {labels.shape} "
                                   f"of {labels.dtype}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise CaffeCompatError(f"{where}: batch_size must be a positive integer, got {batch_size!r}")
        shape = parse_sampler(spec, batch_size, where)
        if shape is None:
            raise CaffeCompatError(f"{where}: 'sequential' is the DataLoader's own order; expected pairs or pk:P,K")
        if batches is None:
            batches = len(labels) // batch_size
            if not batches:
                raise CaffeCompatError(f"{where}: {len(labels)} items make no batch of {batch_size}")
        elif isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise CaffeCompatError(f"{where}: batches must be a positive integer, got {batches!r}")
        self.batches = batches
        self.sampler = BatchSampler(*shape, labels, f"{where}'s labels", spec.strip().lower())
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(self.batches):
            yield self.sampler.draw(self.rng)
