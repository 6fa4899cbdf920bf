"""Shape rules of the layers that bring data in (data layers, DummyData, Python layers)
or score the net (losses, Accuracy)."""
from __future__ import annotations

from ..deploy import _batch_size, _data_shape
from ..params.layer import dummy_data_shapes
from .base import RULES, rule


@rule("EuclideanLoss", "ContrastiveLoss", "SigmoidCrossEntropyLoss", "HingeLoss", "MultinomialLogisticLoss",
      "LiftedStructSimilaritySoftmaxLoss")
def _loss(v):
    return [()], []


@rule("SoftmaxWithLoss", "InfogainLoss")
def _softmax_with_loss(v):
    return [()] + [v.bottom_shapes[0]] * (len(v.tops) - 1), []


@rule("Accuracy")
def _accuracy(v):
    shape = v.bottom_shapes[0]
    axis = v.canonical_axis(v.param.accuracy_param.axis, len(shape))
    return [()] + [(shape[axis],)] * (len(v.tops) - 1), []


@rule("HDF5Output")
def _hdf5_output(v):
    return [], []


@rule("Data", "ImageData")
def _data(v):
    # the size the layer declares (crop_size, new_height/new_width), as a deploy net's input has
    shape = _data_shape(v.param)
    if shape is None:
        where = "image_data_param.new_height/new_width or " if v.type == "ImageData" else ""
        v.unknown(f"the image size is in the records, not the prototxt (no {where}transform_param.crop_size)")
    return [shape, (_batch_size(v.param),)][:len(v.tops)], []


@rule("HDF5Data")
def _hdf5_data(v):
    for top in v.tops:
        v.unknown(f"top '{top}': its shape is in the HDF5 files, not the prototxt")
    return [None] * len(v.tops), []


@rule("DummyData")
def _dummy_data(v):
    return dummy_data_shapes(v), []


@rule("Python")
def _python(v):
    p = v.param.python_param
    ported = RULES.get(f"Python:{p.module}.{p.layer}")  # a class built in (shapes/roi.py)
    if ported is not None:
        return ported(v)
    v.unknown(f"a Python layer ({v.param.python_param.module}.{v.param.python_param.layer}): its code shapes its tops")
    return [None] * len(v.tops), []
