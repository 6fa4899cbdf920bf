"""The LRN functions, the C kernel (ACROSS_CHANNELS on CPU) and the PyTorch form: their
hand-written backward is the true derivative, for both regions, NCHW and channels_last,
windows wider than the channel count, each power form and under autocast; the kernel's
work split never changes a bit; its build is cached and its absence falls back."""
import io
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from caffe_compat.layers import native
from caffe_compat.layers import lrn
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


@pytest.fixture(params=["kernel", "pytorch"])
def implementation(request, monkeypatch):
    if request.param == "pytorch":
        monkeypatch.setattr(lrn, "_kernel", lambda: None)
    else:
        assert lrn._kernel() is not None, "the LRN C kernel did not build (is a C compiler installed?)"
    return request.param


CASES = [  # size, alpha, beta, k, across, shape
    (5, 0.3, 0.75, 2.0, True, (2, 7, 5, 4)),
    (5, 0.3, 0.75, 1.0, True, (1, 2, 3, 3)),  # window wider than the channels
    (3, 1.0, 0.5, 1.0, True, (2, 1, 4, 4)),
    (3, 0.4, 1.0, 1.5, True, (1, 4, 3, 5)),
    (7, 0.2, 0.3, 1.0, True, (2, 9, 3, 2)),  # neither a specialised size nor a square-root power
    (1, 0.5, 0.75, 1.0, True, (1, 3, 2, 2)),
    (3, 0.5, 0.75, 1.0, False, (2, 3, 6, 5)),
    (5, 0.2, 1.5, 1.0, False, (1, 2, 4, 7)),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("size,alpha,beta,k,across,shape", CASES)
def test_gradcheck_and_equal_to_the_autograd_chain(implementation, size, alpha, beta, k, across, shape,
                                                   channels_last):
    module = AcrossChannelLRN(size, alpha, beta, k) if across else WithinChannelLRN(size, alpha, beta)
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    assert torch.autograd.gradcheck(module, (x,))
    top_diff = torch.randn(shape, dtype=torch.float64)
    ours = module(x)
    (ours_grad,) = torch.autograd.grad(ours, x, top_diff)
    ref = autograd_chain(x, size, alpha, beta, k if across else 1.0, across)
    (ref_grad,) = torch.autograd.grad(ref, x, top_diff)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-12, atol=1e-12)


def kernel_run(x, top_diff, module):
    x = x.detach().requires_grad_()
    top = module(x)
    (grad,) = torch.autograd.grad(top, x, top_diff)
    return top, grad


def test_kernel_split_into_segments_and_threads_and_layouts_gives_the_same_bits(monkeypatch):
    assert lrn._kernel() is not None, "the LRN C kernel did not build"
    module = AcrossChannelLRN(5, 1e-2, 0.75, 1.0)
    x = torch.randn(6, 11, 9, 13) * 4
    top_diff = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        whole = kernel_run(x, top_diff, module)
        torch.set_num_threads(2)
        monkeypatch.setattr(lrn, "KERNEL_SEGMENT", 10)  # 117 pixels: 12 segments of 9 or 10
        monkeypatch.setattr(lrn, "KERNEL_ELEMENTS_PER_THREAD", 1)  # two threads however small the tensor
        split = kernel_run(x, top_diff, module)
        nhwc = kernel_run(x.contiguous(memory_format=torch.channels_last),
                          top_diff.contiguous(memory_format=torch.channels_last), module)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(whole, split):
        assert torch.equal(a, b)
    assert nhwc[0].is_contiguous(memory_format=torch.channels_last)
    assert nhwc[1].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(whole, nhwc):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 5)])
def test_empty_tensors_pass_through(implementation, shape):
    x = torch.randn(shape, requires_grad=True)
    top = AcrossChannelLRN(5, 1e-4, 0.75, 1.0)(x)
    assert top.shape == shape
    top.sum().backward()
    assert x.grad.shape == shape


@pytest.mark.parametrize("beta", [0.75, 0.5, 1.0, 0.6])
def test_float32_kernel_is_within_a_few_ulps_of_float64(beta):
    assert lrn._kernel() is not None, "the LRN C kernel did not build"
    module = AcrossChannelLRN(5, 1e-4, beta, 1.0)
    x = torch.randn(2, 64, 12, 12, dtype=torch.float64) * 60  # GoogLeNet's LRN inputs reach hundreds
    top_diff = torch.randn_like(x)
    exact = kernel_run(x, top_diff, module)
    single = kernel_run(x.float(), top_diff.float(), module)
    for a, b in zip(exact, single):
        assert ((b.double() - a).abs().max() / a.abs().max()).item() < 1e-6


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


def test_traced_by_torch_compile_the_pytorch_form_is_used(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(lrn._LRNFunction, "apply", lambda *args: calls.append(args) or args[0])
    AcrossChannelLRN(5, 1e-4, 0.75, 1.0)(torch.randn(1, 3, 2, 2))
    assert len(calls) == 1


def test_kernel_build_is_cached_by_source_compiler_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CAFFE_COMPAT_CACHE", str(tmp_path))
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: said all the same
    built = native._built(lrn.KERNEL_SOURCE)
    assert sys.stderr.getvalue().startswith("caffe-compat: building lrn_kernel.c with ")
    assert built.parent == tmp_path / "native" and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    assert native._built(lrn.KERNEL_SOURCE) == built and built.stat().st_mtime_ns == stamp
    assert sys.stderr.getvalue().count("building") == 1
    built.write_bytes(b"damaged")  # a cached build that cannot load is rebuilt once
    library = native._build_and_load(lrn.KERNEL_SOURCE)
    assert library is not None and hasattr(library, "lrn_forward_f32")
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == [built.name]


@pytest.mark.parametrize("compiler,message", [("/nonexistent/cc", "not found"), ("false", "exited with 1")])
def test_without_a_working_compiler_one_warning_and_no_file(tmp_path, monkeypatch, compiler, message):
    monkeypatch.setenv("CAFFE_COMPAT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", compiler)
    with pytest.warns(UserWarning, match=f"lrn_kernel.c: no native build .*{message}.*slower PyTorch form"):
        assert native._build_and_load(lrn.KERNEL_SOURCE) is None
    folder = tmp_path / "native"
    assert (list(folder.iterdir()) if folder.exists() else []) == []


def test_switched_off_by_the_environment_without_a_warning(tmp_path, monkeypatch, recwarn):
    monkeypatch.setenv("CAFFE_COMPAT_NATIVE", "0")
    monkeypatch.setenv("CAFFE_COMPAT_CACHE", str(tmp_path))
    assert native._build_and_load(lrn.KERNEL_SOURCE) is None
    assert not recwarn.list and not os.path.exists(tmp_path / "native")
