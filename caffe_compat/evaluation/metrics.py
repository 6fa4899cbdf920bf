"""Retrieval and clustering metrics as the paper's MATLAB evaluation computes them.

Recall@K follows `compute_recall_at_K` (code/evaluation/evaluate_recall.m): Euclidean
distances on the raw embeddings, the query's own entry set to inf, the row sorted with
MATLAB's stable `sort`, and a hit when any of the first K has the query's class.
NMI, RI and F1 follow `compute_clutering_metric.m` on a k-means clustering with as many
clusters as classes (`evaluate_clustering.m`; the k-means is in kmeans.py).

Everything quadratic runs on blocks of rows so that no n x n matrix is ever held.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from ..devices import resolve_device
from ..errors import CaffeCompatError
from .blocks import rows_per_block

DEFAULT_RECALL_K = (1, 2, 4, 8)
def check_embeddings(embeddings, labels, name: str = "embeddings") -> Tuple[np.ndarray, np.ndarray]:
    """(float32 n x d embeddings, n labels) or a CaffeCompatError naming what is wrong."""
    if labels is None:
        raise CaffeCompatError(f"labels: missing; {name} cannot be evaluated without class labels")
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise CaffeCompatError(f"{name}: expected a non-empty 2-D array (n x d), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise CaffeCompatError(f"{name}: expected real numbers, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        what = "NaN" if np.isnan(x[row]).any() else "inf (or a value too large for float32)"
        raise CaffeCompatError(f"{name}: row {row} contains {what} ({int(bad.sum())} bad rows in all)")
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1:
        raise CaffeCompatError(f"labels: expected a 1-D array, got shape {y.shape}")
    if len(y) != len(x):
        raise CaffeCompatError(f"labels: {len(y)} labels for {len(x)} rows of {name}")
    return x, y


def _class_codes(labels: np.ndarray) -> np.ndarray:
    """Labels of any type (non-contiguous ids, strings) as 0..C-1."""
    return np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)


def first_hit_ranks(embeddings: np.ndarray, labels: np.ndarray, device="cpu") -> np.ndarray:
    """For each query, the 0-based position of its first same-class item in MATLAB's
    stable ascending sort of its distance row (itself excluded); n when it has none.

    Recall@K is then mean(rank < K) for every K at once. This is exact for ties: the
    stable sort puts equal distances in index order, so the first hit's position is
    #(d < d*) + #(d == d*, index < j*) for the nearest same-class item j* (smallest index
    among equals). torch.topk would leave the order of ties unspecified, and with
    K = 1000 it costs about as much as the distance product itself on CPU.
    """
    dev = resolve_device(device, "device")
    x, y = check_embeddings(embeddings, labels)
    n = len(x)
    codes = _class_codes(y)
    # Members of each class in index order, as offsets into one class-sorted array.
    by_class = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    xt = torch.from_numpy(x).to(dev)
    sq = (xt * xt).sum(1)
    by_class_t = torch.from_numpy(by_class).to(dev)
    codes_t = torch.from_numpy(codes).to(dev)
    sizes_t = torch.from_numpy(sizes).to(dev)
    starts_t = torch.from_numpy(starts).to(dev)
    columns = torch.arange(n, device=dev)
    ranks = torch.empty(n, dtype=torch.int64, device=dev)
    block = rows_per_block(n)
    dist_buffer = torch.empty(min(block, n), n, device=dev)
    # Comparisons written as 0/1 floats and summed: far faster than counting bools on
    # CPU, and exact while a row has fewer than 2^24 entries.
    flag_buffer = torch.empty_like(dist_buffer)
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        rows = torch.arange(hi - lo, device=dev)
        # |x_j|^2 - 2 q.x_j: MATLAB's sqrt(abs(|q|^2 + |x_j|^2 - 2 q.x_j)) without the
        # per-row constant and the monotone sqrt, which leave the order unchanged.
        dist = torch.addmm(sq[None, :], xt[lo:hi], xt.T, alpha=-2.0, out=dist_buffer[:hi - lo])
        dist[rows, lo + rows] = float("inf")

        query_codes = codes_t[lo:hi]
        width = int(sizes[codes[lo:hi]].max())
        slots = torch.arange(width, device=dev)
        valid = slots[None, :] < sizes_t[query_codes][:, None]
        member_pos = (starts_t[query_codes][:, None] + slots[None, :]).clamp(max=n - 1)
        members = by_class_t[member_pos]
        member_dist = dist.gather(1, members).masked_fill(~valid, float("inf"))
        nearest = member_dist.min(1).values
        first_slot = (member_dist == nearest[:, None]).to(torch.uint8).argmax(1)
        nearest_index = members[rows, first_slot]

        flags = flag_buffer[:hi - lo]
        before = torch.lt(dist, nearest[:, None], out=flags).sum(1).long()
        at_most = torch.le(dist, nearest[:, None], out=flags).sum(1).long()
        tied = (at_most - before > 1).nonzero().flatten()
        if len(tied):
            equal_before = (dist[tied] == nearest[tied, None]) & (columns[None, :] < nearest_index[tied, None])
            before[tied] += torch.count_nonzero(equal_before, dim=1)
        before[torch.isinf(nearest)] = n  # no other item of its class: never a hit
        ranks[lo:hi] = before
    return ranks.cpu().numpy()


def _check_recall_k(recall_k: Sequence[int], n: int) -> Tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in recall_k)
    except (TypeError, ValueError):
        raise CaffeCompatError(f"recall_k: expected integers, got {recall_k!r}") from None
    if not ks:
        raise CaffeCompatError("recall_k: no K given")
    for k, raw in zip(ks, recall_k):
        if k != raw or k < 1:
            raise CaffeCompatError(f"recall_k: K={raw!r} is not a positive integer")
        if k > n - 1:
            raise CaffeCompatError(f"recall_k: K={k} is larger than n-1={n - 1} (the other items of {n})")
    return ks


def recall_at_k(embeddings, labels, recall_k: Sequence[int] = DEFAULT_RECALL_K, device="cpu") -> Dict[int, float]:
    """{K: fraction of queries with a same-class item among their K nearest}."""
    x, y = check_embeddings(embeddings, labels)
    ks = _check_recall_k(recall_k, len(x))
    ranks = first_hit_ranks(x, y, device)
    return {k: int(np.count_nonzero(ranks < k)) / len(x) for k in ks}


def nearest_neighbours(embeddings, queries: Sequence[int], k: int, device="cpu") -> np.ndarray:
    """(len(queries) x k) indices of each query's k nearest items, itself excluded, in
    the order MATLAB's stable sort gives (ties by index). Sorts whole rows: meant for
    the handful of queries a figure shows."""
    dev = resolve_device(device, "device")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = len(x)
    if not 1 <= k <= n - 1:
        raise CaffeCompatError(f"k: {k} neighbours asked of {n} items (at most n-1)")
    query_index = np.asarray(queries, dtype=np.int64).reshape(-1)
    if query_index.size and (query_index.min() < 0 or query_index.max() >= n):
        raise CaffeCompatError(f"queries: indices must lie in 0..{n - 1}")
    xt = torch.from_numpy(x).to(dev)
    sq = (xt * xt).sum(1)
    found = []
    block = rows_per_block(n)
    for lo in range(0, len(query_index), block):
        q = torch.from_numpy(query_index[lo:lo + block]).to(dev)
        dist = torch.addmm(sq[None, :], xt[q], xt.T, alpha=-2.0)
        dist[torch.arange(len(q), device=dev), q] = float("inf")
        found.append(torch.sort(dist, dim=1, stable=True).indices[:, :k].cpu())
    if not found:
        return np.zeros((0, k), dtype=np.int64)
    return torch.cat(found).numpy()


def _pairs(counts: np.ndarray) -> int:
    """sum of nchoosek(c, 2), exact in integers."""
    c = counts.astype(np.int64)
    return int((c * (c - 1) // 2).sum())


def clustering_scores(assignments, labels) -> Dict[str, float]:
    """NMI, RI and F1 (beta 1, pair counting) exactly as compute_clutering_metric.m,
    from the sparse contingency table of (cluster, class) instead of its loops."""
    if isinstance(assignments, torch.Tensor):
        assignments = assignments.detach().cpu().numpy()
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    a = np.asarray(assignments).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if len(a) != len(y):
        raise CaffeCompatError(f"assignments: {len(a)} cluster ids for {len(y)} labels")
    n = len(y)
    if n < 2:
        raise CaffeCompatError(f"labels: clustering metrics need at least 2 items, got {n}")
    cluster = _class_codes(a)
    item = _class_codes(y)
    count_cluster = np.bincount(cluster).astype(np.float64)
    count_item = np.bincount(item).astype(np.float64)
    pair_codes, count_cross = np.unique(cluster * len(count_item) + item, return_counts=True)
    k_of = pair_codes // len(count_item)
    j_of = pair_codes % len(count_item)

    # Natural log, each term written as the MATLAB code writes it.
    cross = count_cross.astype(np.float64)
    mutual = float(np.sum(cross / n * np.log(n * cross / (count_cluster[k_of] * count_item[j_of]))))
    h_cluster = float(np.sum(-count_cluster / n * np.log(count_cluster / n)))
    h_item = float(np.sum(-count_item / n * np.log(count_item / n)))
    # 0/0 only when both partitions are a single group, i.e. identical.
    nmi = 2 * mutual / (h_cluster + h_item) if h_cluster + h_item > 0 else 1.0

    tp_fp = _pairs(count_cluster)
    tp = _pairs(count_cross)
    fp = tp_fp - tp
    fn = _pairs(count_item) - tp
    tn = n * (n - 1) // 2 - tp - fp - fn
    ri = (tp + tn) / (tp + fp + fn + tn)
    # MATLAB yields NaN where a denominator is 0 (no pair shares a cluster or a class);
    # those cases score 0 here so that results stay valid JSON numbers.
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    beta = 1.0
    denominator = beta * beta * precision + recall
    f1 = (beta * beta + 1) * precision * recall / denominator if denominator else 0.0
    return {"nmi": nmi, "ri": ri, "f1": f1}


def evaluate(embeddings, labels, recall_k: Sequence[int] = DEFAULT_RECALL_K, assignments=None,
             seed: int = 0, device="cpu", progress: bool = False) -> dict:
    """Recall@K, NMI, F1 and RI as the paper reports them (fractions, not percent).

    Without `assignments`, the clustering is k-means with as many clusters as classes;
    `progress` shows its iterations when the run is long (`kmeans_progress`)."""
    x, y = check_embeddings(embeddings, labels)
    ks = _check_recall_k(recall_k, len(x))
    ranks = first_hit_ranks(x, y, device)
    classes = len(np.unique(y))
    if assignments is None:
        from .kmeans import kmeans, kmeans_progress

        update, close = kmeans_progress(len(x), classes) if progress else (None, lambda: None)
        try:
            assignments = kmeans(x, classes, seed=seed, device=device, progress=update).assignments
        finally:
            close()
    scores = clustering_scores(assignments, y)
    return {
        "recall": {str(k): int(np.count_nonzero(ranks < k)) / len(x) for k in ks},
        "nmi": scores["nmi"],
        "f1": scores["f1"],
        "ri": scores["ri"],
        "n": len(x),
        "classes": classes,
    }
