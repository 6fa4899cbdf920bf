"""`export-onnx --embed-preprocessing`: a graph that takes images as a deployer has them
(uint8, RGB or BGR, NHWC or NCHW) and does Caffe's DataTransformer itself: channel order
to BGR, the centre crop of the TEST phase, the mean (per channel, or the mean image at
the crop's place), the scale, in Caffe's float32 order: (pixel - mean) * scale."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np
from onnx import TensorProto, helper

from ..errors import CaffeCompatError
from ..io.files import read_binaryproto
from ..layers.onnx_graph import OnnxGraph
from .preprocess import resolve_mean_file

CHANNEL_ORDERS = ("rgb", "bgr")
LAYOUTS = ("nhwc", "nchw")
IMAGE_INPUT = "image"


@dataclass
class ImageFront:
    """What the embedded preprocessing reads and computes, for one image input."""
    channel_order: str  # of the images given: rgb or bgr
    layout: str  # nhwc or nchw
    channels: int
    crop: int  # 0: none
    scale: float
    mean_values: Optional[np.ndarray]  # (C,) float32
    mean_image: Optional[np.ndarray]  # (C, H, W) float32

    def image_shape(self, net_height: int, net_width: int, batch) -> List:
        """The image input's shape: the mean image's size where there is one (Caffe requires
        the image to match it), any size with a crop, else the net's own."""
        if self.mean_image is not None:
            height, width = self.mean_image.shape[1:]
        elif self.crop:
            height, width = "H", "W"
        else:
            height, width = net_height, net_width
        dims = [batch, height, width, self.channels]
        return dims if self.layout == "nhwc" else [batch, self.channels, height, width]

    def describe(self) -> str:
        order = "gray" if self.channels == 1 else self.channel_order.upper()
        return (f"uint8 {order} {self.layout.upper()} images in; the graph converts to Caffe's BGR NCHW float, "
                + (f"crops the centre {self.crop}x{self.crop}, " if self.crop else "")
                + ("subtracts the mean image, " if self.mean_image is not None
                   else "subtracts the channel means, " if self.mean_values is not None else "")
                + f"scales by {self.scale:g}")


def image_front(props: Mapping[str, str], channel_order: str, layout: str,
                base_dir: Optional[Union[str, Path]]) -> ImageFront:
    """The front the recorded preprocessing (`preprocess.*` metadata) asks for."""
    if channel_order not in CHANNEL_ORDERS:
        raise CaffeCompatError(f"--embed-preprocessing {channel_order}: give one of {', '.join(CHANNEL_ORDERS)}")
    if layout not in LAYOUTS:
        raise CaffeCompatError(f"--image-layout {layout}: give one of {', '.join(LAYOUTS)}")
    if "preprocess.channel_order" not in props:
        raise CaffeCompatError("--embed-preprocessing: the net has no image input (4-D, 1 or 3 channels)")
    if "preprocess.mean_file_error" in props:
        raise CaffeCompatError(f"--embed-preprocessing: the mean file {props['preprocess.mean_file']} is not readable "
                               f"here; give --mean-value B G R or --mean-file")
    channels = 1 if props["preprocess.channel_order"] == "gray" else 3
    mean_values = mean_image = None
    if props.get("preprocess.mean_kind") == "mean_value":
        mean_values = np.asarray([float(v) for v in props["preprocess.mean"].split(",")], np.float32)
    elif "preprocess.mean_file" in props:
        path = resolve_mean_file(props["preprocess.mean_file"], base_dir)
        mean = read_binaryproto(path)
        mean_image = mean.reshape(mean.shape[-3:]).astype(np.float32)
    return ImageFront(channel_order, layout, channels, int(props.get("preprocess.crop_size", 0)),
                      float(props.get("preprocess.scale", 1.0)), mean_values, mean_image)


def append_front(g: OnnxGraph, front: ImageFront, image: str, output: str) -> None:
    """Nodes from the uint8 `image` input to `output`, the net's float image input."""
    (x,) = g.node("Cast", [image], hint="image/float", to=TensorProto.FLOAT)
    if front.layout == "nhwc":
        (x,) = g.node("Transpose", [x], hint="image/nchw", perm=[0, 3, 1, 2])
    if front.channels == 3 and front.channel_order == "rgb":
        (x,) = g.node("Gather", [x, g.ints([2, 1, 0], "image/bgr_order")], hint="image/bgr", axis=1)
    mean = None if front.mean_values is None else g.floats(front.mean_values.reshape(-1, 1, 1), "image/mean")
    if front.crop:
        starts = _centre_offsets(g, x, front.crop)
        ends = g.node("Add", [starts, g.ints([front.crop] * 2, "image/crop_size")], hint="image/crop_ends")[0]
        axes = g.ints([2, 3], "image/crop_axes")
        (x,) = g.node("Slice", [x, starts, ends, axes], hint="image/cropped")
        if front.mean_image is not None:
            whole = g.floats(front.mean_image[None], "image/mean_image")
            (mean,) = g.node("Slice", [whole, starts, ends, axes], hint="image/mean_cropped")
    elif front.mean_image is not None:
        mean = g.floats(front.mean_image[None], "image/mean_image")
    if mean is not None:
        (x,) = g.node("Sub", [x, mean], hint="image/centred")
    g.node("Mul", [x, g.floats(front.scale, "image/scale")], [output])  # Caffe scales always, 1 included


def _centre_offsets(g: OnnxGraph, x: str, crop: int) -> str:
    """[(H - crop) / 2, (W - crop) / 2], as Caffe's TEST-phase crop (integer division)."""
    (shape,) = g.node("Shape", [x], hint="image/shape")
    (sizes,) = g.node("Gather", [shape, g.ints([2, 3], "image/hw_axes")], hint="image/hw")
    (margin,) = g.node("Sub", [sizes, g.ints([crop, crop], "image/crop_hw")], hint="image/margin")
    (offsets,) = g.node("Div", [margin, g.ints([2, 2], "image/two")], hint="image/crop_starts")
    return offsets


def image_input(front: ImageFront, net_shape: Sequence[int], batch) -> object:
    return helper.make_tensor_value_info(IMAGE_INPUT, TensorProto.UINT8,
                                         front.image_shape(net_shape[2], net_shape[3], batch))
