"""The lifted structured similarity softmax loss against real Caffe (the paper's fork),
against a straightforward loop over pairs, and in the degenerate corners."""
import math
import re
import types
import warnings
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import REFERENCE, free_port, require
from caffe_compat.errors import CaffeCompatError
from caffe_compat.layers.lifted import build_lifted, lifted_margin
from caffe_compat.layers.registry import LayerContext
from caffe_compat.losses import LiftedStructSimilaritySoftmaxLoss, NoPositivePairsWarning, lifted_struct_loss
from caffe_compat.losses.distributed import DistributedLiftedStructSimilaritySoftmaxLoss

LAYERS = REFERENCE / "layers"
KNOWN_CASES = ["lifted_pairs_m128_d64", "lifted_multi_pos_m32_d16", "lifted_margin_half_far"]
CASES = sorted(set(KNOWN_CASES) | {p.stem for p in LAYERS.glob("lifted_*.npz")})


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def prototxt_margin(text: str) -> float:
    found = re.search(r"lifted_struct_sim_softmax_loss_param\s*\{[^}]*?margin\s*:\s*([-+0-9.eE]+)", text)
    return float(found.group(1)) if found else 1.0


def loop_reference(x, labels, margin):
    """The fork's arithmetic, one positive pair at a time (autograd gives the gradient)."""
    n = x.shape[0]
    labels = [float(v) for v in labels]
    total, pairs = x.new_zeros(()), 0
    for i in range(n):
        for j in range(i + 1, n):
            if labels[i] != labels[j]:
                continue
            negatives = [margin - torch.linalg.vector_norm(x[a] - x[k])
                         for a in (i, j) for k in range(n) if labels[k] != labels[a]]
            soft_max = torch.logsumexp(torch.stack(negatives), 0) if negatives else -math.inf
            hinge = torch.clamp(soft_max + torch.linalg.vector_norm(x[i] - x[j]), min=0)
            total, pairs = total + hinge ** 2, pairs + 1
    return total / (2 * pairs)


