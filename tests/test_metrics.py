"""Metrics against the paper's MATLAB evaluation (Octave fixture) and brute-force references."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from caffe_compat.evaluation import blocks, metrics
from caffe_compat.evaluation.kmeans import kmeans
from caffe_compat.errors import CaffeCompatError
from conftest import REFERENCE, require

FIXTURE = REFERENCE / "eval" / "metrics_n400.npz"


@pytest.fixture
def fixture():
    return np.load(require(FIXTURE))


def matlab_recall(x, labels, ks):
    """compute_recall_at_K, transcribed: full distance matrix, inf diagonal, stable sort."""
    x = np.asarray(x, dtype=np.float64)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")
    return {k: float(np.mean([np.any(labels[order[i, :k]] == labels[i]) for i in range(len(x))])) for k in ks}


def pair_counting(assignments, labels):
    """RI and F1 by looping over all pairs, NMI from its definition: a reference for the
    contingency-table formulas."""
    n = len(labels)
    tp = fp = fn = tn = 0
    for i in range(n):
        for j in range(i + 1, n):
            same_cluster = assignments[i] == assignments[j]
            same_class = labels[i] == labels[j]
            tp += same_cluster and same_class
            fp += same_cluster and not same_class
            fn += same_class and not same_cluster
            tn += not same_cluster and not same_class
    p, r = tp / (tp + fp), tp / (tp + fn)

    def entropy(values):
        _, c = np.unique(values, return_counts=True)
        return -np.sum(c / n * np.log(c / n))

    joint = entropy([f"{a}/{b}" for a, b in zip(assignments, labels)])
    mutual = entropy(assignments) + entropy(labels) - joint
    return {"nmi": 2 * mutual / (entropy(assignments) + entropy(labels)),
            "ri": (tp + tn) / (tp + fp + fn + tn), "f1": 2 * p * r / (p + r)}


def test_fixture_recall_matches_octave(fixture):
    got = metrics.recall_at_k(fixture["embeddings"], fixture["labels"], fixture["recall_k"])
    assert list(got) == [int(k) for k in fixture["recall_k"]]
    np.testing.assert_allclose(list(got.values()), fixture["recall"], rtol=0, atol=1e-9)


def test_fixture_clustering_matches_octave(fixture):
    got = metrics.clustering_scores(fixture["assignments"], fixture["labels"])
    for key in ("nmi", "ri", "f1"):
        assert abs(got[key] - float(fixture[key])) < 1e-9, key


def test_fixture_evaluate_json_shape(fixture):
    result = metrics.evaluate(fixture["embeddings"], fixture["labels"], fixture["recall_k"],
                              assignments=fixture["assignments"])
    assert set(result) == {"recall", "nmi", "f1", "ri", "n", "classes"}
    assert list(result["recall"]) == [str(k) for k in fixture["recall_k"]]
    np.testing.assert_allclose(list(result["recall"].values()), fixture["recall"], atol=1e-9)
    assert result["n"] == 400
    assert result["classes"] == len(np.unique(fixture["labels"]))
    assert abs(result["nmi"] - float(fixture["nmi"])) < 1e-9


def test_fixture_with_own_kmeans_is_sane(fixture):
    result = metrics.evaluate(fixture["embeddings"], fixture["labels"], seed=3)
    assert 0.5 < result["nmi"] <= 1 and 0 < result["f1"] <= 1 and 0.9 < result["ri"] <= 1


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(3, 60), dim=st.integers(1, 4),
       levels=st.integers(1, 3), classes=st.integers(1, 6))
def test_blocked_recall_equals_brute_force_with_ties(seed, n, dim, levels, classes):
    # Small integer coordinates: many exact ties and duplicate points, all exact in float32.
    rng = np.random.default_rng(seed)
    x = rng.integers(0, levels + 1, size=(n, dim)).astype(np.float32)
    labels = rng.integers(0, classes, size=n) * 7 + 100  # non-contiguous ids
    ks = sorted({1, min(2, n - 1), n // 2 or 1, n - 1})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blocks, "BLOCK_BYTES", 4 * n * 5)  # blocks of 5 queries
        assert metrics.recall_at_k(x, labels, ks) == matlab_recall(x, labels, ks)


def test_recall_on_random_float_data_over_many_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    labels = rng.integers(0, 30, size=300)
    ks = (1, 2, 4, 8, 16, 299)
    expected = matlab_recall(x, labels, ks)
    assert metrics.recall_at_k(x, labels, ks) == expected
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 4 * 300 * 7)
    assert metrics.recall_at_k(x, labels, ks) == expected


def test_ties_follow_matlab_index_order():
    # Query 0 sees items 1, 2, 3 at the same distance; only item 3 shares its class.
    x = np.array([[0, 0], [1, 0], [0, 1], [-1, 0], [5, 5]], dtype=np.float32)
    labels = np.array([1, 2, 3, 1, 4])
    ranks = metrics.first_hit_ranks(x, labels)
    assert ranks[0] == 2  # sorted row: 1, 2, 3 (ties by index) -> the hit is third
    assert ranks[4] == 5  # alone in its class: never a hit
    assert metrics.recall_at_k(x, labels, (2, 3)) == matlab_recall(x, labels, (2, 3))


def test_duplicate_of_the_query_counts_only_the_query_is_excluded():
    x = np.array([[0, 0], [0, 0], [3, 0], [0, 3]], dtype=np.float32)
    labels = np.array([1, 1, 2, 2])
    assert metrics.recall_at_k(x, labels, (1,))[1] == matlab_recall(x, labels, (1,))[1] == 0.5


def test_nearest_neighbours_in_stable_order():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, size=(40, 3)).astype(np.float32)
    d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    queries = [0, 7, 39]
    expected = np.argsort(d[queries], axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(metrics.nearest_neighbours(x, queries, 6), expected)


def test_clustering_scores_equal_pair_counting():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 7, size=120) * 3 + 11
    assignments = np.where(rng.random(120) < 0.7, labels, rng.integers(0, 9, size=120)) + 1000
    got = metrics.clustering_scores(assignments, labels)
    expected = pair_counting(assignments, labels)
    for key in ("nmi", "ri", "f1"):
        assert abs(got[key] - expected[key]) < 1e-12, key


def test_clustering_scores_of_a_perfect_clustering():
    labels = np.repeat([5, 9, 13], 4)
    assert metrics.clustering_scores(labels + 100, labels) == pytest.approx({"nmi": 1, "ri": 1, "f1": 1})


def blobs(classes=12, per_class=30, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dim)) * 20
    labels = np.repeat(np.arange(classes), per_class)
    x = centers[labels] + rng.standard_normal((len(labels), dim)) * 0.5
    return x.astype(np.float32), labels


def test_kmeans_recovers_well_separated_clusters():
    x, labels = blobs()
    result = kmeans(x, 12, seed=0)
    assert result.converged and result.iterations <= 10
    assert metrics.clustering_scores(result.assignments, labels)["nmi"] > 0.99
    assert result.centers.shape == (12, 16) and result.centers.dtype == np.float32
    assert result.inertia == pytest.approx(((x - result.centers[result.assignments]) ** 2).sum(), rel=1e-4)


def test_kmeans_far_from_the_origin():
    # |x|^2 ~ 1.6e11 here: float32 rounding of the expanded distance would swamp the
    # clusters' separation without centring.
    x, labels = blobs()
    result = kmeans(x + 1e5, 12, seed=0)
    assert metrics.clustering_scores(result.assignments, labels)["nmi"] > 0.99
    means = np.stack([x[labels == c].mean(0) for c in range(12)]) + 1e5
    order = [np.bincount(labels[result.assignments == j]).argmax() for j in range(12)]
    np.testing.assert_allclose(result.centers, means[order], atol=0.1)


def test_kmeans_plus_plus_seeds_every_tight_pair_once():
    # 300 far-apart pairs of near-identical points: k-means++ almost surely seeds each
    # pair once. More seeds than one refresh batch (256), so the rejection step that
    # accounts for seeds not yet folded into D is what keeps partners out.
    rng = np.random.default_rng(3)
    pair = np.repeat(np.arange(300), 2)
    x = (rng.uniform(0, 1000, size=(300, 8))[pair] + rng.normal(0, 1e-3, size=(600, 8))).astype(np.float32)
    result = kmeans(x, 300, seed=0)
    assert result.iterations <= 2
    assert metrics.clustering_scores(result.assignments, pair)["nmi"] == pytest.approx(1)


def test_kmeans_is_deterministic_for_a_seed():
    x, _ = blobs(classes=20, per_class=15, dim=8, seed=4)
    x += np.random.default_rng(5).standard_normal(x.shape).astype(np.float32) * 10  # overlapping clusters
    first = kmeans(x, 20, seed=7)
    second = kmeans(x, 20, seed=7)
    np.testing.assert_array_equal(first.assignments, second.assignments)
    np.testing.assert_array_equal(first.centers, second.centers)
    assert first.iterations == second.iterations


def test_kmeans_blocked_assignment_equals_unblocked(monkeypatch):
    x, _ = blobs(classes=10, per_class=20, dim=8, seed=6)
    x += np.random.default_rng(7).standard_normal(x.shape).astype(np.float32) * 15
    whole = kmeans(x, 10, seed=1)
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 4 * 10 * 9)  # 9 points per block
    blocked = kmeans(x, 10, seed=1)
    np.testing.assert_array_equal(whole.assignments, blocked.assignments)


def test_kmeans_with_fewer_distinct_points_than_clusters():
    x = np.repeat(np.array([[0, 0], [10, 10]], dtype=np.float32), 5, axis=0)
    result = kmeans(x, 4, seed=0)
    assert result.converged
    assert len(np.unique(result.assignments)) == 2  # two clusters stay empty
    assert metrics.clustering_scores(result.assignments, np.repeat([0, 1], 5))["nmi"] == pytest.approx(1)


def test_kmeans_reports_progress():
    x, _ = blobs(classes=4, per_class=10, dim=4)
    seen = []
    result = kmeans(x, 4, progress=lambda i, changed: seen.append((i, changed)))
    assert [i for i, _ in seen] == list(range(1, result.iterations + 1))
    assert seen[0][1] == len(x) and seen[-1][1] == 0


def test_torch_inputs_are_accepted():
    x, labels = blobs(classes=3, per_class=5, dim=4)
    from_numpy = metrics.evaluate(x, labels, (1, 2))
    from_torch = metrics.evaluate(torch.from_numpy(x), torch.from_numpy(labels), (1, 2))
    assert from_numpy == from_torch


@pytest.mark.parametrize("change, message", [
    (lambda x, y: (x, None), "labels: missing"),
    (lambda x, y: (x[:, 0], y), "2-D"),
    (lambda x, y: (x, y[:-1]), "labels: 14 labels for 15 rows"),
    (lambda x, y: (np.where(np.arange(15)[:, None] == 3, np.nan, x), y), "row 3 contains NaN"),
    (lambda x, y: (np.where(np.arange(15)[:, None] == 4, np.inf, x), y), "row 4 contains inf"),
])
def test_bad_inputs_are_named(change, message):
    x, labels = blobs(classes=3, per_class=5, dim=4)
    bad_x, bad_labels = change(x, labels)
    with pytest.raises(CaffeCompatError, match=message):
        metrics.evaluate(bad_x, bad_labels)


@pytest.mark.parametrize("recall_k, message", [
    ((1, 15), "K=15 is larger than n-1=14"),
    ((0,), "K=0 is not a positive integer"),
    ((1.5,), "not a positive integer"),
    ((), "no K given"),
])
def test_bad_recall_k(recall_k, message):
    x, labels = blobs(classes=3, per_class=5, dim=4)
    with pytest.raises(CaffeCompatError, match=message):
        metrics.evaluate(x, labels, recall_k)


def test_assignments_of_the_wrong_length():
    x, labels = blobs(classes=3, per_class=5, dim=4)
    with pytest.raises(CaffeCompatError, match="assignments: 14 cluster ids for 15 labels"):
        metrics.evaluate(x, labels, assignments=labels[:-1])


def test_unavailable_device_is_a_clear_error(monkeypatch):
    x, labels = blobs(classes=3, per_class=5, dim=4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also runs where CUDA is present
    with pytest.raises(CaffeCompatError, match="CUDA is not available"):
        metrics.recall_at_k(x, labels, (1,), device="cuda")


def test_long_kmeans_runs_show_progress(monkeypatch, capsys):
    from caffe_compat.evaluation import kmeans as kmeans_module

    x, labels = blobs(classes=4, per_class=10, dim=4)
    monkeypatch.setattr(kmeans_module, "KMEANS_PROGRESS_FROM", 40 * 4)
    metrics.evaluate(x, labels, (1,), progress=True)
    err = capsys.readouterr().err
    assert "k-means (40 points, 4 clusters)" in err and "moved" in err
    monkeypatch.setattr(kmeans_module, "KMEANS_PROGRESS_FROM", 40 * 4 + 1)
    metrics.evaluate(x, labels, (1,), progress=True)
    assert capsys.readouterr().err == ""
