"""`torch.compile` of a converted net, the batch axis dynamic.

Inductor caches what it generates (its FX graph cache, under TORCHINDUCTOR_CACHE_DIR,
by default /tmp/torchinductor_<user>), so a second process compiling the same net with
the same shapes reuses the kernels instead of rebuilding them.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


class CompiledNet(nn.Module):
    """A `CaffeNet` run through torch.compile: same call signature and outputs. Every
    tensor input's first axis is marked dynamic, so new batch sizes do not recompile.
    Where the backend cannot compile (no C++ compiler, an unsupported op), the first call
    warns once and the net runs eagerly from then on."""

    def __init__(self, net: nn.Module, backend: str = "inductor", mode=None):
        super().__init__()
        self.net = net
        self.backend = backend
        self._compiled = torch.compile(net, backend=backend, mode=mode)
        self._eager = False

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the CaffeNet's own attributes (blob_shapes, input_names, ...)
            return getattr(self.net, name)

    def forward(self, *inputs, **named):
        if self._eager:
            return self.net(*inputs, **named)
        for value in list(inputs) + list(named.values()):
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(value, 0)
        try:
            return self._compiled(*inputs, **named)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            warnings.warn(f"torch.compile ({self.backend}) failed, running eagerly: "
                          f"{str(err).splitlines()[0]}", stacklevel=2)
            self._eager = True
            return self.net(*inputs, **named)


def compile_net(net: nn.Module, backend: str = "inductor", mode=None) -> CompiledNet:
    return CompiledNet(net, backend, mode)
