"""`torch.compile` of a converted net, the batch axis dynamic.

In eval mode without autograd, with `fold` (the default), what is compiled is the
inference fast path's function (`inference.build_program`): BatchNorm and Scale already
folded into the convolutions, channels-last on CPU, and every tensor a parameter that
inductor's freezing turns into constants (it then prepacks the convolutions' weights
and fuses ReLU into them). Otherwise (training, `blobs=`, `fold=False`) the CaffeNet's
own forward is compiled, layer by layer as Caffe runs it.

Inductor caches what it generates (its FX graph cache, under TORCHINDUCTOR_CACHE_DIR,
by default /tmp/torchinductor_<user>), so a second process compiling the same net with
the same shapes reuses the kernels instead of rebuilding them.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Sequence

import torch
from torch import nn

from .inference import build_program


class CompiledNet(nn.Module):
    """A `CaffeNet` run through torch.compile: same call signature and outputs. Every
    tensor input's first axis is marked dynamic, so new batch sizes do not recompile.
    Where the backend cannot compile (no C++ compiler, an unsupported op), the first call
    warns once and the net runs eagerly from then on."""

    def __init__(self, net: nn.Module, backend: str = "inductor", mode=None):
        super().__init__()
        self.net = net
        self.backend = backend
        self.mode = mode
        self._compiled = torch.compile(net, backend=backend, mode=mode)
        self._program = None  # the fast path's function and its compiled form, once built
        self._compiled_program = None
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
            if "blobs" not in named and self.net.fold:
                bound = self.net._bind(inputs, named)
                if self.net._takes_fast_path(bound):
                    return self._infer([bound[name] for name in self.net.input_names])
            return self._compiled(*inputs, **named)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            warnings.warn(f"torch.compile ({self.backend}) failed, running eagerly: "
                          f"{str(err).splitlines()[0]}", stacklevel=2)
            self._eager = True
            return self.net(*inputs, **named)

    def _infer(self, inputs: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self._program is None or not self._program.fits(self.net.fold, inputs):
            self._program = build_program(self.net, inputs, for_compile=True)
            self._compiled_program = torch.compile(self._program.function, backend=self.backend, mode=self.mode)
        if self.backend == "inductor":
            from torch._inductor import config as inductor_config

            freezing = inductor_config.patch(freezing=True)
        else:
            freezing = contextlib.nullcontext()
        try:
            with freezing:
                outputs = self._compiled_program(*inputs)
        except RuntimeError as err:
            if isinstance(err, torch._dynamo.exc.BackendCompilerFailed):  # forward warns, and runs eagerly
                raise
            # Bottoms of another size than the net was built for: the per-layer path names the layer.
            return self.net(*inputs, blobs=list(self.net.output_names))
        return dict(zip(self.net.output_names, outputs))

    def train(self, mode: bool = True):
        self._program = self._compiled_program = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._program = self._compiled_program = None  # .to() and the like replace the frozen tensors
        return super()._apply(fn, *args, **kwargs)


def compile_net(net: nn.Module, backend: str = "inductor", mode=None) -> CompiledNet:
    return CompiledNet(net, backend, mode)
