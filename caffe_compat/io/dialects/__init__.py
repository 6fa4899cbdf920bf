"""Caffe's dialects: one entry per fork, as data.

A dialect is one fork's caffe.proto: BVLC's schema (caffe_compat.proto.caffe_pb2) with
the fork's changes laid over it, written as a .proto snippet in this folder (the
LayerParameter fields it adds, name, number and message, and the messages it adds or
changes), plus the layer types the fork brings, each with its LayerParameter field.
Adding a fork is one entry here and one snippet. Where several dialects read a file
equally well, the first listed wins (and a note names the others).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from typing import Dict, List, Mapping, Optional, Tuple

from ...errors import CaffeCompatError


@dataclass(frozen=True)
class Dialect:
    name: str
    fork: str  # where its files come from, as their users know it
    snippet: Optional[str] = None  # the .proto file here holding its changes to BVLC's schema
    # Layer types the fork brings -> their LayerParameter field ("" for a type without one).
    layer_types: Mapping[str, str] = field(default_factory=dict)
    # Each blob's rank, for its types whose name forks share (a caffemodel's BN layer of 2
    # blobs is SegNet's, of 4 (1, C, 1, 1) PSPNet's, of 4 (1, C) TSN's): a layer whose
    # blobs differ does not show the fork.
    blob_ranks: Mapping[str, Tuple[int, ...]] = field(default_factory=dict)


ENTRIES: Dict[str, Dialect] = {entry.name: entry for entry in (
    # BVLC's own types listed are those whose field numbers forks give other meanings.
    Dialect("bvlc", "BVLC Caffe 1.0", None, {
        "Embed": "embed_param", "Tile": "tile_param", "BatchNorm": "batch_norm_param", "ELU": "elu_param",
        "Bias": "bias_param", "Scale": "scale_param", "Input": "input_param", "Crop": "crop_param",
        "Parameter": "parameter_param", "Recurrent": "recurrent_param", "RNN": "recurrent_param",
        "LSTM": "recurrent_param", "Swish": "swish_param", "Clip": "clip_param"}),
    Dialect("lifted", "the lifted-loss paper's fork (rksltnl/Caffe-Deep-Metric-Learning-CVPR16)", "lifted.proto", {
        "LiftedStructSimilaritySoftmaxLoss": "lifted_struct_sim_softmax_loss_param"}),
    Dialect("ssd", "the SSD fork (weiliu89/caffe, branch ssd)", "ssd.proto", {
        "AnnotatedData": "annotated_data_param", "MultiBoxLoss": "multibox_loss_param",
        "Permute": "permute_param", "PriorBox": "prior_box_param",
        "DetectionOutput": "detection_output_param", "DetectionEvaluate": "detection_evaluate_param",
        "Normalize": "norm_param", "VideoData": "video_data_param", "SmoothL1Loss": ""}),
    Dialect("ceil-mode", "the ceil_mode pooling forks (BVLC PR 3057: DenseNet-Caffe, ResNeXt, SENet nets)",
            "ceil_mode.proto"),
    Dialect("pspnet", "PSPNet / DeepLab-v2 (hszhao/PSPNet)", "pspnet.proto", {
        "Interp": "interp_param", "BN": "bn_param"}, {"BN": (4, 4, 4, 4)}),
    Dialect("tsn", "TSN (yjxiong/caffe, branch action_recog)", "tsn.proto", {"BN": "bn_param"}, {"BN": (2, 2, 2, 2)}),
    Dialect("segnet", "SegNet (alexgkendall/caffe-segnet)", "segnet.proto", {
        "BN": "bn_param", "Upsample": "upsample_param", "DenseImageData": "dense_image_data_param"}, {"BN": (4, 4)}),
    Dialect("faster-rcnn", "Fast/Faster R-CNN (rbgirshick/caffe-fast-rcnn)", "faster_rcnn.proto", {
        "ROIPooling": "roi_pooling_param"}),
    Dialect("rfcn", "R-FCN (daijifeng001/caffe-rfcn)", "rfcn.proto", {
        "PSROIPooling": "psroi_pooling_param", "ROIPooling": "roi_pooling_param"}),
    Dialect("shufflenet", "ShuffleNet (farmingyard/ShuffleNet)", "shufflenet.proto", {
        "ShuffleChannel": "shuffle_channel_param"}),
    Dialect("mobilenet", "MobileNet's depthwise convolution (farmingyard/caffe-mobilenet, BVLC PR 5665)", None, {
        "ConvolutionDepthwise": "convolution_param"}),
    Dialect("depthwise", "DepthwiseConvolution (yonghenglh6/DepthwiseConvolution)", None, {
        "DepthwiseConvolution": "convolution_param"}),
    Dialect("mobilenet-yolo", "MobileNet-YOLO (eric612/MobileNet-YOLO)", "mobilenet_yolo.proto", {
        "ReLU6": "relu6_param", "Upsample": "upsample_param"}),
    Dialect("senet", "SENet (hujie-frank/SENet)", None, {"Axpy": ""}),
    # Last: OpenCV gathers other forks' layers, a tie goes to the fork they come from.
    Dialect("opencv", "OpenCV's Caffe importer (opencv/opencv, opencv-caffe.proto)", "opencv.proto", {
        "DetectionOutput": "detection_output_param", "Permute": "permute_param",
        "Normalize": "norm_param", "PriorBox": "prior_box_param", "Proposal": "proposal_param",
        "PSROIPooling": "psroi_pooling_param", "ROIPooling": "roi_pooling_param"}),
    # After OpenCV: its norm_param is 149 too, and an empty one fits both; a PSROIPooling
    # layer always sets spatial_scale, a float where OpenCV's field 1 is a bool.
    Dialect("rfcn-microsoft", "R-FCN in Microsoft's Caffe (py-R-FCN's submodule)", "rfcn_microsoft.proto", {
        "PSROIPooling": "psroi_pooling_param"}),
)}


def forks_of_type(layer_type: str) -> List[Dialect]:
    """The forks that bring `layer_type` (none for BVLC's own types and types no entry knows)."""
    return [d for d in ENTRIES.values() if d.name != "bvlc" and layer_type in d.layer_types]


def likely_fork(layer_type: str) -> str:
    """Where a layer type likely comes from, in words, for messages."""
    forks = forks_of_type(layer_type)
    if not forks:
        return "a fork this project has no entry for"
    return " or ".join(f"{d.fork} [dialect {d.name}]" for d in forks)


def entry(name: str) -> Dialect:
    try:
        return ENTRIES[name]
    except KeyError:
        raise CaffeCompatError(f"unknown Caffe dialect {name!r}; valid: {', '.join(ENTRIES)}") from None


# Layer parameters added from Python (caffe_compat.layers.register(..., param=...)), each
# (messages, enums, source) as parsed; every dialect's schema gains them.
_ADDED: List[tuple] = []
_ADDED_TYPES: set = set()  # the layer types they were registered for


def added_types() -> frozenset:
    """Layer types registered from Python with their parameter: evidence of no fork."""
    return frozenset(_ADDED_TYPES)


def generation() -> int:
    """How many additions the schemas have had: caches of classes built from them key on it."""
    return len(_ADDED)


def has_additions() -> bool:
    return bool(_ADDED)


def schema_file(name: str):
    """The dialect's whole caffe.proto, as a FileDescriptorProto (package caffe)."""
    return _schema_file(entry(name).name, generation())


@functools.lru_cache(maxsize=None)
def _schema_file(name: str, _generation: int):
    # Imported here: the CLI reads ENTRIES (for --dialect) without loading protobuf.
    from google.protobuf import descriptor_pb2

    from ...proto import caffe_pb2
    from . import snippet

    dialect = ENTRIES[name]
    file_proto = descriptor_pb2.FileDescriptorProto.FromString(caffe_pb2.DESCRIPTOR.serialized_pb)
    if dialect.snippet:
        text = resources.files(__package__).joinpath(dialect.snippet).read_text(encoding="utf-8")
        snippet.apply(file_proto, text, f"dialect {name} ({dialect.snippet})")
    for messages, enums, source in _ADDED:
        # A dialect that already uses the name or number keeps its own (the fork's files say which).
        if not _clash(file_proto, messages, enums):
            snippet.apply_parsed(file_proto, messages, enums, source)
    return file_proto


def _clash(file_proto, messages, enums) -> str:
    """What in `file_proto` the addition would change, in words ("" when nothing)."""
    layer = next(m for m in file_proto.message_type if m.name == "LayerParameter")
    taken = {f.name: f for f in layer.field} | {f.number: f for f in layer.field}
    names = {m.name for m in file_proto.message_type} | {e.name for e in file_proto.enum_type}
    for message in messages:
        if message.name != "LayerParameter":
            if message.name in names:
                return f"message {message.name} exists"
            continue
        for declared in message.field:
            for key in (declared.name, declared.number):
                if key in taken:
                    return f"LayerParameter field {taken[key].number} is {taken[key].name}"
    return next((f"enum {e.name} exists" for e in enums if e.name in names), "")


def add_layer_parameter(param, layer_field: Optional[tuple], source: str, layer_types=()) -> None:
    """Add a layer's parameter message to every dialect's schema: `param` is a .proto
    snippet (its messages, and the LayerParameter field unless `layer_field` names it) or a
    message Descriptor; `layer_field` is (name, number) of its LayerParameter field. Refused
    when BVLC's schema already uses a name or number it needs."""
    from google.protobuf import descriptor_pb2

    from . import snippet

    if isinstance(param, str):
        messages, enums = snippet.parse(param, source)
    elif hasattr(param, "CopyToProto") and hasattr(param, "fields"):
        message = descriptor_pb2.DescriptorProto()
        param.CopyToProto(message)
        _relative_types(message, param.file.package)
        messages, enums = [message], []
    else:
        raise CaffeCompatError(f"{source}: param must be a .proto snippet (str) or a message Descriptor, "
                               f"not {type(param).__name__}")
    if layer_field is not None:
        name, number = layer_field if isinstance(layer_field, tuple) and len(layer_field) == 2 else (None, None)
        target = next((m.name for m in messages if m.name != "LayerParameter"), None)  # the first message
        if not isinstance(name, str) or not isinstance(number, int) or target is None:
            raise CaffeCompatError(f"{source}: field must be (name, number) of the LayerParameter field holding "
                                   f"param's message, got {layer_field!r}")
        messages.append(descriptor_pb2.DescriptorProto(name="LayerParameter", field=[descriptor_pb2.FieldDescriptorProto(
            name=name, number=number, label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, type_name=target)]))
    if not any(m.name == "LayerParameter" and m.field for m in messages):
        raise CaffeCompatError(f"{source}: no LayerParameter field holds the parameter: give field=(name, number) "
                               f"or declare it in the snippet (message LayerParameter {{ optional ... = N; }})")
    base = _schema_file("bvlc", generation())
    clash = _clash(base, messages, enums)
    if clash:
        raise CaffeCompatError(f"{source}: {clash} in BVLC's schema already; choose another name or number")
    trial = type(base)()
    trial.CopyFrom(base)
    snippet.apply_parsed(trial, messages, enums, source)  # every type resolves, or this names the one that does not
    _ADDED.append((messages, enums, source))
    _ADDED_TYPES.update(layer_types)


def _relative_types(message, package: str) -> None:
    """Type names of a Descriptor's copy, made relative (its package's or caffe's), so they
    resolve in the caffe schema."""
    for declared in message.field:
        for prefix in (f".{package}.", ".caffe."):
            if declared.type_name.startswith(prefix):
                declared.type_name = declared.type_name[len(prefix):]
                break
    for nested in message.nested_type:
        _relative_types(nested, package)
