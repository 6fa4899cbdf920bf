"""How a converted net wants its images: `preprocess.*` entries for ONNX metadata_props
and the PyTorch artifact, so a deployed embedder says how to feed it.

Caffe's convention holds for every image net: BGR channel order (gray for one
channel), pixel values 0-255, NCHW. The rest (mean, scale, crop) comes from the net's
data layer's transform_param where it has one; a deploy net (Input layers) does not
say, so the user gives it (`--mean-value`, `--mean-file`, `--scale`, `--crop-size`)
and it is recorded as given.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

from ..deploy import data_layers_of, in_test_phase
from ..errors import CaffeCompatError
from ..io.files import read_binaryproto

PathLike = Union[str, Path]
IMAGE_CHANNELS = (1, 3)
UNSTATED = "preprocess.unstated"  # on deploy nets: what neither the net nor the user said


@dataclass(frozen=True)
class PreprocessOverrides:
    """What the user says about preprocessing, over what the net says."""
    mean_values: Optional[Sequence[float]] = None  # B G R (or one value for every channel)
    mean_file: Optional[PathLike] = None
    scale: Optional[float] = None
    crop_size: Optional[int] = None

    def __post_init__(self):
        if self.mean_values is not None and self.mean_file is not None:
            raise CaffeCompatError("give --mean-value or --mean-file, not both")
        if self.mean_values is not None and len(self.mean_values) not in (1, 3):
            raise CaffeCompatError(f"--mean-value: give 1 or 3 values (B G R), not {len(self.mean_values)}")
        if self.scale is not None and not self.scale > 0:
            raise CaffeCompatError(f"--scale {self.scale}: must be positive")
        if self.crop_size is not None and self.crop_size <= 0:
            raise CaffeCompatError(f"--crop-size {self.crop_size}: must be positive")

    def given(self) -> bool:
        return any(v is not None for v in (self.mean_values, self.mean_file, self.scale, self.crop_size))


def number(value: float) -> str:
    text = f"{float(value):.7g}"
    return text if any(c in text for c in ".en") else text + ".0"


def _inference_data_layer(net_param):
    """The data layer an inference input stands for: the TEST one if any."""
    layers = data_layers_of(net_param)
    return next((layer for layer in layers if in_test_phase(layer)), layers[0] if layers else None)


def resolve_mean_file(path: str, base_dir: Optional[Path]) -> Path:
    """A path as Caffe reads it (from the working directory), else beside the net file."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists() or base_dir is None:
        return candidate
    return base_dir / candidate


def _mean_file_props(mean_file: str, base_dir: Optional[Path], required: bool) -> Dict[str, str]:
    props = {"preprocess.mean_file": str(mean_file)}
    try:
        mean = read_binaryproto(resolve_mean_file(str(mean_file), base_dir))
    except CaffeCompatError as err:
        if required:
            raise
        props["preprocess.mean_file_error"] = f"not readable here: {err}"
        return props
    if mean.ndim < 2:
        raise CaffeCompatError(f"{mean_file}: a mean image needs channel, height and width axes; "
                               f"it has shape {mean.shape}")
    image = mean.reshape(mean.shape[-3:]) if mean.ndim >= 3 else mean.reshape(1, *mean.shape)
    # Caffe subtracts the whole mean image (cropped like the input); ONNX consumers
    # usually take a per-channel mean, so both are recorded.
    props["preprocess.mean"] = ",".join(number(v) for v in image.reshape(image.shape[0], -1).mean(1))
    props["preprocess.mean_kind"] = "mean_file channel average"
    props["preprocess.mean_file_shape"] = ",".join(str(d) for d in image.shape)
    return props


def _mean_value_props(values: Sequence[float], channels: int) -> Dict[str, str]:
    values = list(values)
    if len(values) == 1:  # Caffe applies a single mean_value to every channel
        values *= channels
    return {"preprocess.mean": ",".join(number(v) for v in values), "preprocess.mean_kind": "mean_value"}


def _image_input(input_shapes: Mapping[str, Tuple[int, ...]]) -> Optional[Tuple[str, Tuple[int, ...]]]:
    """The first 4-D input with 1 or 3 channels: what Caffe's convention applies to."""
    return next(((name, tuple(shape)) for name, shape in input_shapes.items()
                 if len(shape) == 4 and shape[1] in IMAGE_CHANNELS), None)