def loss_and_grad(fn, x, labels, margin, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, labels, margin, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


# ---------------------------------------------------------------- Caffe fixtures

@pytest.mark.parametrize("caffe_exact", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_matches_caffe(case, caffe_exact):
    npz = np.load(require(LAYERS / f"{case}.npz"))
    margin = prototxt_margin(require(LAYERS / f"{case}.prototxt").read_text())
    x = torch.from_numpy(npz["input/data"])  # float32, as Caffe computed
    labels = torch.from_numpy(npz["input/label"])
    module = LiftedStructSimilaritySoftmaxLoss(margin, caffe_exact=caffe_exact)
    loss, grad = loss_and_grad(lambda e, y, m: module(e, y), x, labels, margin)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert relative_error(loss, npz["blob/loss"]) <= 1e-6
    assert relative_error(grad, npz["diff/data"]) <= 1e-5


def test_prototxt_margin_parsing():
    layer = 'layer { type: "LiftedStructSimilaritySoftmaxLoss" lifted_struct_sim_softmax_loss_param { margin: 0.5 } }'
    assert prototxt_margin(layer) == 0.5
    assert prototxt_margin('layer { type: "LiftedStructSimilaritySoftmaxLoss" }') == 1.0


# ------------------------------------------------------ the loop reference, float64

def random_batch(seed, n, d, classes, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, classes, (n,), generator=g).to(torch.float32)
    return x, labels


BATCHES = {
    "few_classes": (random_batch(0, 14, 5, 3), 1.0),
    "many_classes": (random_batch(1, 20, 8, 9), 1.0),
    "lone_positive_pair": ((torch.randn(9, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
                            torch.tensor([0, 1, 2, 3, 4, 5, 6, 3, 8.])), 1.0),
    "some_hinges_inactive": ((random_batch(3, 16, 3, 4, scale=3.0)), 0.5),
    "all_hinges_inactive": (random_batch(4, 12, 4, 3), -50.0),
    "one_class": ((torch.randn(6, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64),
                   torch.zeros(6)), 1.0),
    "int_labels": ((torch.randn(10, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64),
                    torch.tensor([7, 7, 3, 3, 3, -1, -1, 12, 12, 7])), 1.0),
    "large_distances": (random_batch(7, 12, 6, 3, scale=1e3), 1.0),
    "large_margin": (random_batch(8, 12, 6, 3, scale=1e3), 1e3),
    "large_negative_margin": (random_batch(9, 12, 6, 3, scale=1e3), -1e3),
}


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_matches_loop_reference(name):
    (x, labels), margin = BATCHES[name]
    ours_loss, ours_grad = loss_and_grad(lifted_struct_loss, x, labels, margin)
    ref_loss, ref_grad = loss_and_grad(loop_reference, x, labels, margin)
    assert ours_loss.dtype == torch.float64
    assert torch.isfinite(ours_loss) and torch.isfinite(ours_grad).all()
    if ref_loss == 0:
        assert ours_loss == 0 and not ours_grad.any()
    else:
        assert relative_error(ours_loss, ref_loss) <= 1e-12
        assert relative_error(ours_grad, ref_grad) <= 1e-10


def test_inactive_hinges_give_zero():
    (x, labels), margin = BATCHES["all_hinges_inactive"]
    loss, grad = loss_and_grad(lifted_struct_loss, x, labels, margin)
    assert loss == 0 and not grad.any()


@pytest.mark.parametrize("name", ["large_distances", "large_margin", "large_negative_margin"])
def test_float32_stable_for_large_values(name):
    (x, labels), margin = BATCHES[name]
    loss32, grad32 = loss_and_grad(lifted_struct_loss, x.float(), labels, margin)
    loss64, grad64 = loss_and_grad(lifted_struct_loss, x, labels, margin)
    assert torch.isfinite(loss32) and torch.isfinite(grad32).all()
    if loss64 == 0:
        assert loss32 == 0
    else:
        assert relative_error(loss32, loss64) <= 1e-5
        assert relative_error(grad32, grad64) <= 1e-4


def test_gradcheck():
    x, labels = random_batch(10, 7, 3, 3)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: lifted_struct_loss(e, labels, 1.0), (x,))


def test_blob_shapes_and_grad_shape():
    x, labels = random_batch(11, 10, 4, 3)
    flat_loss, flat_grad = loss_and_grad(lifted_struct_loss, x, labels, 1.0)
    blob_loss, blob_grad = loss_and_grad(lifted_struct_loss, x.reshape(10, 4, 1, 1),
                                         labels.reshape(10, 1, 1, 1), 1.0)
    assert blob_loss.shape == () and blob_grad.shape == (10, 4, 1, 1)
    assert blob_loss == flat_loss and torch.equal(blob_grad.reshape(10, 4), flat_grad)


# ------------------------------------------------------------ degenerate batches

def coincident_pair_batch():
    x, labels = random_batch(12, 8, 4, 3)
    labels[1] = labels[0]
    x[1] = x[0]  # a positive pair at distance 0
    return x.float(), labels


def test_zero_distance_pair_is_finite_by_default():
    x, labels = coincident_pair_batch()
    loss, grad = loss_and_grad(lifted_struct_loss, x, labels, 1.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # The loss itself is continuous there: it equals the loop reference.
    assert relative_error(loss, loop_reference(x.double(), labels, 1.0).detach()) <= 1e-6


def test_zero_distance_pair_is_nan_with_caffe_exact():
    # Small integers: every product and sum is exact, so the fork's |x_i|^2 + |x_j|^2 -
    # 2 x_i.x_j is exactly 0 for the coincident pair (with random floats it is rounding).
    x, labels = coincident_pair_batch()
    x = torch.round(x * 2)
    loss, grad = loss_and_grad(lifted_struct_loss, x, labels, 1.0, caffe_exact=True)
    assert torch.isnan(grad[:2]).all(), "the fork divides by the zero distance"


def test_coincident_negatives_are_finite():
    x, labels = random_batch(13, 8, 4, 3)
    labels[2] = labels[0] + 100
    x[2] = x[0]
    loss, grad = loss_and_grad(lifted_struct_loss, x.float(), labels, 1.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_no_positive_pair_gives_zero_and_one_warning():
    x = torch.randn(6, 3, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = LiftedStructSimilaritySoftmaxLoss()(x, torch.arange(6.))
    assert [w.category for w in caught] == [NoPositivePairsWarning]
    assert loss.shape == () and loss == 0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("caffe_exact", [False, True])
def test_an_empty_batch_is_one_clear_error(caffe_exact):
    with pytest.raises(CaffeCompatError, match="the batch holds no embeddings"):
        LiftedStructSimilaritySoftmaxLoss(caffe_exact=caffe_exact)(torch.zeros(0, 4), torch.zeros(0))


@pytest.mark.parametrize("shape", [(1, 5), (1, 5, 1, 1)])
def test_batch_of_one_gives_zero_and_a_zero_gradient(shape):
    # One embedding has neither positives nor negatives: the softmax there is 0 / 0.
    layer = nn.Linear(3, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = LiftedStructSimilaritySoftmaxLoss()(layer(torch.randn(1, 3)).reshape(shape), torch.zeros(1))
    assert [w.category for w in caught] == [NoPositivePairsWarning]
    assert loss.shape == () and loss == 0
    loss.backward()
    for param in layer.parameters():
        assert torch.equal(param.grad, torch.zeros_like(param))


@pytest.mark.parametrize("n", [1, 6])
def test_no_positive_pair_with_caffe_exact_is_the_forks_nan(n):
    # The fork computes loss / num_constraints / 2 and scales its (zero) diffs by
    # top_diff / num_constraints / 2 with num_constraints 0.
    with pytest.warns(NoPositivePairsWarning, match="NaN"):
        loss, grad = loss_and_grad(lifted_struct_loss, torch.randn(n, 3), torch.arange(float(n)), 1.0,
                                   caffe_exact=True)
    assert torch.isnan(loss) and torch.isnan(grad).all()


@pytest.mark.parametrize("embeddings, labels, message", [
    (torch.zeros(4, 3, 2, 1), torch.zeros(4), r"embeddings must have shape"),
    (torch.zeros(4), torch.zeros(4), r"embeddings must have shape"),
    (torch.zeros(4, 3), torch.zeros(4, 2), r"labels must have shape"),
    (torch.zeros(4, 3), torch.zeros(5), r"5 labels for 4 embeddings"),
    (torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4), r"floating point"),
    (torch.tensor([[0., 1], [math.nan, 0], [1, 1], [2, 2]]), torch.tensor([0., 0, 1, 1]), r"NaN or inf"),
    (torch.tensor([[0., 1], [math.inf, 0], [1, 1], [2, 2]]), torch.tensor([0., 0, 1, 1]), r"NaN or inf"),
    (torch.zeros(4, 2), torch.tensor([0., math.nan, 1, 1]), r"labels contain NaN"),
    (torch.tensor([[1e20, 0], [-1e20, 0], [0, 1e20], [0, -1e20]]), torch.tensor([0., 0, 1, 1]),
     r"overflow torch.float32"),
])
def test_bad_inputs_raise(embeddings, labels, message):
    with pytest.raises(CaffeCompatError, match=message):
        LiftedStructSimilaritySoftmaxLoss()(embeddings, labels)


def test_bad_margin_raises():
    with pytest.raises(CaffeCompatError, match="margin must be finite"):
        LiftedStructSimilaritySoftmaxLoss(math.nan)(torch.zeros(4, 2), torch.tensor([0., 0, 1, 1]))


def test_large_integer_ids_stay_distinct():
    # float32 would merge 2^24 and 2^24 + 1; the loss must not.
    x, _ = random_batch(19, 6, 3, 2)
    ids = torch.tensor([2 ** 24, 2 ** 24 + 1, 2 ** 24, 2 ** 24 + 1, 5, 5])
    small = torch.tensor([0, 1, 0, 1, 5, 5])
    assert torch.equal(lifted_struct_loss(x.float(), ids), lifted_struct_loss(x.float(), small))


# ------------------------------------------------------------ precision modes

def test_autocast_bfloat16_runs_and_is_close():
    torch.manual_seed(14)
    layer = nn.Linear(16, 8)
    x = torch.randn(32, 16)
    labels = torch.arange(32) // 4
    reference = LiftedStructSimilaritySoftmaxLoss()(layer(x), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = layer(x)
        loss = LiftedStructSimilaritySoftmaxLoss()(embeddings, labels)
    assert embeddings.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert relative_error(loss.detach(), reference.detach()) <= 2e-2


def test_autocast_keeps_float32_distances():
    x, labels = random_batch(15, 16, 8, 4)
    x = x.float()
    plain = lifted_struct_loss(x, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = lifted_struct_loss(x, labels)
    assert torch.equal(plain, under_autocast)


def test_float32_close_to_float64():
    x, labels = random_batch(16, 64, 16, 8)
    loss64, grad64 = loss_and_grad(lifted_struct_loss, x, labels, 1.0)
    loss32, grad32 = loss_and_grad(lifted_struct_loss, x.float(), labels, 1.0)
    assert relative_error(loss32, loss64) <= 1e-6
    assert relative_error(grad32, grad64) <= 1e-5


# ------------------------------------------------------------ the Caffe layer type

def layer_context(param, shapes=((8, 4, 1, 1), (8,))):
    return LayerContext(name="loss", type="LiftedStructSimilaritySoftmaxLoss", param=param,
                        bottoms=["data", "label"], tops=["loss"], bottom_shapes=list(shapes),
                        phase="TRAIN")


def test_builder_reads_the_margin():
    lifted = types.SimpleNamespace(lifted_struct_sim_softmax_loss_param=types.SimpleNamespace(margin=0.5))
    converted = build_lifted(layer_context(lifted))
    assert isinstance(converted.module, LiftedStructSimilaritySoftmaxLoss)
    assert converted.module.margin == 0.5
    assert converted.bottoms == ["data", "label"] and converted.tops == ["loss"]
    assert converted.top_shapes == [()]
    assert lifted_margin(types.SimpleNamespace()) == 1.0  # BVLC dialect: no such field


def test_builder_with_real_messages():
    from google.protobuf import text_format

    from caffe_compat.io import schema
    text = 'name: "loss" type: "LiftedStructSimilaritySoftmaxLoss" lifted_struct_sim_softmax_loss_param { margin: 0.25 }'
    lifted = text_format.Parse(text, schema.messages("lifted").LayerParameter())
    assert build_lifted(layer_context(lifted)).module.margin == 0.25
    default = schema.messages("lifted").LayerParameter(type="LiftedStructSimilaritySoftmaxLoss")
    assert build_lifted(layer_context(default)).module.margin == 1.0
    bvlc = schema.messages("bvlc").LayerParameter(type="LiftedStructSimilaritySoftmaxLoss")
    assert build_lifted(layer_context(bvlc)).module.margin == 1.0


@pytest.mark.parametrize("shapes, message", [
    (((8, 4, 2, 1), (8,)), "embeddings must have shape"),
    (((8, 4), (7,)), "7 labels for 8 embeddings"),
])
def test_builder_rejects_bad_bottoms(shapes, message):
    with pytest.raises(CaffeCompatError, match=f"layer 'loss'.*{message}"):
        build_lifted(layer_context(types.SimpleNamespace(), shapes))


def test_builder_needs_two_bottoms():
    ctx = layer_context(types.SimpleNamespace())
    ctx.bottoms = ["data"]
    with pytest.raises(CaffeCompatError, match="expects 2 bottom"):
        build_lifted(ctx)


# ------------------------------------------------------------ many processes

ROWS_PER_RANK = (7, 9)  # uneven on purpose


def global_batch():
    g = torch.Generator().manual_seed(17)
    x = torch.randn(sum(ROWS_PER_RANK), 6, generator=g)
    labels = torch.randint(0, 4, (sum(ROWS_PER_RANK),), generator=g)
    return x, labels


def fresh_model():
    torch.manual_seed(18)
    return nn.Linear(6, 5)


def distributed_worker(rank, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=len(ROWS_PER_RANK), timeout=timedelta(seconds=60))
    try:
        x, labels = global_batch()
        rows = slice(sum(ROWS_PER_RANK[:rank]), sum(ROWS_PER_RANK[:rank + 1]))
        ref_loss, ref_grad = loss_and_grad(lifted_struct_loss, x, labels, 0.7)

        # Embedding gradients: this rank's slice of the single-process gradient.
        local = x[rows].clone().requires_grad_(True)
        loss = DistributedLiftedStructSimilaritySoftmaxLoss(0.7, ddp_average=False)(local, labels[rows])
        loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(local.grad, ref_grad[rows], rtol=1e-5, atol=1e-7)

        # After DDP's reduction (the mean over ranks, done here by hand: constructing
        # DistributedDataParallel imports torch._dynamo, seconds per process) the
        # parameter gradients equal single-process training on the concatenated batch.
        reference = fresh_model()
        lifted_struct_loss(reference(x), labels, 0.7).backward()
        model = fresh_model()
        loss = DistributedLiftedStructSimilaritySoftmaxLoss(0.7)(model(x[rows]), labels[rows])
        loss.backward()
        for ours, ref in zip(model.parameters(), reference.parameters()):
            dist.all_reduce(ours.grad)
            ours.grad /= dist.get_world_size()
            torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-7)

        # A global batch of one (rank 0 holds it, the others none): 0 and a zero gradient.
        single = x[:1 if rank == 0 else 0].clone().requires_grad_(True)
        with pytest.warns(NoPositivePairsWarning):
            loss = DistributedLiftedStructSimilaritySoftmaxLoss(0.7)(single, labels[:single.shape[0]])
        loss.backward()
        assert loss == 0 and torch.equal(single.grad, torch.zeros_like(single))

        # A malformed input on one rank fails on every rank instead of hanging.
        bad = x[rows] if rank == 0 else x[rows].reshape(-1, 3, 2)
        with pytest.raises(CaffeCompatError, match="rank|embeddings must have shape"):
            DistributedLiftedStructSimilaritySoftmaxLoss()(bad, labels[rows])
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_distributed_equals_single_process_on_concatenated_batch():
    torch.multiprocessing.spawn(distributed_worker, args=(free_port(),), nprocs=len(ROWS_PER_RANK))


def test_distributed_needs_a_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(CaffeCompatError, match="process group"):
        DistributedLiftedStructSimilaritySoftmaxLoss()(torch.zeros(4, 2), torch.zeros(4))
