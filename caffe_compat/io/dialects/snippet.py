"""A fork's caffe.proto changes, written as a small .proto snippet, laid over BVLC's.

No protoc at run time: this reads the proto2 subset Caffe's schemas use (messages,
nested messages and enums, optional/repeated/required fields with `default` and
`packed`) into descriptor protos. A message the base file already has is changed
field by field: a snippet field replaces the base field of its name, and takes the
number of a base field of another name (which is how a fork's field 145 or
PoolingParameter 13 differs); that base field keeps its name at a private number
(DISPLACED + its number), so a prototxt naming both still reads (the fork's own
files never name it, and no caffemodel carries that number). Any other message or
enum is added. Type names resolve as protoc resolves them: innermost scope first.
"""
from __future__ import annotations

import re
from typing import Dict, Iterator, List, Tuple

from google.protobuf import descriptor_pb2

from ...errors import CaffeCompatError

_Field = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "double": _Field.TYPE_DOUBLE, "float": _Field.TYPE_FLOAT, "int64": _Field.TYPE_INT64,
    "uint64": _Field.TYPE_UINT64, "int32": _Field.TYPE_INT32, "fixed64": _Field.TYPE_FIXED64,
    "fixed32": _Field.TYPE_FIXED32, "bool": _Field.TYPE_BOOL, "string": _Field.TYPE_STRING,
    "bytes": _Field.TYPE_BYTES, "uint32": _Field.TYPE_UINT32, "sfixed32": _Field.TYPE_SFIXED32,
    "sfixed64": _Field.TYPE_SFIXED64, "sint32": _Field.TYPE_SINT32, "sint64": _Field.TYPE_SINT64,
}
DISPLACED = 1 << 28  # above every number a fork uses (the largest seen: 8266712), below protobuf's 2**29
_LABELS = {"optional": _Field.LABEL_OPTIONAL, "repeated": _Field.LABEL_REPEATED,
           "required": _Field.LABEL_REQUIRED}
_TOKEN = re.compile(r"""\s+|//[^\n]*|/\*.*?\*/|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'"""
                    r"""|[A-Za-z_][\w.]*|[-+]?\.?\d[\w.+-]*|[{}\[\]=;,]|.""", re.DOTALL)


class _Tokens:
    def __init__(self, text: str, source: str):
        self.source = source
        self.items: List[Tuple[str, int]] = []
        for match in _TOKEN.finditer(text):
            token = match.group()
            if token.isspace() or token.startswith(("//", "/*")):
                continue
            self.items.append((token, text.count("\n", 0, match.start()) + 1))
        self.position = 0

    def error(self, message: str) -> CaffeCompatError:
        line = self.items[min(self.position, len(self.items) - 1)][1] if self.items else 1
        return CaffeCompatError(f"{self.source}: line {line}: {message}")

    def peek(self) -> str:
        return self.items[self.position][0] if self.position < len(self.items) else ""

    def take(self, expected: str = "") -> str:
        token = self.peek()
        if not token or (expected and token != expected):
            raise self.error(f"expected {expected or 'more'}, found {token or 'the end'!r}")
        self.position += 1
        return token

    def name(self) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*", self.peek()):
            raise self.error(f"expected a name, found {self.peek() or 'the end'!r}")
        return self.take()

    def number(self) -> int:
        try:
            value = int(self.peek(), 0)
        except ValueError:
            raise self.error(f"expected a number, found {self.peek() or 'the end'!r}") from None
        self.take()
        return value


def parse(text: str, source: str) -> Tuple[List[descriptor_pb2.DescriptorProto],
                                           List[descriptor_pb2.EnumDescriptorProto]]:
    """The snippet's top-level messages and enums; field types still as written (resolved by `apply`)."""
    tokens = _Tokens(text, source)
    messages, enums = [], []
    while tokens.peek():
        keyword = tokens.take()
        if keyword in ("syntax", "package", "import", "option"):
            while tokens.take() != ";":
                pass
        elif keyword == "message":
            messages.append(_message(tokens))
        elif keyword == "enum":
            enums.append(_enum(tokens))
        else:
            tokens.position -= 1
            raise tokens.error(f"expected a message or an enum, found {keyword!r}")
    return messages, enums


def _message(tokens: _Tokens) -> descriptor_pb2.DescriptorProto:
    message = descriptor_pb2.DescriptorProto(name=tokens.name())
    tokens.take("{")
    while tokens.peek() != "}":
        keyword = tokens.take()
        if keyword == "message":
            message.nested_type.append(_message(tokens))
        elif keyword == "enum":
            message.enum_type.append(_enum(tokens))
        elif keyword == "reserved":
            while tokens.take() != ";":
                pass
        elif keyword in _LABELS:
            message.field.append(_field(tokens, _LABELS[keyword]))
        else:
            tokens.position -= 1
            raise tokens.error(f"message {message.name}: expected a field (optional, repeated or required), "
                               f"found {keyword!r}")
    tokens.take("}")
    return message


