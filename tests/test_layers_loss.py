"""The standard losses and Accuracy against loop references transcribed from Caffe's
Forward_cpu / Backward_cpu (including where Caffe's backward is not the exact derivative
of its forward), and the label bottoms' missing gradients."""
import math

import numpy as np
import pytest
import torch

from caffe_compat.errors import CaffeCompatError
from layer_harness import build, rel_err

RNG = np.random.default_rng(11)
FLT_MIN = np.float32(1.17549435e-38)


def loss_and_grads(module, arrays, weight=1.0):
    """The loss and every bottom's gradient (None where none flows) after backward with
    top diff `weight` (what the net seeds with loss_weight)."""
    bottoms = [torch.tensor(np.asarray(a, np.float32), requires_grad=True) for a in arrays]
    out = module(*bottoms)
    value = out[0] if isinstance(out, tuple) else out
    assert value.shape == ()
    value.backward(torch.tensor(weight))
    return value.item(), [None if b.grad is None else b.grad.numpy() for b in bottoms]


def normal(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def labels(count, classes):
    return RNG.integers(0, classes, count).astype(np.float32)


# ---------------------------------------------------------------- SoftmaxWithLoss

def caffe_softmax_loss(x, label, axis, ignore_label, normalization, weight):
    """SoftmaxWithLossLayer::Forward_cpu / Backward_cpu, loop for loop."""
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    prob = e / e.sum(axis=axis, keepdims=True)
    outer, classes = int(np.prod(x.shape[:axis])), x.shape[axis]
    inner = x.size // (outer * classes)
    p = prob.reshape(outer, classes, inner)
    diff = p.copy()
    total, count = 0.0, 0
    for i in range(outer):
        for j in range(inner):
            value = int(label[i * inner + j])
            if ignore_label is not None and value == ignore_label:
                diff[i, :, j] = 0
                continue
            total -= math.log(max(p[i, value, j], FLT_MIN))
            diff[i, value, j] -= 1
            count += 1
    normalizer = {"FULL": outer * inner, "VALID": count, "BATCH_SIZE": outer, "NONE": 1}[normalization]
    normalizer = max(1.0, normalizer)
    return total / normalizer, (diff * weight / normalizer).reshape(x.shape), prob


@pytest.mark.parametrize("normalization", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
@pytest.mark.parametrize("ignore", [None, 2])
def test_softmax_loss_normalizations_and_ignore_label(normalization, ignore):
    x, label = normal(6, 5), labels(6, 5)
    label[1] = 2
    params = f"loss_param {{ normalization: {normalization} " + ("" if ignore is None else
                                                                   f"ignore_label: {ignore}") + " }"
    _, layer = build("SoftmaxWithLoss", params, [x.shape, label.shape])
    value, (dx, dlabel) = loss_and_grads(layer.module, [x, label], weight=0.7)
    expected, expected_dx, _ = caffe_softmax_loss(x, label, 1, ignore, normalization, 0.7)
    assert value == pytest.approx(expected, rel=1e-6)
    assert rel_err(dx, expected_dx) < 1e-6
    assert dlabel is None


@pytest.mark.parametrize("normalize,mode", [("true", "VALID"), ("false", "BATCH_SIZE")])
def test_softmax_loss_legacy_normalize_flag(normalize, mode):
    x, label = normal(2, 4, 3, 5), labels(30, 4)
    _, layer = build("SoftmaxWithLoss", f"loss_param {{ normalize: {normalize} ignore_label: 0 }}",
                     [x.shape, (2, 1, 3, 5)])
    value, (dx, _) = loss_and_grads(layer.module, [x, label.reshape(2, 1, 3, 5)])
    expected, expected_dx, _ = caffe_softmax_loss(x, label, 1, 0, mode, 1.0)
    assert value == pytest.approx(expected, rel=1e-6)
    assert rel_err(dx, expected_dx) < 1e-6


def test_softmax_loss_spatial_axis_and_probability_top():
    x, label = normal(2, 3, 4, 5), labels(2 * 3 * 5, 4)
    _, layer = build("SoftmaxWithLoss", "softmax_param { axis: 2 } loss_param { ignore_label: 1 }",
                     [x.shape, (2, 3, 5)], tops=2)
    assert layer.top_shapes == [(), (2, 3, 4, 5)]
    scores = torch.tensor(x, requires_grad=True)
    value, prob = layer.module(scores, torch.tensor(label.reshape(2, 3, 5)))
    # Caffe's backward ignores the probability top's diff
    (value + 100 * prob.sum()).backward()
    expected, expected_dx, expected_prob = caffe_softmax_loss(x, label, 2, 1, "VALID", 1.0)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert rel_err(prob.detach().numpy(), expected_prob) < 1e-6
    assert rel_err(scores.grad.numpy(), expected_dx) < 1e-6


def test_softmax_loss_clamps_like_caffe_and_keeps_its_gradient():
    x = np.array([[0.0, 200.0, -200.0], [1.0, 2.0, 3.0]], np.float32)  # p(label 0) underflows to 0
    label = np.array([0, 2], np.float32)
    _, layer = build("SoftmaxWithLoss", "", [x.shape, label.shape])
    value, (dx, _) = loss_and_grads(layer.module, [x, label])
    expected, expected_dx, _ = caffe_softmax_loss(x, label, 1, None, "VALID", 1.0)
    assert value == pytest.approx(expected, rel=1e-6)
    second = -(3.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(3.0)))
    assert value == pytest.approx((-math.log(FLT_MIN) + second) / 2, rel=1e-6)
    assert dx[0, 0] == pytest.approx(-0.5)  # (p - 1) / 2 although the clamp bit
    assert rel_err(dx, expected_dx) < 1e-6


def test_softmax_loss_all_ignored_is_zero_without_nan():
    x, label = normal(3, 4), np.full(3, 7, np.float32)
    _, layer = build("SoftmaxWithLoss", "loss_param { ignore_label: 7 }", [x.shape, label.shape])
    value, (dx, _) = loss_and_grads(layer.module, [x, label])
    assert value == 0 and np.all(dx == 0)


def test_softmax_loss_rejects_mismatched_labels():
    with pytest.raises(CaffeCompatError, match="labels"):
        build("SoftmaxWithLoss", "", [(4, 5, 2), (4,)])


# ---------------------------------------------------------------- Accuracy

def caffe_accuracy(x, label, axis, top_k, ignore_label):
    outer, classes = int(np.prod(x.shape[:axis])), x.shape[axis]
    inner = x.size // (outer * classes)
    data = x.reshape(outer, classes, inner)
    hits, count = 0, 0
    per_class_hits, per_class_count = np.zeros(classes), np.zeros(classes)
    for i in range(outer):
        for j in range(inner):
            value = int(label[i * inner + j])
            if ignore_label is not None and value == ignore_label:
                continue
            per_class_count[value] += 1
            better = -1
            k = 0
            while k < classes and better < top_k:
                better += data[i, k, j] >= data[i, value, j]
                k += 1
            if better < top_k:
                hits += 1
                per_class_hits[value] += 1
            count += 1
    per_class = np.where(per_class_count == 0, 0, per_class_hits / np.maximum(per_class_count, 1))
    return (0 if count == 0 else hits / count), per_class


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("ignore", [None, 1])
def test_accuracy_with_ties_and_per_class_top(top_k, ignore):
    x = np.round(normal(9, 5, 2) * 2) / 2  # coarse values: ties with the true class
    label = labels(18, 5)
    params = f"accuracy_param {{ top_k: {top_k} " + ("" if ignore is None else f"ignore_label: {ignore}") + " }"
    _, layer = build("Accuracy", params, [x.shape, (9, 2)], tops=2)
    assert layer.top_shapes == [(), (5,)]
    accuracy, per_class = layer.module(torch.tensor(x, requires_grad=True), torch.tensor(label.reshape(9, 2)))
    expected, expected_per_class = caffe_accuracy(x, label, 1, top_k, ignore)
    assert accuracy.item() == pytest.approx(expected, abs=1e-7)
    assert np.abs(per_class.numpy() - expected_per_class).max() < 1e-7
    assert not accuracy.requires_grad


def test_accuracy_on_another_axis():
    x, label = normal(2, 3, 6), labels(6, 6)
    _, layer = build("Accuracy", "accuracy_param { axis: -1 top_k: 3 }", [x.shape, (2, 3)])
    accuracy = layer.module(torch.tensor(x), torch.tensor(label.reshape(2, 3)))
    assert accuracy.item() == pytest.approx(caffe_accuracy(x, label, 2, 3, None)[0], abs=1e-7)


def test_accuracy_rejects_top_k_above_the_class_count():
    with pytest.raises(CaffeCompatError, match="top_k"):
        build("Accuracy", "accuracy_param { top_k: 6 }", [(4, 5), (4,)])


# ---------------------------------------------------------------- EuclideanLoss

def test_euclidean_loss_and_both_gradients():
    a, b = normal(4, 3, 2), normal(4, 6)
    _, layer = build("EuclideanLoss", "", [a.shape, b.shape])
    value, (da, db) = loss_and_grads(layer.module, [a, b], weight=2.0)
    diff = a.reshape(4, 6).astype(np.float64) - b
    assert value == pytest.approx((diff ** 2).sum() / 4 / 2, rel=1e-6)
    assert rel_err(da, 2.0 * diff.reshape(a.shape) / 4) < 1e-6
    assert rel_err(db, -2.0 * diff / 4) < 1e-6


def test_euclidean_loss_rejects_different_sizes():
    with pytest.raises(CaffeCompatError, match="size"):
        build("EuclideanLoss", "", [(4, 3), (4, 2)])


# ---------------------------------------------------------------- ContrastiveLoss

def caffe_contrastive(a, b, sim, margin, legacy):
    num, channels = a.shape[0], a.shape[1]
    diff = (a - b).reshape(num, channels).astype(np.float64)
    total = 0.0
    da = np.zeros_like(diff)
    for i in range(num):
        dist_sq = (diff[i] ** 2).sum()
        if int(sim[i]):
            total += dist_sq
            da[i] = diff[i] / num
        elif legacy:
            total += max(margin - dist_sq, 0.0)
            da[i] = -diff[i] / num if margin - dist_sq > 0 else 0
        else:
            dist = math.sqrt(dist_sq)
            total += max(margin - dist, 0.0) ** 2
            mdist = margin - dist
            da[i] = -(1 / num) * mdist / (dist + 1e-4) * diff[i] if mdist > 0 else 0
    return total / num / 2, da.reshape(a.shape)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("margin", [0.5, 3.0])
def test_contrastive_loss_both_versions_with_caffes_backward(legacy, margin):
    a, b = normal(10, 3, 1, 1) * 0.5, normal(10, 3, 1, 1) * 0.5
    a[3] = b[3]  # a dissimilar pair at distance 0: Caffe's 1e-4 keeps the gradient finite
    sim = np.array([1, 0, 1, 0, 0, 0, 0.7, 1.2, 0, 1], np.float32).reshape(10, 1, 1, 1)  # 0.7 truncates to 0
    _, layer = build("ContrastiveLoss", f"contrastive_loss_param {{ margin: {margin} "
                                        f"legacy_version: {str(legacy).lower()} }}", [a.shape, b.shape, sim.shape])
    value, (da, db, dsim) = loss_and_grads(layer.module, [a, b, sim])
    expected, expected_da = caffe_contrastive(a, b, sim.reshape(-1), margin, legacy)
    assert value == pytest.approx(expected, rel=1e-6)
    assert rel_err(da, expected_da) < 1e-6
    assert rel_err(db, -expected_da) < 1e-6
    assert dsim is None


def test_contrastive_loss_rejects_spatial_bottoms():
    with pytest.raises(CaffeCompatError, match="num, channels, 1, 1"):
        build("ContrastiveLoss", "", [(4, 3, 2, 1), (4, 3, 2, 1), (4, 1, 1, 1)])


# ---------------------------------------------------------------- SigmoidCrossEntropyLoss

def caffe_sigmoid_cross_entropy(x, target, ignore_label, normalization, weight):
    xs, ts = x.reshape(-1).astype(np.float64), target.reshape(-1).astype(np.float64)
    total, count = 0.0, 0
    diff = 1 / (1 + np.exp(-xs)) - ts
    for i in range(xs.size):
        if ignore_label is not None and int(ts[i]) == ignore_label:
            diff[i] = 0
            continue
        positive = float(xs[i] >= 0)
        total -= xs[i] * (ts[i] - positive) - math.log(1 + math.exp(xs[i] - 2 * xs[i] * positive))
        count += 1
    normalizer = {"FULL": xs.size, "VALID": count, "BATCH_SIZE": x.shape[0], "NONE": 1}[normalization]
    normalizer = max(1.0, normalizer)
    return total / normalizer, (diff * weight / normalizer).reshape(x.shape)


@pytest.mark.parametrize("params,mode", [("", "BATCH_SIZE"), ("loss_param { normalization: VALID }", "VALID"),
                                         ("loss_param { normalization: FULL }", "FULL"),
                                         ("loss_param { normalization: NONE }", "NONE"),
                                         ("loss_param { normalize: true }", "VALID")])
@pytest.mark.parametrize("ignore", [None, -1])
def test_sigmoid_cross_entropy(params, mode, ignore):
    x = normal(3, 4, 5) * 4
    x[0, 0, :2] = [60.0, -60.0]  # the stable form: no overflow
    target = RNG.random((3, 4, 5)).astype(np.float32)
    target[1, 2] = -1
    if ignore is not None:
        params = params.replace("loss_param {", "loss_param { ignore_label: -1") if params else \
            "loss_param { ignore_label: -1 }"
    _, layer = build("SigmoidCrossEntropyLoss", params, [x.shape, target.shape])
    value, (dx, dtarget) = loss_and_grads(layer.module, [x, target], weight=1.5)
    expected, expected_dx = caffe_sigmoid_cross_entropy(x, target, ignore, mode, 1.5)
    assert value == pytest.approx(expected, rel=1e-6)
    assert rel_err(dx, expected_dx) < 1e-6
    assert dtarget is None


# ---------------------------------------------------------------- HingeLoss

@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_loss(norm):
    x, label = normal(5, 4, 2), labels(5, 8)
    x[0, 0, 0] = -1.0  # exactly on the hinge
    _, layer = build("HingeLoss", f"hinge_loss_param {{ norm: {norm} }}", [x.shape, (5, 1)])
    value, (dx, dlabel) = loss_and_grads(layer.module, [x, label.reshape(5, 1)])
    flat = x.reshape(5, 8).astype(np.float64)
    sign = np.ones_like(flat)
    sign[np.arange(5), label.astype(int)] = -1
    margins = np.maximum(0, 1 + sign * flat)
    total = margins.sum() if norm == "L1" else (margins ** 2).sum()
    grad = np.sign(margins) * sign / 5 if norm == "L1" else 2 * margins * sign / 5
    assert value == pytest.approx(total / 5, rel=1e-6)
    assert rel_err(dx, grad.reshape(x.shape)) < 1e-6
    assert dlabel is None


# ---------------------------------------------------------------- MultinomialLogisticLoss

def test_multinomial_logistic_loss_clamps_and_keeps_caffes_gradient():
    prob = RNG.random((4, 6)).astype(np.float32)
    label = np.array([2, 0, 5, 1], np.float32)
    prob[2, 5] = 0.0  # below kLOG_THRESHOLD
    _, layer = build("MultinomialLogisticLoss", "", [prob.shape, (4, 1, 1, 1)])
    value, (dprob, _) = loss_and_grads(layer.module, [prob, label.reshape(4, 1, 1, 1)])
    picked = np.maximum(prob[np.arange(4), label.astype(int)].astype(np.float64), np.float32(1e-20))
    assert value == pytest.approx(-np.log(picked).sum() / 4, rel=1e-6)
    expected = np.zeros((4, 6))
    expected[np.arange(4), label.astype(int)] = -1 / (4 * picked)
    assert rel_err(dprob, expected) < 1e-6


# ---------------------------------------------------------------- tracing

@pytest.mark.parametrize("layer_type,params,shapes,make_inputs", [
    ("SoftmaxWithLoss", "loss_param { ignore_label: 1 }", [(4, 3, 5), (4, 5)],
     lambda: [normal(4, 3, 5), labels(20, 3).reshape(4, 5)]),
    ("Accuracy", "accuracy_param { top_k: 2 }", [(4, 3), (4,)], lambda: [normal(4, 3), labels(4, 3)]),
    ("EuclideanLoss", "", [(4, 3), (4, 3)], lambda: [normal(4, 3), normal(4, 3)]),
    ("ContrastiveLoss", "", [(4, 3), (4, 3), (4,)], lambda: [normal(4, 3), normal(4, 3), labels(4, 2)]),
    ("SigmoidCrossEntropyLoss", "loss_param { ignore_label: 0 }", [(4, 3), (4, 3)],
     lambda: [normal(4, 3), labels(12, 2).reshape(4, 3)]),
    ("HingeLoss", "", [(4, 3), (4,)], lambda: [normal(4, 3), labels(4, 3)]),
    ("MultinomialLogisticLoss", "", [(4, 3), (4,)], lambda: [np.abs(normal(4, 3)), labels(4, 3)]),
])
def test_losses_trace_with_fx_at_another_batch_size(layer_type, params, shapes, make_inputs):
    module = build(layer_type, params, shapes)[1].module
    traced = torch.fx.symbolic_trace(module)
    inputs = [torch.tensor(np.concatenate([a, a])) for a in make_inputs()]  # batch 8, built for 4
    assert torch.equal(traced(*inputs), module(*inputs))
