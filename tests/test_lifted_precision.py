"""The lifted loss in float32 against an exact float64 computation from direct
differences (no Gram matrix), on the inputs where the Gram form cancels: embeddings
with a large common component, d = 1, near-coincident pairs; and the blockwise form
(several blocks, distances recomputed in the backward) against the one-block form."""
import pytest
import torch

from caffe_compat.losses import blockwise, lifted_struct_loss

LOSS_TOLERANCE = 1e-6
GRAD_TOLERANCE = 1e-5


def exact_reference(x, labels, margin):
    """Loss and gradient in float64, every distance |x_i - x_j| from the difference, of
    the embeddings as float32 holds them."""
    x = x.detach().float().double().requires_grad_(True)
    n = x.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    squares = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(2)
    dist = torch.where(eye, 0.0, torch.where(eye, 1.0, squares).sqrt())
    negative = labels.unsqueeze(1) != labels.unsqueeze(0)
    anchor_lse = torch.logsumexp(torch.where(negative, margin - dist, -torch.inf), 1)
    positive = ~negative & ~eye
    i, j = positive.nonzero().unbind(1)
    hinge = torch.clamp(torch.logaddexp(anchor_lse[i], anchor_lse[j]) + dist[i, j], min=0)
    loss = hinge.pow(2).sum() / (2 * i.numel())
    loss.backward()
    return loss.detach(), x.grad


def relative_error(ours, ref) -> float:
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).abs().max() / ref.abs().max())


def ours_float32(x, labels, margin, **kwargs):
    x = x.detach().float().requires_grad_(True)
    loss = lifted_struct_loss(x, labels, margin, **kwargs)
    loss.backward()
    assert loss.dtype == torch.float32
    return loss.detach(), x.grad


def generator(seed):
    return torch.Generator().manual_seed(seed)


def common_component(seed, n, d, scale, noise, classes):
    g = generator(seed)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    x = scale * u / u.norm() + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=g)


def net_at_init(seed, n=4, features=1024, d=64):
    """What a freshly initialised embedding layer makes of average-pooled ReLU maps
    (GoogLeNet's pool5: 7 x 7 averaged): inputs positive with a small spread across
    images, so every embedding shares the layer's response to their mean."""
    g = generator(seed)
    maps = torch.randn(n, features, 49, generator=g, dtype=torch.float64) + 0.5
    pooled = torch.relu(maps).mean(2)
    limit = (3.0 / features) ** 0.5  # Caffe's xavier filler
    weights = (torch.rand(features, d, generator=g, dtype=torch.float64) * 2 - 1) * limit
    return pooled @ weights, torch.tensor([0, 0, 1, 1])


