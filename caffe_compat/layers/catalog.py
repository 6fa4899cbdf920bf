"""The built-in Caffe layer types, without importing their builders.

For each type: the family module under `caffe_compat.layers` that registers its builder
(imported on the first lookup of the type, see `registry.REGISTRY`) and whether that
module also registers an ONNX emitter. Listing types (`caffe-compat layers`) and
inspecting nets thus need neither torch nor onnx. tests/test_registry.py keeps this
table equal to what the family modules register.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from ..io.dialects import forks_of_type

# family module -> {Caffe type: has an ONNX emitter}
FAMILIES: Dict[str, Dict[str, bool]] = {
    "activation": {"ReLU": True, "PReLU": True, "ELU": True, "Sigmoid": True, "TanH": True, "AbsVal": True,
                   "BNLL": True, "Power": True, "Exp": True, "Log": True, "Threshold": True, "Dropout": True},
    "axpy": {"Axpy": True},
    "bn": {"BN": True},
    "clip_swish": {"Clip": True, "Swish": True},
    "convolution": {"Convolution": True, "Deconvolution": True, "Im2col": True},
    "crop": {"Crop": True},
    "data": {"Data": False, "ImageData": False},
    "depthwise": {"ConvolutionDepthwise": True, "DepthwiseConvolution": True},
    "eltwise": {"Eltwise": True},
    "hdf5": {"HDF5Data": False, "HDF5Output": False},
    "inner_product": {"InnerProduct": True, "Embed": True},
    "interp": {"Interp": True},
    "l2_normalize": {"Normalize": True},
    "lifted": {"LiftedStructSimilaritySoftmaxLoss": False},
    "loss": {"SoftmaxWithLoss": False, "Accuracy": False, "EuclideanLoss": False, "ContrastiveLoss": False,
             "SigmoidCrossEntropyLoss": False, "HingeLoss": False, "MultinomialLogisticLoss": False,
             "InfogainLoss": False},
    "lrn": {"LRN": True},
    "normalization": {"BatchNorm": True, "Scale": True, "Bias": True, "MVN": True},
    "permute": {"Permute": True},
    "pooling": {"Pooling": True, "SPP": True},
    "proposal": {"Python:rpn.proposal_layer.ProposalLayer": False},
    "python_layer": {"Python": False},
    "recurrent": {"RNN": True, "LSTM": True, "LSTMUnit": True},
    "reduction": {"Reduction": True},
    "relu6": {"ReLU6": True},
    "roi_pooling": {"ROIPooling": False, "PSROIPooling": False},
    "shape": {"Concat": True, "Slice": True, "Split": True, "Flatten": True, "Reshape": True, "Tile": True,
              "Silence": True, "ArgMax": True},
    "select": {"Filter": True, "BatchReindex": True},
    "shuffle_channel": {"ShuffleChannel": True},
    "softmax": {"Softmax": True},
    "ssd": {"PriorBox": True, "DetectionOutput": True},
    "sources": {"DummyData": True, "Parameter": True},
    "upsample": {"Upsample": True},
}


@dataclass(frozen=True)
class CatalogEntry:
    type: str
    family: str  # module name under caffe_compat.layers
    onnx: bool

    @property
    def module(self) -> str:
        return f"{__package__}.{self.family}"

    @property
    def fork(self) -> str:
        """The dialects of the forks the type comes from (io/dialects), else bvlc."""
        return ", ".join(d.name for d in forks_of_type(self.type) if d.name != "opencv") or "bvlc"


CATALOG: Dict[str, CatalogEntry] = {
    layer_type: CatalogEntry(layer_type, family, onnx)
    for family, types in FAMILIES.items() for layer_type, onnx in types.items()
}


def entries() -> List[CatalogEntry]:
    return [CATALOG[t] for t in sorted(CATALOG, key=str.lower)]


def format_table() -> str:
    rows = [(e.type, "yes" if e.onnx else "no", e.family, e.fork) for e in entries()]
    width = max(len("type"), *(len(r[0]) for r in rows))
    family_width = max(len(r[2]) for r in rows)
    lines = [f"{'type':<{width}}  onnx  {'family':<{family_width}}  fork",
             f"{'-' * width}  ----  {'-' * family_width}  ----"]
    lines += [f"{t:<{width}}  {o:<4}  {f:<{family_width}}  {k}" for t, o, f, k in rows]
    lines.append(f"{len(rows)} Caffe layer types, {sum(e.onnx for e in entries())} with an ONNX mapping")
    return "\n".join(lines)


def format_markdown() -> str:
    """The README's table of supported layers."""
    lines = ["| Caffe type | ONNX | family | fork (dialect) |", "| --- | --- | --- | --- |"]
    lines += [f"| `{e.type}` | {'yes' if e.onnx else 'no'} | `layers/{e.family}.py` | {e.fork} |" for e in entries()]
    return "\n".join(lines)


def as_json() -> List[dict]:
    return [{"type": e.type, "onnx": e.onnx, "family": e.family, "fork": e.fork} for e in entries()]
