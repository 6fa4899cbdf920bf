"""Caffe's data layers, `Data` (an LMDB of Datum records) and `ImageData` (a list file of
images), as registry entries; the reading, transforming and prefetching is
caffe_compat.data's.
"""
from __future__ import annotations

from ..data import ImageListLayer, LmdbDataLayer
from .registry import LayerContext, register

_DEPRECATED_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def _check_common(ctx: LayerContext, param, field: str) -> None:
    if ctx.bottoms:
        raise ctx.error("a data layer takes no bottoms")
    if len(ctx.tops) not in (1, 2):
        raise ctx.error(f"expects 1 or 2 tops (data, label), got {len(ctx.tops)}")
    stale = [f for f in _DEPRECATED_FIELDS if param.HasField(f)]
    if stale:
        raise ctx.error(f"{field}.{', '.join(stale)} is deprecated; move it to transform_param")


@register("Data")
def build_data(ctx: LayerContext):
    _check_common(ctx, ctx.param.data_param, "data_param")
    module = LmdbDataLayer(ctx.name, ctx.param.data_param, ctx.param.transform_param, ctx.phase,
                           output_labels=len(ctx.tops) == 2)
    return ctx.wire(module, top_shapes=module.top_shapes())


@register("ImageData")
def build_image_data(ctx: LayerContext):
    _check_common(ctx, ctx.param.image_data_param, "image_data_param")
    # Caffe's prefetching layers all take their queue depth from data_param.prefetch.
    module = ImageListLayer(ctx.name, ctx.param.image_data_param, ctx.param.transform_param, ctx.phase,
                            output_labels=len(ctx.tops) == 2, prefetch=int(ctx.param.data_param.prefetch))
    return ctx.wire(module, top_shapes=module.top_shapes())

