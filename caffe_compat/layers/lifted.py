"""LiftedStructSimilaritySoftmaxLoss, the paper fork's loss layer."""
from __future__ import annotations

from ..losses.lifted import LiftedStructSimilaritySoftmaxLoss, lifted_shape_error
from .registry import Converted, LayerContext, register

LIFTED_PARAM_FIELD = "lifted_struct_sim_softmax_loss_param"
DEFAULT_MARGIN = 1.0  # the fork's caffe.proto default


def lifted_margin(param) -> float:
    """The layer's margin. A net parsed in the BVLC dialect has no such field (there
    field 145 is parameter_param), so it gets the fork's default."""
    if not hasattr(param, LIFTED_PARAM_FIELD):
        return DEFAULT_MARGIN
    return float(getattr(param, LIFTED_PARAM_FIELD).margin)


@register("LiftedStructSimilaritySoftmaxLoss")
def build_lifted(ctx: LayerContext) -> Converted:
    ctx.expect_bottoms(2)
    problem = lifted_shape_error(ctx.bottom_shapes[0], ctx.bottom_shapes[1])
    if problem:
        raise ctx.error(problem)
    return ctx.wire(LiftedStructSimilaritySoftmaxLoss(lifted_margin(ctx.param)), top_shapes=[()])
