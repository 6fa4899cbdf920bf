"""k-means as the paper's evaluation runs it (vgg_kmeans.m): k-means++ seeding, Lloyd
iterations, in blocks of points so that no n x k matrix is held."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from ..devices import resolve_device
from ..errors import CaffeCompatError
from .blocks import rows_per_block

# k-means shows progress from n x k = 5e7 on (CUB's 5,924 x 100 is quick; SOP's 60,502 x
# 11,316 takes minutes on a CPU).
KMEANS_PROGRESS_FROM = 50_000_000


def _centred(x: np.ndarray) -> np.ndarray:
    """x minus its mean, float32, for k-means. |x|^2 + |c|^2 - 2 x.c loses precision with
    the norms, and vgg_kmiter's direct double-precision differences don't; centring
    (distances unchanged) recovers most of it for features far from the origin, e.g.
    ReLU outputs. Recall keeps the raw values: MATLAB's own single-precision expansion
    on them decides its ties, e.g. between quantised embeddings."""
    return (x - x.mean(0, dtype=np.float64)).astype(np.float32)


@dataclass(frozen=True)
class KMeansResult:
    assignments: np.ndarray  # (n,) int64: index of each point's center
    centers: np.ndarray  # (k, d) float32
    iterations: int  # Lloyd iterations run
    converged: bool  # an iteration changed no assignment
    inertia: float  # sum of squared distances to the assigned centers


def _nearest_centers(x: torch.Tensor, sq: torch.Tensor, centers: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(index, squared distance) of each point's nearest center, in blocks of points.
    Ties go to the lowest center index, as vgg_kmiter's strict `<` does."""
    center_sq = (centers * centers).sum(1)
    index = torch.empty(len(x), dtype=torch.int64, device=x.device)
    dist = torch.empty(len(x), dtype=x.dtype, device=x.device)
    block = rows_per_block(len(centers))
    for lo in range(0, len(x), block):
        hi = min(lo + block, len(x))
        d = torch.addmm(center_sq[None, :], x[lo:hi], centers.T, alpha=-2.0)
        best = d.min(1)
        index[lo:hi] = best.indices
        dist[lo:hi] = best.values + sq[lo:hi]
    return index, dist.clamp_(min=0)