def preprocess_metadata(net_param, base_dir: Optional[PathLike] = None,
                        overrides: Optional[PreprocessOverrides] = None,
                        input_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None) -> Dict[str, str]:
    """`preprocess.*` entries: from the net's data layer's transform_param, else (a deploy
    net) Caffe's convention for its image input (`input_shapes`: the net's inputs), then
    `overrides` (see `with_overrides`). Empty for a net with neither. A mean file named
    by the net that cannot be read here is recorded with the reason."""
    base_dir = None if base_dir is None else Path(base_dir)
    layer = _inference_data_layer(net_param)
    props: Dict[str, str] = {}
    if layer is not None:
        transform = layer.transform_param
        # A Data layer's channels are its records': the input shape says, where known.
        shape = (input_shapes or {}).get(layer.top[0]) if len(layer.top) else None
        gray = ((layer.type == "ImageData" and not layer.image_data_param.is_color)
                or (shape is not None and len(shape) == 4 and shape[1] == 1))
        props.update({"preprocess.channel_order": "gray" if gray else "BGR", "preprocess.pixel_range": "0-255",
                      "preprocess.layout": "NCHW"})
        if len(layer.top):
            props["preprocess.input"] = layer.top[0]
        if transform.HasField("mean_file"):
            props.update(_mean_file_props(transform.mean_file, base_dir, required=False))
        elif len(transform.mean_value):
            props.update(_mean_value_props(transform.mean_value, 1 if gray else 3))
        props["preprocess.scale"] = number(transform.scale)
        if transform.crop_size:
            props["preprocess.crop_size"] = str(transform.crop_size)
    else:
        image = _image_input(input_shapes or {})
        if image is not None:
            name, shape = image
            props.update({"preprocess.channel_order": "gray" if shape[1] == 1 else "BGR",
                          "preprocess.pixel_range": "0-255", "preprocess.layout": "NCHW",
                          "preprocess.input": name, UNSTATED: _unstated(["mean"]),
                          # Caffe's own default: an input blob is used as it is given.
                          "preprocess.scale": "1.0"})
    props = with_overrides(props, overrides, net_param.name)
    _warn_unreadable_mean(props)
    return props


def _warn_unreadable_mean(props: Mapping[str, str]) -> None:
    """One warning line when the net's mean file could not be read here (the paper's
    prototxts name one at their authors' absolute paths): the model records no mean."""
    if "preprocess.mean_file_error" in props:
        warnings.warn(f"mean file {props['preprocess.mean_file']}: not readable here, so no mean is recorded; "
                      f"give --mean-value B G R (or --mean-file MEAN.binaryproto)", stacklevel=3)


def _unstated(missing: Sequence[str]) -> str:
    return (f"{' and '.join(missing)}: the net does not say (record them with "
            f"{' and '.join({'mean': '--mean-value or --mean-file', 'scale': '--scale'}[m] for m in missing)})")


def with_overrides(props: Mapping[str, str], overrides: Optional[PreprocessOverrides],
                   net_name: str = "") -> Dict[str, str]:
    """`props` with what the user gave in place of what the net said. A mean file given
    here must be readable."""
    props = dict(props)
    if overrides is None or not overrides.given():
        return props
    if "preprocess.channel_order" not in props:
        raise CaffeCompatError(f"net '{net_name}': no image input (4-D, 1 or 3 channels) for --mean-value, "
                               f"--mean-file, --scale or --crop-size to describe")
    channels = 1 if props["preprocess.channel_order"] == "gray" else 3
    if overrides.mean_values is not None or overrides.mean_file is not None:
        for key in ("preprocess.mean", "preprocess.mean_kind", "preprocess.mean_file", "preprocess.mean_file_error",
                    "preprocess.mean_file_shape"):
            props.pop(key, None)
        if overrides.mean_values is not None:
            props.update(_mean_value_props(overrides.mean_values, channels))
        else:
            props.update(_mean_file_props(str(overrides.mean_file), None, required=True))
    if overrides.scale is not None:
        props["preprocess.scale"] = number(overrides.scale)
    if overrides.crop_size is not None:
        props["preprocess.crop_size"] = str(overrides.crop_size)
    if UNSTATED in props:
        missing = [what for what in ("mean", "scale") if f"preprocess.{what}" not in props]
        if missing:
            props[UNSTATED] = _unstated(missing)
        else:
            del props[UNSTATED]
    return props


def describe(props: Mapping[str, str]) -> str:
    """One line for people: 'BGR 0-255 NCHW, mean 104,117,123 (mean_value), scale 1.0, crop 227'."""
    if not props:
        return "no image input"
    parts = [" ".join(props[k] for k in ("preprocess.channel_order", "preprocess.pixel_range", "preprocess.layout")
                      if k in props)]
    if "preprocess.mean" in props:
        parts.append(f"mean {props['preprocess.mean']} ({props.get('preprocess.mean_kind', '')})")
    elif "preprocess.mean_file" in props:
        parts.append(f"mean file {props['preprocess.mean_file']} (not readable here)")
    if "preprocess.scale" in props:
        parts.append(f"scale {props['preprocess.scale']}")
    if "preprocess.crop_size" in props:
        parts.append(f"crop {props['preprocess.crop_size']}")
    if UNSTATED in props:
        parts.append(props[UNSTATED])
    return ", ".join(parts)
