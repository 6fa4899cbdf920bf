"""The fused LRN function: its hand-written backward is the true derivative, for both
regions, windows wider than the channel count, and under autocast."""
import pytest
import torch
import torch.nn.functional as F

from caffe_compat.layers.lrn import AcrossChannelLRN, WithinChannelLRN


def autograd_chain(x, size, alpha, beta, k, across):
    """The unfused formula, differentiated by autograd."""
    pad = (size - 1) // 2
    if across:
        squares = F.pad((x * x).unsqueeze(1), (0, 0, 0, 0, pad, pad)).squeeze(1)
        window = sum(squares[:, i:i + x.shape[1]] for i in range(size)) / size
    else:
        window = F.avg_pool2d(x * x, size, stride=1, padding=pad, count_include_pad=True)
    return x * (k + alpha * window) ** -beta


CASES = [  # size, alpha, beta, k, across, shape
    (5, 0.3, 0.75, 2.0, True, (2, 7, 5, 4)),
    (5, 0.3, 0.75, 1.0, True, (1, 2, 3, 3)),  # window wider than the channels
    (3, 1.0, 0.5, 1.0, True, (2, 1, 4, 4)),
    (3, 0.5, 0.75, 1.0, False, (2, 3, 6, 5)),
    (5, 0.2, 1.5, 1.0, False, (1, 2, 4, 7)),
]


@pytest.mark.parametrize("size,alpha,beta,k,across,shape", CASES)
def test_gradcheck_and_equal_to_the_autograd_chain(size, alpha, beta, k, across, shape):
    module = AcrossChannelLRN(size, alpha, beta, k) if across else WithinChannelLRN(size, alpha, beta)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))
    top_diff = torch.randn(shape, dtype=torch.float64)
    ours = module(x)
    (ours_grad,) = torch.autograd.grad(ours, x, top_diff)
    ref = autograd_chain(x, size, alpha, beta, k if across else 1.0, across)
    (ref_grad,) = torch.autograd.grad(ref, x, top_diff)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("across", [True, False])
def test_bfloat16_input_is_normalised_in_float32(across):
    module = AcrossChannelLRN(5, 1e-4, 0.75, 1.0) if across else WithinChannelLRN(3, 5e-5, 0.75)
    x = (torch.randn(2, 6, 8, 8) * 300).requires_grad_()
    exact = module(x)
    low = module(x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), exact, rtol=2e-2, atol=2e-2)
    low.float().sum().backward()
    assert torch.isfinite(x.grad).all()