def _seed_distances(x: torch.Tensor, sq: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Squared distance of each point to its nearest point of `seeds`, in blocks."""
    seed_sq = (seeds * seeds).sum(1)
    out = torch.empty(len(x), dtype=x.dtype, device=x.device)
    block = rows_per_block(len(seeds))
    for lo in range(0, len(x), block):
        hi = min(lo + block, len(x))
        out[lo:hi] = torch.addmm(seed_sq[None, :], x[lo:hi], seeds.T, alpha=-2.0).min(1).values + sq[lo:hi]
    return out.clamp_(min=0)


def _kmeans_plus_plus(x_np: np.ndarray, x: torch.Tensor, sq: torch.Tensor, k: int,
                      rng: np.random.Generator, batch: int = 256) -> np.ndarray:
    """Indices of k seeds drawn by k-means++ (Arthur & Vassilvitskii 2007): each next
    seed with probability proportional to its squared distance D to the nearest seed.

    A pass over all points per seed would read the whole matrix k times (minutes for
    SOP). Instead D is refreshed only once per `batch` seeds, as one matrix product;
    in between, a point drawn from the stale D is accepted with probability
    D_now / D_stale, D_now counting the seeds not yet folded in. Rejection sampling
    makes the accepted draw exactly the k-means++ distribution."""
    n = len(x_np)
    chosen = [int(rng.integers(n))]
    pending = list(chosen)
    stale = np.full(n, np.inf)
    weights = np.zeros(n)
    rejections = 0
    while len(chosen) < k:
        if pending and (len(chosen) == 1 or len(pending) == batch or rejections == batch):
            seeds = x[torch.from_numpy(np.array(pending)).to(x.device)]
            stale = np.minimum(stale, _seed_distances(x, sq, seeds).double().cpu().numpy())
            stale[chosen] = 0  # rounding must not make a seed drawable again
            weights = np.cumsum(stale)
            pending, rejections = [], 0
        if weights[-1] <= 0:
            # Fewer distinct points than k: every point coincides with a seed. Take an
            # unused index so that seeds stay distinct items.
            unused = np.setdiff1d(np.arange(n), chosen)
            chosen.append(int(unused[rng.integers(len(unused))]))
            continue
        candidate = min(int(np.searchsorted(weights, rng.random() * weights[-1], side="right")), n - 1)
        now = stale[candidate]
        if pending:
            gap = x_np[pending] - x_np[candidate]
            now = min(now, float(np.einsum("ij,ij->i", gap, gap).min()))
        if rng.random() * stale[candidate] < now:
            chosen.append(candidate)
            pending.append(candidate)
        else:
            rejections += 1
    return np.array(chosen, dtype=np.int64)


def _cluster_means(x: torch.Tensor, index: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Mean of each cluster's points; an empty cluster keeps its old center (vgg_kmiter
    would move it to the origin). Sums come from a float64 prefix sum over the points
    sorted by cluster: unlike index_add_ (atomics on CUDA) it is deterministic."""
    k = len(old)
    counts = torch.bincount(index, minlength=k)
    order = torch.argsort(index, stable=True)
    prefix = torch.zeros(len(x) + 1, x.shape[1], dtype=torch.float64, device=x.device)
    torch.cumsum(x[order].double(), 0, out=prefix[1:])
    ends = torch.cumsum(counts, 0)
    sums = prefix[ends] - prefix[ends - counts]
    means = (sums / counts.clamp(min=1)[:, None].double()).to(x.dtype)
    return torch.where((counts > 0)[:, None], means, old)


def kmeans(embeddings, k: int, seed: int = 0, max_iter: int = 1000, device="cpu",
           progress: Optional[Callable[[int, int], None]] = None) -> KMeansResult:
    """k-means++ seeding, then Lloyd iterations until no assignment changes, or the sum
    of squared distances stops decreasing (vgg_kmeans.m's rule, which also ends cycles
    that rounding can cause), or max_iter. Same seed, same device: same result.
    `progress(iteration, changed)` is called after each iteration with the number of
    points that changed cluster (all n on the first)."""
    dev = resolve_device(device, "device")
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    raw = np.asarray(embeddings, dtype=np.float32)
    if raw.ndim != 2 or not np.isfinite(raw).all():
        raise CaffeCompatError("embeddings: k-means needs a finite 2-D array (n x d)")
    n = len(raw)
    if not 1 <= k <= n:
        raise CaffeCompatError(f"k: {k} clusters asked of {n} points")
    if max_iter < 1:
        raise CaffeCompatError(f"max_iter: must be at least 1, got {max_iter}")
    rng = np.random.default_rng(int(seed))
    x_np = _centred(raw)
    x = torch.from_numpy(x_np).to(dev)
    sq = (x * x).sum(1)
    centers = x[torch.from_numpy(_kmeans_plus_plus(x_np, x, sq, k, rng)).to(dev)].clone()
    index = torch.full((n,), -1, dtype=torch.int64, device=dev)
    converged = False
    iterations = 0
    previous_sse = sse = float("inf")
    while iterations < max_iter:
        new_index, dist = _nearest_centers(x, sq, centers)
        iterations += 1
        changed = int(torch.count_nonzero(new_index != index))
        sse = float(dist.double().sum())
        if progress is not None:
            progress(iterations, changed)
        index = new_index
        if changed == 0 or sse >= previous_sse:
            converged = True
            break
        previous_sse = sse
        centers = _cluster_means(x, index, centers)
    mean = raw.mean(0, dtype=np.float64)
    return KMeansResult(assignments=index.cpu().numpy(), centers=(centers.cpu().numpy() + mean).astype(np.float32),
                        iterations=iterations, converged=converged, inertia=sse)


def kmeans_progress(n: int, k: int):
    """A `progress` callback for `kmeans` that shows each iteration and how many points
    moved (a bar on a terminal, a periodic line in a log) when the run is long (n x k
    from KMEANS_PROGRESS_FROM on), else None; returns (callback, close). The count of
    iterations is not known ahead: no time left is guessed."""
    if n * k < KMEANS_PROGRESS_FROM:
        return None, lambda: None
    from ..tools.progress import progress

    title = f"k-means ({n:,} points, {k:,} clusters)"
    bar = progress(total=None, desc=title, unit="iteration")

    def update(iteration: int, changed: int) -> None:
        bar.set_description_str(f"{title}, {changed:,} moved", refresh=False)
        bar.update(1)

    return update, bar.close
