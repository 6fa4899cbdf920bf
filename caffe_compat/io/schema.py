"""Caffe's schema in its dialects (caffe_compat.io.dialects: BVLC's caffe.proto and each
fork's changes to it). "bvlc" is caffe_compat.proto.caffe_pb2 itself; every other
dialect's classes are built at run time from its schema file, in a pool of its own.
"""
from __future__ import annotations

import functools
import types
from typing import List

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from ..errors import CaffeCompatError
from ..proto import caffe_pb2
from .dialects import ENTRIES, entry, generation, has_additions, schema_file

DIALECTS = tuple(ENTRIES)

_NAMED_LAYERS = ("caffe.LayerParameter", "caffe.V1LayerParameter")


def _message_class(descriptor):
    # protobuf 4.21 lacks GetMessageClass; 6.x and later lack GetPrototype.
    get_class = getattr(message_factory, "GetMessageClass", None)
    if get_class is None:
        return message_factory.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)
    return get_class(descriptor)


def messages(dialect: str) -> types.SimpleNamespace:
    """The message classes of `dialect` by name: messages("lifted").NetParameter, ...
    (new classes once a layer parameter is added from Python: read files after adding)."""
    entry(dialect)
    return _messages(dialect, generation())


@functools.lru_cache(maxsize=None)
def _messages(dialect: str, _generation: int) -> types.SimpleNamespace:
    # (.values(): iterating the by-name map yields descriptors, not names, on upb 4.21.1.)
    if dialect == "bvlc" and not has_additions():
        descriptors = caffe_pb2.DESCRIPTOR.message_types_by_name.values()
        return types.SimpleNamespace(**{d.name: getattr(caffe_pb2, d.name) for d in descriptors})
    pool = descriptor_pool.DescriptorPool()
    descriptors = pool.AddSerializedFile(schema_file(dialect).SerializeToString()).message_types_by_name.values()
    return types.SimpleNamespace(**{d.name: _message_class(d) for d in descriptors})


def dialect_of(message: Message) -> str:
    """Which dialect's classes `message` is an instance of."""
    for dialect in DIALECTS:
        if type(message) is getattr(messages(dialect), message.DESCRIPTOR.name, None):
            return dialect
    raise CaffeCompatError(f"{message.DESCRIPTOR.full_name} is not a message of any Caffe dialect")


def is_repeated(field) -> bool:
    """FieldDescriptor.label is gone in protobuf 7 (is_repeated replaced it in 5.x)."""
    flag = getattr(field, "is_repeated", None)
    return flag if flag is not None else field.label == field.LABEL_REPEATED


def _item_label(where: str, index: int, item: Message) -> str:
    label = f"{where}[{index}]"
    if item.DESCRIPTOR.full_name in _NAMED_LAYERS:
        label += f" {item.name!r}"
    return label


def check_strings(message: Message, source: str) -> None:
    """Raise naming the first string field that holds no valid UTF-8 (upb parses such a
    value without complaint and hands it over as bytes, which nothing downstream expects)."""
    _check_strings(message, "", source)


def _check_strings(message: Message, path: str, source: str) -> None:
    for field, value in message.ListFields():
        where = f"{path}.{field.name}" if path else field.name
        items = value if is_repeated(field) else [value]
        if field.type == field.TYPE_STRING:
            for index, item in enumerate(items):
                if isinstance(item, bytes):
                    place = f"{where}[{index}]" if is_repeated(field) else where
                    raise CaffeCompatError(f"{source}: {place}: not valid UTF-8 text: {item[:40]!r}")
        elif field.message_type is not None:
            for index, item in enumerate(items):
                _check_strings(item, _item_label(where, index, item) if is_repeated(field) else where, source)


def unknown_fields(message: Message) -> List[str]:
    """Every field the parser kept without knowing it, anywhere in the tree, as
    "layer[2] 'conv1'.convolution_param: field 77" (one entry per number and place)."""
    found: List[str] = []
    _collect_unknown(message, "", found)
    return found


def _collect_unknown(message: Message, path: str, found: List[str]) -> None:
    # Not message.UnknownFields(): it raises NotImplementedError under upb (and from
    # protobuf 5 on, everywhere), while UnknownFieldSet works on every runtime from 4.21.
    numbers = dict.fromkeys(field.field_number for field in UnknownFieldSet(message))
    found.extend(f"{path}: field {number}" if path else f"field {number}" for number in numbers)
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        where = f"{path}.{field.name}" if path else field.name
        if isinstance(value, Message):
            _collect_unknown(value, where, found)
            continue
        for index, item in enumerate(value):
            _collect_unknown(item, _item_label(where, index, item), found)
