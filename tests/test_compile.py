"""load_net(compile=True): torch.compile's inductor (a small net: its C++ build is slow here) gives the eager numbers, new batch
sizes run without a recompile, and the wrapper still answers as the CaffeNet does."""
import textwrap

import torch

from caffe_compat.layers.inner_product import InnerProduct
from caffe_compat.loading import load_net

NET = textwrap.dedent("""\
    name: "tiny"
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
            convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
    layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
    layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
            inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
    """)


def test_compiled_net_equals_eager_at_two_batch_sizes(tmp_path):
    path = tmp_path / "tiny.prototxt"
    path.write_text(NET)
    torch.manual_seed(0)
    torch._dynamo.reset()  # the graph counter below is the process's: count this test's graphs only
    torch._dynamo.utils.counters.clear()
    eager = load_net(path)
    compiled = load_net(path, compile=True)
    compiled.net.load_state_dict(eager.state_dict())
    assert compiled.input_names == eager.input_names and compiled.blob_shapes == eager.blob_shapes
    with torch.no_grad():
        for batch in (2, 5):
            x = torch.randn(batch, 3, 9, 9)
            torch.testing.assert_close(compiled(x)["fc"], eager(x)["fc"], rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


FOLDED_NET = textwrap.dedent("""\
    name: "tiny_bn"
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
            convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
    layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { use_global_stats: true } }
    layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
    layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
    layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
            inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
    """)


def test_eval_compiles_the_folded_fast_path_and_follows_weight_changes(tmp_path):
    """In eval mode without autograd the compiled function is the fast path's (BatchNorm and
    Scale folded, its tensors frozen by inductor): a new batch size reuses it, and an
    in-place change of any weight (frozen into the code) makes a new one."""
    path = tmp_path / "tiny_bn.prototxt"
    path.write_text(FOLDED_NET)
    torch.manual_seed(0)
    eager = load_net(path).eval()
    with torch.no_grad():
        for name, blob in eager.state_dict().items():
            if blob.is_floating_point():
                blob.copy_(torch.rand_like(blob) + 0.5)  # BatchNorm's variance and factor positive
    compiled = load_net(path, compile=True).eval()
    compiled.net.load_state_dict(eager.state_dict())
    with torch.no_grad():
        for batch in (2, 5):
            x = torch.randn(batch, 3, 9, 9)
            torch.testing.assert_close(compiled(x)["fc"], eager(x)["fc"], rtol=1e-5, atol=1e-5)
        program = compiled._program
        assert program is not None and program.any_batch
        # the InnerProduct's weight: folded into nothing, yet frozen into the compiled code
        next(m for m in compiled.net.modules() if isinstance(m, InnerProduct)).weight.mul_(2)
        eager.load_state_dict(compiled.net.state_dict())
        x = torch.randn(3, 3, 9, 9)
        torch.testing.assert_close(compiled(x)["fc"], eager(x)["fc"], rtol=1e-5, atol=1e-5)
        assert compiled._program is not program