def one_dimensional(seed, n=64):
    """d = 1, pairs a few 1e-4 apart, far from the centre of the batch."""
    g = generator(seed)
    centres = 3.0 + torch.rand(n // 2, 1, generator=g, dtype=torch.float64)
    offsets = 1e-4 * (1 + torch.rand(n // 2, 1, generator=g, dtype=torch.float64))
    x = torch.cat([centres, centres + offsets])
    labels = torch.cat([torch.arange(n // 2), torch.arange(n // 2)])
    return x, labels


def near_coincident(seed, n=48, d=16, classes=6):
    """Same-class points within 1e-4 of each other, classes well apart."""
    g = generator(seed)
    labels = torch.arange(n) % classes
    centres = 0.3 * torch.randn(classes, d, generator=g, dtype=torch.float64)
    return centres[labels] + 1e-4 * torch.randn(n, d, generator=g, dtype=torch.float64), labels


def clustered(seed, n, d, classes, spread, offset=20.0):
    """Classes around centres `spread` apart (in units of the within-class spread), far
    from the origin."""
    g = generator(seed)
    labels = torch.arange(n) % classes
    centres = offset + spread * torch.randn(classes, d, generator=g, dtype=torch.float64)
    return centres[labels] + torch.randn(n, d, generator=g, dtype=torch.float64), labels


def with_singletons(seed, n=40, d=8):
    g = generator(seed)
    labels = torch.cat([torch.arange(10).repeat_interleave(3), 100 + torch.arange(n - 30)])
    return 50 + torch.randn(n, d, generator=g, dtype=torch.float64), labels


CASES = {
    "10u_noise_n128_d64": (common_component(0, 128, 64, 10.0, 0.01, 16), 1.0),
    "100u_noise_n256_d128": (common_component(1, 256, 128, 100.0, 0.01, 32), 1.0),
    "net_at_init_4_images": (net_at_init(2), 1.0),
    "d1_near_coincident_pairs": (one_dimensional(3), 1.0),
    "near_coincident_clusters": (near_coincident(4), 1.0),
    "many_positives_per_anchor": (common_component(5, 96, 32, 30.0, 0.1, 3), 1.0),
    "margin_half_inactive_hinges": (clustered(6, 64, 8, 4, 3.0), 0.5),
    "labels_with_singletons": (with_singletons(7), 1.0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_is_as_exact_as_float64_allows(name):
    (x, labels), margin = CASES[name]
    ref_loss, ref_grad = exact_reference(x, labels, margin)
    assert ref_loss > 0
    loss, grad = ours_float32(x, labels, margin)
    assert relative_error(loss, ref_loss) <= LOSS_TOLERANCE
    assert relative_error(grad, ref_grad) <= GRAD_TOLERANCE


def test_margin_half_case_has_inactive_hinges():
    (x, labels), margin = CASES["margin_half_inactive_hinges"]
    x = x.float()
    dist = torch.cdist(x.double(), x.double())
    negative = labels.unsqueeze(1) != labels
    lse = torch.logsumexp(torch.where(negative, margin - dist, -torch.inf), 1)
    i, j = (~negative & ~torch.eye(len(labels), dtype=torch.bool)).nonzero().unbind(1)
    hinge = torch.logaddexp(lse[i], lse[j]) + dist[i, j]
    assert (hinge < 0).any() and (hinge > 0).any()


def test_caffe_exact_keeps_the_gram_form():
    # The fork's arithmetic is what cancels here; the default is what does not.
    (x, labels), margin = CASES["100u_noise_n256_d128"]
    ref_loss, ref_grad = exact_reference(x, labels, margin)
    _, caffe_grad = ours_float32(x, labels, margin, caffe_exact=True)
    assert relative_error(caffe_grad, ref_grad) > 100 * GRAD_TOLERANCE


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of a few rows, and nothing n x n kept: the backward recomputes."""
    monkeypatch.setattr(blockwise, "BLOCK_BYTES", 3 * 4 * 128 * 7)
    monkeypatch.setattr(blockwise, "SAVE_BYTES", 0)


# The fork's arithmetic is only stable on a batch without a large common component.
WELL_CONDITIONED = (torch.randn(40, 8, generator=generator(8)), torch.arange(40) % 5)


@pytest.mark.parametrize("name, caffe_exact", [
    ("10u_noise_n128_d64", False), ("d1_near_coincident_pairs", False),
    ("near_coincident_clusters", False), ("labels_with_singletons", False),
    ("well_conditioned", False), ("well_conditioned", True)])
def test_blocks_and_recomputation_give_the_one_block_result(name, caffe_exact, tiny_blocks, monkeypatch):
    (x, labels), margin = CASES[name] if name in CASES else (WELL_CONDITIONED, 1.0)
    x = x.float()
    assert blockwise.block_rows(x.shape[0], 4) < x.shape[0]
    blocked = ours_float32(x, labels, margin, caffe_exact=caffe_exact)
    monkeypatch.setattr(blockwise, "BLOCK_BYTES", 2 ** 30)
    monkeypatch.setattr(blockwise, "SAVE_BYTES", 2 ** 30)
    whole = ours_float32(x, labels, margin, caffe_exact=caffe_exact)
    assert relative_error(blocked[0], whole[0]) <= 1e-6
    assert relative_error(blocked[1], whole[1]) <= 1e-6


def test_blocks_in_float64_match_the_reference(tiny_blocks):
    (x, labels), margin = CASES["many_positives_per_anchor"]
    x = x.float().double().requires_grad_(True)  # the reference's input
    loss = lifted_struct_loss(x, labels, margin)
    loss.backward()
    ref_loss, ref_grad = exact_reference(x, labels, margin)
    assert relative_error(loss.detach(), ref_loss) <= 1e-12
    assert relative_error(x.grad, ref_grad) <= 1e-10


def test_block_rows_follow_the_memory_budget():
    assert blockwise.block_rows(128, 4) == 128
    rows = blockwise.block_rows(16384, 4)
    assert rows * 16384 * 4 * blockwise.BLOCK_TEMPORARIES <= blockwise.BLOCK_BYTES
    assert blockwise.block_rows(10 ** 9, 8) == 1
