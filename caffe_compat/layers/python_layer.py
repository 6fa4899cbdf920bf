"""`Python` layers: Caffe runs python_param.layer from python_param.module in its
embedded interpreter, code this project does not have. A user who ports such a layer
to PyTorch registers its builder under "Python:<module>.<layer>" with the usual hook,
`@caffe_compat.layers.register("Python:pyloss.EuclideanLossLayer")`; the Python type
hands each layer to the builder of its class, and names the class when none is
registered. Classes whose code is known are built in the same way: py-faster-rcnn's
rpn.proposal_layer.ProposalLayer (layers/proposal.py)."""
from __future__ import annotations

from .registry import REGISTRY, Converted, LayerContext, no_source_form, register, register_source


def python_type(module: str, layer: str) -> str:
    """The registry key of one ported Python layer class."""
    return f"Python:{module}.{layer}"


@register("Python")
def build_python(ctx: LayerContext) -> Converted:
    param = ctx.param.python_param
    key = python_type(param.module, param.layer)
    entry = REGISTRY.get(key)
    if entry is None or entry.build is None:
        raise ctx.error(f"is a Python layer, class '{param.layer}' of module '{param.module}', whose code "
                        f"Caffe imports at run time; port it to PyTorch and register its builder with "
                        f"@caffe_compat.layers.register('{key}') before building the net")
    return entry.build(ctx)


@register_source("Python")
def python_to_source(src, ctx, module, inputs, outputs):
    """The source emitter of the layer's class, where it has one."""
    param = ctx.param.python_param
    entry = REGISTRY.get(python_type(param.module, param.layer))
    if entry is None or entry.to_source is None:
        raise no_source_form(ctx, f"a Python layer, class '{param.layer}' of module '{param.module}', "
                                  f"ported by its user to PyTorch")
    entry.to_source(src, ctx, module, inputs, outputs)