def _field(tokens: _Tokens, label: int) -> _Field:
    type_name = tokens.name()
    field = _Field(name=tokens.name(), label=label)
    tokens.take("=")
    field.number = tokens.number()
    if type_name in _SCALARS:
        field.type = _SCALARS[type_name]
    else:
        field.type_name = type_name  # message or enum: decided when resolved
    if tokens.peek() == "[":
        tokens.take("[")
        while True:
            option = tokens.name()
            tokens.take("=")
            value = tokens.take()
            if option == "default":
                field.default_value = value[1:-1] if value[:1] in "\"'" else value
            elif option == "packed":
                field.options.packed = value == "true"
            else:
                raise tokens.error(f"field {field.name}: unsupported option {option!r}")
            if tokens.peek() != ",":
                break
            tokens.take(",")
        tokens.take("]")
    tokens.take(";")
    return field


def _enum(tokens: _Tokens) -> descriptor_pb2.EnumDescriptorProto:
    enum = descriptor_pb2.EnumDescriptorProto(name=tokens.name())
    tokens.take("{")
    while tokens.peek() != "}":
        name = tokens.name()
        tokens.take("=")
        enum.value.add(name=name, number=tokens.number())
        tokens.take(";")
    tokens.take("}")
    return enum


def apply(file_proto: descriptor_pb2.FileDescriptorProto, text: str, source: str) -> None:
    """Lay the snippet over `file_proto`, changed in place."""
    apply_parsed(file_proto, *parse(text, source), source)


def apply_parsed(file_proto: descriptor_pb2.FileDescriptorProto, messages, enums, source: str) -> None:
    """`apply` for a snippet already parsed (field types as written, or fully qualified)."""
    for enum in enums:
        _replace_named(file_proto.enum_type, enum)
    for message in messages:
        existing = next((m for m in file_proto.message_type if m.name == message.name), None)
        if existing is None:
            file_proto.message_type.append(message)
        else:
            _merge(existing, message)
    kinds = dict(_declared(file_proto))
    for full_name, message in _walk(file_proto):
        for field in message.field:
            if field.type_name and not field.type_name.startswith("."):  # the snippet's, as written
                _resolve(field, full_name, kinds, source)


def _replace_named(container, item) -> None:
    for index, existing in enumerate(container):
        if existing.name == item.name:
            del container[index]
            break
    container.append(item)


def displaced_number(number: int) -> int:
    """Where a base field whose number a fork takes for another field lives on."""
    return DISPLACED + number


def _merge(base: descriptor_pb2.DescriptorProto, change: descriptor_pb2.DescriptorProto) -> None:
    for field in change.field:
        for index in reversed(range(len(base.field))):
            if base.field[index].name == field.name:
                del base.field[index]
            elif base.field[index].number == field.number:
                base.field[index].number = displaced_number(field.number)
        base.field.append(field)
    for enum in change.enum_type:
        _replace_named(base.enum_type, enum)
    for nested in change.nested_type:
        existing = next((m for m in base.nested_type if m.name == nested.name), None)
        if existing is None:
            base.nested_type.append(nested)
        else:
            _merge(existing, nested)


def _walk(file_proto) -> Iterator[Tuple[str, descriptor_pb2.DescriptorProto]]:
    stack = [(f".{file_proto.package}.{m.name}", m) for m in file_proto.message_type]
    while stack:
        full_name, message = stack.pop()
        yield full_name, message
        stack.extend((f"{full_name}.{m.name}", m) for m in message.nested_type)


def _declared(file_proto) -> Iterator[Tuple[str, int]]:
    yield from ((f".{file_proto.package}.{e.name}", _Field.TYPE_ENUM) for e in file_proto.enum_type)
    for full_name, message in _walk(file_proto):
        yield full_name, _Field.TYPE_MESSAGE
        yield from ((f"{full_name}.{e.name}", _Field.TYPE_ENUM) for e in message.enum_type)


def _resolve(field: _Field, message: str, kinds: Dict[str, int], source: str) -> None:
    written, scope = field.type_name, message
    while True:
        candidate = f"{scope}.{written}"
        if candidate in kinds:
            field.type_name, field.type = candidate, kinds[candidate]
            return
        if scope.count(".") <= 1:
            raise CaffeCompatError(f"{source}: field {message.lstrip('.')}.{field.name}: "
                                   f"unknown type {written!r}")
        scope = scope.rsplit(".", 1)[0]
