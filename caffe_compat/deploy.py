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

`feed_absent_sources` does the same for one phase, and only to the Data / ImageData
layers whose source is absent, so that converting a net never needs its data.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from .errors import CaffeCompatError
from .graph import layer_included

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
            _add_input(result, feeders[image].name, [image], [shapes[image]])
            continue
        _copy_unless_reading(result, layer, dropped)
    return result


def _add_input(net_param, name: str, tops: Sequence[str], shapes: Sequence[Tuple[int, ...]], rules_of=None):
    layer = net_param.layer.add()
    layer.name = name
    layer.type = "Input"
    layer.top.extend(tops)
    for shape in shapes:
        layer.input_param.shape.add().dim.extend(shape)
    if rules_of is not None:
        layer.include.extend(rules_of.include)
        layer.exclude.extend(rules_of.exclude)


def _copy_unless_reading(net_param, layer, dropped: Set[str]) -> None:
    """Copy `layer` into `net_param`, or drop it (adding its tops to `dropped`) when it
    reads a dropped label blob and a net without that blob has no use for it."""
    reads_dropped = [b for b in layer.bottom if b in dropped]
    if not reads_dropped:
        net_param.layer.add().CopyFrom(layer)
        return
    if is_training_only(layer.type) or len(reads_dropped) == len(layer.bottom):
        dropped.update(layer.top)
        return
    raise CaffeCompatError(f"layer '{layer.name}' ({layer.type}): reads '{reads_dropped[0]}', a label "
                           f"top of a data layer, which a deploy net has no input for")


