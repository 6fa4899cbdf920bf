"""A deploy net from a training net: data layers become Input layers.

Training and extraction prototxts (the paper's among them) read their images through
data layers whose sources (LMDB folders, image lists, HDF5 files) exist only on the
machine that trained them. A deploy net declares its inputs instead. `deploy_net`
rewrites a net that way:

- every data layer (Data, ImageData, MemoryData, DummyData, HDF5Data) becomes an
  Input layer feeding its first top (the images), shaped (N, channels, crop, crop):
  N is the layer's batch size, channels 3 (1 for an ImageData layer with
  `is_color: false`), crop the transform_param's crop_size. MemoryData and DummyData
  declare their shapes themselves; `input_shape` overrides all of these and is needed
  where nothing gives the size (no crop_size, HDF5Data);
- the Input layers carry no phase rules: where a TRAIN and a TEST data layer feed the
  same blob, one Input layer replaces both, shaped after the TEST one;
- the other tops (labels) are dropped, and with them every layer that reads only
  dropped blobs, and every loss or Accuracy layer that reads any (their tops go too);
  any other layer that reads a label is an error, as a deploy net cannot feed it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

from .errors import CaffeCompatError

DATA_LAYER_TYPES = ("Data", "ImageData", "MemoryData", "DummyData", "HDF5Data")
PHASE_TEST = 1  # caffe.Phase.TEST


def is_training_only(layer_type: str) -> bool:
    """Layers an inference net has no use for: they score the net (losses, Accuracy) or
    swallow blobs (Silence), and feed no other layer."""
    return layer_type.endswith("Loss") or layer_type in ("Accuracy", "Silence")


def data_layers_of(net_param) -> List[object]:
    return [layer for layer in net_param.layer if layer.type in DATA_LAYER_TYPES]


def _batch_size(layer) -> int:
    for field in ("data_param", "image_data_param", "hdf5_data_param", "memory_data_param"):
        if layer.HasField(field) and getattr(layer, field).batch_size > 0:
            return int(getattr(layer, field).batch_size)
    return 1


def _data_shape(layer) -> Optional[Tuple[int, ...]]:
    """The shape of a data layer's first top as the layer declares it, or None."""
    if layer.type == "DummyData":
        param = layer.dummy_data_param
        if len(param.shape):
            return tuple(int(d) for d in param.shape[0].dim)
        if len(param.num):
            return (param.num[0], param.channels[0], param.height[0], param.width[0])
        return None
    if layer.type == "MemoryData":
        param = layer.memory_data_param
        return (param.batch_size, param.channels, param.height, param.width)
    if layer.type == "HDF5Data":
        return None
    channels = 1 if layer.type == "ImageData" and not layer.image_data_param.is_color else 3
    crop = layer.transform_param.crop_size
    if crop > 0:
        return (_batch_size(layer), channels, crop, crop)
    if layer.type == "ImageData" and layer.image_data_param.new_height > 0 and layer.image_data_param.new_width > 0:
        param = layer.image_data_param
        return (_batch_size(layer), channels, param.new_height, param.new_width)
    return None


def in_test_phase(layer) -> bool:
    return any(rule.HasField("phase") and rule.phase == PHASE_TEST for rule in layer.include)


def deploy_net(net_param, input_shape: Optional[Sequence[int]] = None):
    """A copy of `net_param` (a NetParameter of either dialect) with its data layers
    replaced by Input layers, as the module docstring describes. A net without data
    layers comes back unchanged."""
    if len(net_param.layers):
        raise CaffeCompatError(f"net '{net_param.name}': legacy (V1) definitions must be upgraded first")
    data_layers = data_layers_of(net_param)
    result = type(net_param)()
    result.CopyFrom(net_param)
    if not data_layers:
        return result

    # One Input per image blob, shaped after the TEST-phase layer where there is one.
    feeders: Dict[str, object] = {}
    for layer in data_layers:
        if not len(layer.top):
            raise CaffeCompatError(f"layer '{layer.name}' ({layer.type}): has no top")
        image = layer.top[0]
        if image not in feeders or in_test_phase(layer):
            feeders[image] = layer
    shapes: Dict[str, Tuple[int, ...]] = {}
    for image, layer in feeders.items():
        shape = tuple(int(d) for d in input_shape) if input_shape is not None else _data_shape(layer)
        if shape is None:
            raise CaffeCompatError(f"layer '{layer.name}' ({layer.type}): the input size is unknown (no "
                                   f"transform_param.crop_size); give it as --input-shape N,C,H,W")
        shapes[image] = shape
    dropped: Set[str] = {top for layer in data_layers for top in layer.top[1:]} - set(feeders)

    del result.layer[:]
    declared: Set[str] = set()
    for layer in net_param.layer:
        if layer.type in DATA_LAYER_TYPES:
            image = layer.top[0]
            if image in declared:
                continue
            declared.add(image)
            source = feeders[image]
            replacement = result.layer.add()
            replacement.name = source.name
            replacement.type = "Input"
            replacement.top.append(image)
            replacement.input_param.shape.add().dim.extend(shapes[image])
            continue
        reads_dropped = [b for b in layer.bottom if b in dropped]
        if reads_dropped:
            if is_training_only(layer.type) or len(reads_dropped) == len(layer.bottom):
                dropped.update(layer.top)
                continue
            raise CaffeCompatError(f"layer '{layer.name}' ({layer.type}): reads '{reads_dropped[0]}', a label "
                                   f"top of a data layer, which a deploy net has no input for")
        result.layer.add().CopyFrom(layer)
    return result

