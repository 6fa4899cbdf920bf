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
from typing import Dict, Mapping, Optional

from ...errors import CaffeCompatError


@dataclass(frozen=True)
class Dialect:
    name: str
    fork: str  # where its files come from, as their users know it
    snippet: Optional[str] = None  # the .proto file here holding its changes to BVLC's schema
    # Layer types the fork brings -> their LayerParameter field ("" for a type without one).
    layer_types: Mapping[str, str] = field(default_factory=dict)


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
        "Interp": "interp_param", "BN": "bn_param"}),
    Dialect("segnet", "SegNet (alexgkendall/caffe-segnet)", "segnet.proto", {
        "BN": "bn_param", "Upsample": "upsample_param", "DenseImageData": "dense_image_data_param"}),
    Dialect("faster-rcnn", "Fast/Faster R-CNN (rbgirshick/caffe-fast-rcnn)", "faster_rcnn.proto", {
        "ROIPooling": "roi_pooling_param"}),
    Dialect("rfcn", "R-FCN (daijifeng001/caffe-rfcn)", "rfcn.proto", {
        "PSROIPooling": "psroi_pooling_param", "ROIPooling": "roi_pooling_param"}),
    Dialect("rfcn-microsoft", "R-FCN in Microsoft's Caffe (py-R-FCN's submodule)", "rfcn_microsoft.proto", {
        "PSROIPooling": "psroi_pooling_param", "ROIPooling": "roi_pooling_param"}),
    Dialect("shufflenet", "ShuffleNet (farmingyard/ShuffleNet)", "shufflenet.proto", {
        "ShuffleChannel": "shuffle_channel_param"}),
    Dialect("mobilenet", "MobileNet's depthwise convolution (farmingyard/caffe-mobilenet, BVLC PR 5665)", None, {
        "ConvolutionDepthwise": "convolution_param"}),
    Dialect("depthwise", "DepthwiseConvolution (yonghenglh6/DepthwiseConvolution)", None, {
        "DepthwiseConvolution": "convolution_param"}),
    Dialect("mobilenet-yolo", "MobileNet-YOLO (eric612/MobileNet-YOLO)", "mobilenet_yolo.proto", {
        "ReLU6": "relu6_param"}),
    Dialect("senet", "SENet (hujie-frank/SENet)", None, {"Axpy": ""}),
    # Last: OpenCV gathers other forks' layers, a tie goes to the fork they come from.
    Dialect("opencv", "OpenCV's Caffe importer (opencv/opencv, opencv-caffe.proto)", "opencv.proto", {
        "DetectionOutput": "detection_output_param", "Permute": "permute_param",
        "Normalize": "norm_param", "PriorBox": "prior_box_param", "Proposal": "proposal_param",
        "PSROIPooling": "psroi_pooling_param", "ROIPooling": "roi_pooling_param"}),
)}


def entry(name: str) -> Dialect:
    try:
        return ENTRIES[name]
    except KeyError:
        raise CaffeCompatError(f"unknown Caffe dialect {name!r}; valid: {', '.join(ENTRIES)}") from None


@functools.lru_cache(maxsize=None)
def schema_file(name: str):
    """The dialect's whole caffe.proto, as a FileDescriptorProto (package caffe)."""
    # Imported here: the CLI reads ENTRIES (for --dialect) without loading protobuf.
    from google.protobuf import descriptor_pb2

    from ...proto import caffe_pb2
    from . import snippet

    dialect = entry(name)
    file_proto = descriptor_pb2.FileDescriptorProto.FromString(caffe_pb2.DESCRIPTOR.serialized_pb)
    if dialect.snippet:
        text = resources.files(__package__).joinpath(dialect.snippet).read_text(encoding="utf-8")
        snippet.apply(file_proto, text, f"dialect {name} ({dialect.snippet})")
    return file_proto