def source_of(layer) -> Optional[str]:
    """The file or folder a Data / ImageData layer reads; None for other layers."""
    if layer.type == "Data":
        return layer.data_param.source
    if layer.type == "ImageData":
        return layer.image_data_param.source
    return None


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def feed_absent_sources(net_param, phase: str, level: int = 0, stages: Sequence[str] = (),
                        input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> Tuple[object, List[str]]:
    """The net with each Data / ImageData layer of `phase` whose source is absent (as on
    any machine but the one that trained it) replaced by an Input layer, and one note
    per replacement. Converting or inspecting a net never needs its data.

    The images are shaped as the layer implies (batch size, channels, crop or new size)
    unless `input_shapes` names the top. In TRAIN the label top is an input too, of
    shape (N,) as Caffe's data layers give it; in TEST it is dropped with the layers
    that only score the net, as `deploy_net` does. The Input layers keep the data
    layers' names and phase rules; layers of other phases are left as they are."""
    input_shapes = input_shapes or {}
    absent = [i for i, layer in enumerate(net_param.layer)
              if source_of(layer) is not None and layer_included(layer, phase, level, stages)
              and not (source_of(layer) and os.path.exists(source_of(layer)))]
    if not absent:
        return net_param, []
    result = type(net_param)()
    result.CopyFrom(net_param)
    del result.layer[:]
    notes: List[str] = []
    dropped: Set[str] = set()
    for index, layer in enumerate(net_param.layer):
        if index not in absent:
            if layer_included(layer, phase, level, stages):
                _copy_unless_reading(result, layer, dropped)
            else:
                result.layer.add().CopyFrom(layer)
            continue
        if not len(layer.top):
            raise CaffeCompatError(f"layer '{layer.name}' ({layer.type}): has no top")
        image = layer.top[0]
        shape = tuple(input_shapes[image]) if image in input_shapes else _data_shape(layer)
        if shape is None:
            raise CaffeCompatError(f"layer '{layer.name}' ({layer.type}): its source is absent and nothing gives "
                                   f"the image size (no transform_param.crop_size); give it as "
                                   f"--input-shape {image}=N,C,H,W (input_shapes={{'{image}': ...}})")
        tops, shapes = [image], [shape]
        if phase == "TRAIN":
            for label in layer.top[1:]:
                tops.append(label)
                shapes.append(tuple(input_shapes[label]) if label in input_shapes else (shape[0],))
        else:
            dropped.update(layer.top[1:])
        _add_input(result, layer.name, tops, shapes, rules_of=layer)
        field = "data_param" if layer.type == "Data" else "image_data_param"
        source = source_of(layer)
        inputs = ", ".join(f"'{top}' {_shape_text(s)}" for top, s in zip(tops, shapes))
        notes.append(f"layer '{layer.name}' ({layer.type}): {field}.source "
                     f"{repr(source) if source else '(empty)'} is absent; the {phase} net takes "
                     f"{'inputs' if len(tops) > 1 else 'an input'} instead: {inputs}")
    return result, notes


def image_input_name(net_param) -> Optional[str]:
    """The blob an image goes into: the first data layer's first top, else the first input."""
    for layer in net_param.layer:
        if (layer.type in DATA_LAYER_TYPES or layer.type == "Input") and len(layer.top):
            return layer.top[0]
    return net_param.input[0] if len(net_param.input) else None


def parse_input_shapes(texts: Sequence[str], net_param=None,
                       option: str = "--input-shape") -> Dict[str, Tuple[int, ...]]:
    """['data=1,3,227,227', 'label=1'] -> {'data': (1, 3, 227, 227), 'label': (1,)}. An
    entry without BLOB= (as `export-onnx` has always taken it) shapes `net_param`'s image
    input (see `image_input_name`)."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for text in texts:
        name, sep, dims = text.rpartition("=")
        name = name.strip() if sep else (image_input_name(net_param) if net_param is not None else None)
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",")) if name else ()
        except ValueError:
            shape = ()
        if not shape or any(d <= 0 for d in shape):
            raise CaffeCompatError(f"{option} {text!r}: expected BLOB=N,C,H,W (or N,C,H,W for the image input) "
                                   f"with positive sizes, such as data=1,3,227,227")
        shapes[name] = shape
    return shapes


def override_mean(net, mean_file: Optional[Union[str, Path]] = None,
                  mean_values: Optional[Sequence[float]] = None) -> None:
    """Make every Data/ImageData layer of `net` (a NetParameter, changed in place) subtract
    `mean_file` or `mean_values` instead of what its transform_param says."""
    if mean_file is None and mean_values is None:
        return
    if mean_file is not None and mean_values is not None:
        raise CaffeCompatError("give --mean-file or --mean-value, not both")
    if mean_values is not None and len(mean_values) not in (1, 3):
        raise CaffeCompatError(f"--mean-value: give 1 or 3 values (B G R), not {len(mean_values)}")
    if mean_file is not None and not Path(mean_file).is_file():
        raise CaffeCompatError(f"{mean_file}: no such mean file")
    for layer in net.layer:
        if layer.type in ("Data", "ImageData"):
            layer.transform_param.ClearField("mean_file")
            del layer.transform_param.mean_value[:]
            if mean_file is not None:
                layer.transform_param.mean_file = os.path.abspath(mean_file)
            else:
                layer.transform_param.mean_value.extend(mean_values)


def recorded_shapes(net_param, phase: str, level: int = 0, stages: Sequence[str] = ()) -> Dict[str, Tuple[int, ...]]:
    """{top: shape} for the data layers of `phase` that read an existing source but declare
    no image size (no crop_size, no new_height/new_width): the size of their first record,
    as Caffe's data layers shape their tops from it. Layers whose record cannot be read
    here (lmdb or Pillow missing) are left out, their shapes unknown."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for layer in net_param.layer:
        source = source_of(layer)
        if (not source or not len(layer.top) or _data_shape(layer) is not None
                or not layer_included(layer, phase, level, stages) or not os.path.exists(source)):
            continue
        where = f"layer '{layer.name}' ({layer.type})"
        try:
            channels, height, width = _first_record(layer, source, where)
        except ImportError:
            continue
        shapes[layer.top[0]] = (_batch_size(layer), channels, height, width)
    return shapes


def _first_record(layer, source: str, where: str) -> Tuple[int, int, int]:
    if layer.type == "Data":
        from .io.lmdb_reader import first_record_shape

        return first_record_shape(source, where)
    from PIL import Image

    from .io.files import MAX_LIST_BYTES, read_regular_file

    param = layer.image_data_param
    lines = read_regular_file(Path(source), MAX_LIST_BYTES).decode("utf-8", "replace").splitlines()
    entry = next((line.strip().rpartition(" ")[0] for line in lines if line.strip()), "")
    if not entry:
        raise CaffeCompatError(f"{where}: image_data_param.source {source} lists no image")
    try:
        with Image.open(param.root_folder + entry) as image:
            width, height = image.size
    except OSError as err:
        raise CaffeCompatError(f"{where}: {param.root_folder + entry}: cannot be read ({err})") from None
    return (3 if param.is_color else 1), height, width
