"""Bring legacy nets to the current format, as Caffe's upgrade_proto.cpp does:
V1 `layers` (enum types, blobs_lr / weight_decay) become `layer`, and the net-level
`input` / `input_shape` / `input_dim` become an Input layer."""
from __future__ import annotations

from ..errors import CaffeCompatError
from .schema import is_repeated

# V1LayerParameter.LayerType enum names -> the layer type strings of the current format.
V1_TYPE_NAMES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DATA": "Data", "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN", "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

# V1 fields handled by hand; every other set field is copied by name.
_V1_SPECIAL = {"type", "blobs_lr", "weight_decay", "param", "blob_share_mode", "layer"}


def _upgrade_v1_layer(v1, layer, index: int) -> None:
    name = v1.name or f"#{index}"
    if v1.HasField("layer"):
        raise CaffeCompatError(f"layer '{name}': V0 layer definitions (pre-2014 Caffe) are not supported; "
                               f"upgrade the file with Caffe's upgrade_net_proto_text first")
    target_fields = layer.DESCRIPTOR.fields_by_name
    for field, value in v1.ListFields():
        if field.name in _V1_SPECIAL:
            continue
        if field.name not in target_fields:
            raise CaffeCompatError(f"layer '{name}': V1 field '{field.name}' has no counterpart in the current format")
        target = getattr(layer, field.name)
        if is_repeated(field):
            if field.message_type is not None:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(layer, field.name, value)
    type_name = v1.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[v1.type].name
    layer.type = V1_TYPE_NAMES.get(type_name, type_name)
    specs = max(len(v1.blobs_lr), len(v1.weight_decay), len(v1.param), len(v1.blob_share_mode))
    for i in range(specs):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]


def _upgrade_inputs(net) -> None:
    if not len(net.input):
        return
    if len(net.input_dim) and len(net.input_dim) != 4 * len(net.input):
        raise CaffeCompatError(f"net '{net.name}': input_dim has {len(net.input_dim)} values for "
                               f"{len(net.input)} inputs (4 per input expected)")
    if len(net.input_shape) and len(net.input_shape) != len(net.input):
        raise CaffeCompatError(f"net '{net.name}': {len(net.input_shape)} input_shape for {len(net.input)} inputs")
    layers = list(net.layer)
    del net.layer[:]
    input_layer = net.layer.add()
    input_layer.name = "input"
    input_layer.type = "Input"
    for i, name in enumerate(net.input):
        input_layer.top.append(name)
        shape = input_layer.input_param.shape.add()
        if len(net.input_shape):
            shape.CopyFrom(net.input_shape[i])
        elif len(net.input_dim):
            shape.dim.extend(net.input_dim[4 * i: 4 * i + 4])
    for layer in layers:
        net.layer.add().CopyFrom(layer)
    del net.input[:]
    del net.input_shape[:]
    del net.input_dim[:]


def upgrade_net(net) -> bool:
    """Upgrade `net` (a NetParameter) in place; True if anything changed."""
    changed = False
    if len(net.layers):
        if len(net.layer):
            raise CaffeCompatError(f"net '{net.name}': mixes V1 'layers' and current 'layer' definitions")
        for i, v1 in enumerate(net.layers):
            _upgrade_v1_layer(v1, net.layer.add(), i)
        del net.layers[:]
        changed = True
    if len(net.input):
        _upgrade_inputs(net)
        changed = True
    return changed
