"""Caffe's DataTransformer (`transform_param`): crop, mirror, mean, scale on one image."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

from ..errors import CaffeCompatError
from ..io.files import read_binaryproto


def describe_path(path: str) -> str:
    """A path as the user wrote it, plus where a relative one was looked for."""
    if os.path.isabs(path):
        return f"'{path}'"
    return f"'{path}' (relative to the working directory {os.getcwd()})"


class Transformer:
    """Caffe's DataTransformer: crop, mirror, mean, scale on one C x H x W image."""

    def __init__(self, param, phase: str, where: str):
        self.where = where
        self.phase = phase
        self.scale = np.float32(param.scale)
        self.mirror = bool(param.mirror)  # Caffe mirrors at random in any phase when asked
        self.crop_size = int(param.crop_size)
        self.force_color = bool(param.force_color)
        self.force_gray = bool(param.force_gray)
        if self.force_color and self.force_gray:
            raise CaffeCompatError(f"{where}: transform_param sets both force_color and force_gray")
        self.mean_file: Optional[np.ndarray] = None
        self.mean_values: Optional[np.ndarray] = None
        if param.HasField("mean_file"):
            if len(param.mean_value):
                raise CaffeCompatError(f"{where}: transform_param cannot have both mean_file and mean_value")
            if not os.path.exists(param.mean_file):
                raise CaffeCompatError(f"{where}: transform_param.mean_file {describe_path(param.mean_file)} "
                                       f"does not exist")
            self.mean_file = _mean_image(read_binaryproto(param.mean_file), param.mean_file, where)
            # Mirrored crops read a mirrored copy: contiguous rows subtract several times faster.
            self.mean_file_mirrored = np.ascontiguousarray(self.mean_file[:, :, ::-1])
        elif len(param.mean_value):
            self.mean_values = np.asarray(param.mean_value, dtype=np.float32)

    def output_shape(self, shape: Tuple[int, int, int]) -> Tuple[int, int, int]:
        c, h, w = shape
        return (c, self.crop_size, self.crop_size) if self.crop_size else (c, h, w)

    def check(self, shape: Tuple[int, ...], where: str) -> None:
        """Caffe's CHECKs on one input shape, as errors naming the record."""
        c, h, w = shape
        if self.crop_size and (h < self.crop_size or w < self.crop_size):
            raise CaffeCompatError(f"{where}: image {h}x{w} is smaller than crop_size {self.crop_size}")
        if self.mean_file is not None and self.mean_file.shape != (c, h, w):
            raise CaffeCompatError(f"{where}: mean_file has shape {self.mean_file.shape}, the image "
                                   f"{(c, h, w)}: they must be equal")
        if self.mean_values is not None and len(self.mean_values) not in (1, c):
            raise CaffeCompatError(f"{self.where}: {len(self.mean_values)} mean_value entries for {c} "
                                   f"channels; give 1 or {c}")

    def draw(self, rng: np.random.Generator, shape: Tuple[int, ...]) -> Tuple[int, int, bool]:
        """(h_off, w_off, mirror) for one image, in Caffe's order: mirror, then the crop."""
        _, h, w = shape
        mirror = bool(self.mirror and rng.integers(2))
        if not self.crop_size:
            return 0, 0, mirror
        if self.phase == "TRAIN":
            return int(rng.integers(h - self.crop_size + 1)), int(rng.integers(w - self.crop_size + 1)), mirror
        return (h - self.crop_size) // 2, (w - self.crop_size) // 2, mirror

    def apply(self, image: np.ndarray, h_off: int, w_off: int, mirror: bool, out: np.ndarray) -> None:
        """out = (image - mean) * scale over the crop, mirrored, all in float32 as Caffe."""
        _, out_h, out_w = out.shape
        width = image.shape[2]
        rows, cols = slice(h_off, h_off + out_h), slice(w_off, w_off + out_w)
        pixels = image[:, rows, cols]
        if mirror:
            pixels = np.ascontiguousarray(pixels[:, :, ::-1])
        if self.mean_file is not None:
            if mirror:  # the same columns, counted from the mirrored copy's left edge
                mean = self.mean_file_mirrored[:, rows, width - w_off - out_w:width - w_off]
            else:
                mean = self.mean_file[:, rows, cols]
        elif self.mean_values is not None:
            mean = self.mean_values.reshape(-1, 1, 1)
        else:
            mean = None
        if mean is None:
            np.copyto(out, pixels, casting="unsafe")
        else:
            np.subtract(pixels, mean, out=out, dtype=np.float32)
        np.multiply(out, self.scale, out=out)



def _mean_image(mean: np.ndarray, path: str, where: str) -> np.ndarray:
    """The mean file's blob as one float32 C x H x W image (Caffe's are 1 x C x H x W)."""
    if mean.ndim < 3 or int(np.prod(mean.shape[:-3])) != 1:
        raise CaffeCompatError(f"{where}: transform_param.mean_file {describe_path(path)} holds a blob of shape "
                               f"{tuple(mean.shape)}; a mean file is one C x H x W image (1 x C x H x W)")
    return mean.reshape(mean.shape[-3:]).astype(np.float32)
