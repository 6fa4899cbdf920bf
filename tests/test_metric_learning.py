"""The paper's loss in pytorch-metric-learning's form (caffe_compat.losses.metric_learning)
against real Caffe, and the paper's batches for a torch DataLoader (ClassBatchSampler)."""
import collections

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import require, run_python
from test_lifted_loss import CASES, LAYERS, loss_and_grad, prototxt_margin, relative_error
from caffe_compat.data import ClassBatchSampler
from caffe_compat.errors import CaffeCompatError
from caffe_compat.losses import lifted_struct_loss


def pml_loss(**kwargs):
    pytest.importorskip("pytorch_metric_learning", reason="pytorch-metric-learning is in the test extra")
    from caffe_compat.losses.metric_learning import CaffeLiftedStructureLoss

    return CaffeLiftedStructureLoss(**kwargs)


def small_batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(12, 5, generator=generator), torch.arange(6).repeat_interleave(2)


@pytest.mark.parametrize("caffe_exact", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_matches_caffe(case, caffe_exact):
    npz = np.load(require(LAYERS / f"{case}.npz"))
    margin = prototxt_margin(require(LAYERS / f"{case}.prototxt").read_text())
    loss_fn = pml_loss(margin=margin, caffe_exact=caffe_exact)
    x = torch.from_numpy(npz["input/data"])
    labels = torch.from_numpy(npz["input/label"]).reshape(-1)  # pml takes labels of shape (n,)
    loss, grad = loss_and_grad(lambda e, y, m: loss_fn(e, y), x, labels, margin)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert relative_error(loss, npz["blob/loss"]) <= 1e-6
    assert relative_error(grad, npz["diff/data"]) <= 1e-5


def test_every_reducer_sees_the_loss_already_reduced():
    reducers = pytest.importorskip("pytorch_metric_learning.reducers")
    x, labels = small_batch()
    expected = lifted_struct_loss(x, labels)
    for reducer in (reducers.MeanReducer(), reducers.SumReducer(), reducers.AvgNonZeroReducer()):
        assert torch.equal(pml_loss(reducer=reducer)(x, labels), expected)


def test_embedding_regularizer_adds_its_term():
    x, labels = small_batch()
    regularizers = pytest.importorskip("pytorch_metric_learning.regularizers")
    loss = pml_loss(embedding_regularizer=regularizers.LpRegularizer(), embedding_reg_weight=0.5)(x, labels)
    assert torch.allclose(loss, lifted_struct_loss(x, labels) + 0.5 * x.norm(dim=1).mean())


def test_normalized_embeddings_are_l2_normalized_first():
    distances = pytest.importorskip("pytorch_metric_learning.distances")
    x, labels = small_batch()
    loss_fn = pml_loss(distance=distances.LpDistance(normalize_embeddings=True))
    assert torch.equal(loss_fn(x, labels), lifted_struct_loss(torch.nn.functional.normalize(x), labels))
    assert pml_loss()(x, labels) == lifted_struct_loss(x, labels)  # the fork's: no normalization


def test_what_the_paper_fixes_is_refused_in_one_line():
    distances = pytest.importorskip("pytorch_metric_learning.distances")
    x, labels = small_batch()
    for distance in (distances.CosineSimilarity(), distances.LpDistance(p=1), distances.LpDistance(power=2)):
        with pytest.raises(CaffeCompatError, match="Euclidean"):
            pml_loss(distance=distance)
    loss_fn = pml_loss()
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    with pytest.raises(CaffeCompatError, match="mines its own pairs"):
        loss_fn(x, labels, indices_tuple=pairs)
    with pytest.raises(CaffeCompatError, match="ref_emb"):
        loss_fn(x, labels, ref_emb=x.clone(), ref_labels=labels)
    with pytest.raises(CaffeCompatError, match="needs labels"):
        loss_fn(x)


def test_importing_the_losses_leaves_pml_out():
    code = ("import sys, caffe_compat, caffe_compat.losses\n"
            "assert 'pytorch_metric_learning' not in sys.modules, 'imported'\n"
            "sys.modules['pytorch_metric_learning'] = None  # as if not installed\n"
            "from caffe_compat.errors import CaffeCompatError\n"
            "try:\n"
            "    import caffe_compat.losses.metric_learning\n"
            "except CaffeCompatError as e:\n"
            "    print(e)\n")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("caffe_compat.losses.metric_learning needs pytorch-metric-learning: "
                                     "pip install 'caffe-compat[pml]'")


# ---------------------------------------------------------------- the paper's batches

def test_pairs_batches_feed_a_dataloader_as_the_paper_batches():
    labels = torch.tensor([7, 7, 7, 3, 3, 9, 9, 9, 9, 1, 1, 5])
    data = TensorDataset(torch.arange(len(labels)), labels)
    sampler = ClassBatchSampler(labels, batch_size=6, batches=20, seed=1)
    batches = list(DataLoader(data, batch_sampler=sampler))
    assert len(sampler) == len(batches) == 20
    for items, batch_labels in batches:
        assert torch.equal(labels[items], batch_labels)
        counts = collections.Counter(batch_labels.tolist())
        assert len(counts) == 3 and set(counts.values()) == {2}  # three classes, a pair of each
    again = [items.tolist() for items, _ in DataLoader(data, batch_sampler=ClassBatchSampler(labels, 6, batches=20,
                                                                                            seed=1))]
    assert again == [items.tolist() for items, _ in batches]
    assert list(sampler) != list(sampler)  # epochs differ


def test_pk_batches_and_the_default_epoch():
    labels = np.repeat(np.arange(10), 4)
    sampler = ClassBatchSampler(labels, batch_size=8, spec="pk:2,4")
    assert len(sampler) == 5  # 40 items, batches of 8
    for batch in sampler:
        assert sorted(collections.Counter(labels[batch].tolist()).values()) == [4, 4]


@pytest.mark.parametrize("arguments, message", [
    (([0, 0, 1, 1], 3), "even batch_size"),
    (([0, 0, 0, 0], 2), "1 class"),
    (([0, 0, 1, 1], 2, "sequential"), "DataLoader's own order"),
    (([0, 0, 1, 1], 2, "pk:2,2"), "gives 4 images per batch"),
    (([0, 0, 1], 4), "3 items make no batch of 4"),
    (([0.5, 1.5], 2), "one integer per item"),
    (([0, 0, 1, 1], 0), "positive integer"),
    (([0, 0, 1, 1], 2, "pairs", 0), "batches must be a positive integer"),
])
def test_bad_sampler_arguments_are_one_line(arguments, message):
    with pytest.raises(CaffeCompatError, match=message):
        ClassBatchSampler(*arguments)
