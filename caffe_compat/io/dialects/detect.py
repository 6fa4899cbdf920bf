"""Which dialect a net file is written in: a prototxt's from its field names and layer
types, a caffemodel's from its field numbers and wire types (each dialect parses it;
those that leave fewest fields unknown, with the most layers of their own, fit).
Candidates come best first; ties keep ENTRIES' order."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Tuple

from google.protobuf.message import DecodeError

from ...errors import CaffeCompatError
from ..schema import messages, unknown_fields
from . import ENTRIES, added_types, generation

BVLC = "bvlc"


def _descriptors(dialect: str):
    stack = [cls.DESCRIPTOR for cls in vars(messages(dialect)).values()]
    while stack:
        descriptor = stack.pop()
        yield descriptor
        stack.extend(descriptor.nested_types)


def field_names(dialect: str) -> FrozenSet[str]:
    """Every field name of every message of `dialect`."""
    return _field_names(dialect, generation())


@functools.lru_cache(maxsize=None)
def _field_names(dialect: str, _generation: int) -> FrozenSet[str]:
    return frozenset(f.name for d in _descriptors(dialect) for f in d.fields)


def own_layer_fields(dialect: str) -> FrozenSet[str]:
    """LayerParameter fields of `dialect` that BVLC's has not, by name and number."""
    return _own_layer_fields(dialect, generation())


@functools.lru_cache(maxsize=None)
def _own_layer_fields(dialect: str, _generation: int) -> FrozenSet[str]:
    bvlc = {(f.name, f.number) for f in messages(BVLC).LayerParameter.DESCRIPTOR.fields}
    return frozenset(f.name for f in messages(dialect).LayerParameter.DESCRIPTOR.fields
                     if (f.name, f.number) not in bvlc)


def own_types(dialect: str) -> FrozenSet[str]:
    """Layer types `dialect` brings that BVLC has not."""
    if dialect == BVLC:
        return frozenset()
    return frozenset(ENTRIES[dialect].layer_types) - frozenset(ENTRIES[BVLC].layer_types)


# Comments dropped, quoted strings kept whole (a '#' inside one is not a comment).
_STRING_OR_COMMENT = re.compile(r""""(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|#[^\n]*""")
_TYPE = re.compile(r"""\btype\s*:\s*["']([^"']*)["']""")
_FIELD_NAME = re.compile(r"\b([A-Za-z_]\w*)\s*(?=[:{<])")


def _names_and_types(text: str) -> Tuple[set, set]:
    """The field names and the layer types a text-format net uses, outside comments."""
    code = _STRING_OR_COMMENT.sub(lambda m: "" if m.group().startswith("#") else m.group(), text)
    return set(_FIELD_NAME.findall(_STRING_OR_COMMENT.sub('""', code))), set(_TYPE.findall(code))


def unknown_names(text: str, dialect: str) -> FrozenSet[str]:
    """Field names `text` uses that `dialect` has in no message."""
    return frozenset(_names_and_types(text)[0] - field_names(dialect))


def text_candidates(text: str) -> List[str]:
    """The dialects whose schema knows every field name `text` uses, those with most of
    their own layer types first; BVLC when no fork's name or type shows. When none knows
    every name, the one that knows most (its parser then names the field it lacks)."""
    names, types = _names_and_types(text)
    fork_names = names - field_names(BVLC)
    ranked = sorted(((len(fork_names - field_names(d)), -len(types & own_types(d)), i, d)
                     for i, d in enumerate(ENTRIES)))
    fitting = [d for missing, votes, _, d in ranked if not missing and (votes or fork_names or d == BVLC)]
    return fitting or [ranked[0][3]]


def _votes(net, dialect: str) -> int:
    """Layers that show `dialect`: of a type it brings, or carrying a field of its own on a
    layer whose type is not BVLC's user of that number (a Parameter layer's field 145 is
    BVLC's parameter_param, whatever a fork calls 145)."""
    if dialect == BVLC:
        return 0
    own, types, bvlc_types = own_layer_fields(dialect), own_types(dialect), ENTRIES[BVLC].layer_types
    users = added_types()
    count = 0
    for layer in net.layer:
        if layer.type in users:  # registered from Python with its own field: shows no fork
            continue
        if layer.type in types:
            count += 1
        elif layer.type not in bvlc_types and any(f.name in own for f, _ in layer.ListFields()):
            count += 1
    return count


@dataclass(frozen=True)
class Fit:
    """How well a dialect reads a caffemodel: fields it leaves unknown, layers that show it,
    and whether it reads PoolingParameter 13, set in the file, as ceil_mode."""
    dialect: str
    unknown: int
    votes: int
    ceil_mode: bool = False


def _ceil_mode_set(net) -> bool:
    return any(layer.HasField("pooling_param") and "ceil_mode" in layer.pooling_param.DESCRIPTOR.fields_by_name
               and layer.pooling_param.HasField("ceil_mode") for layer in net.layer)


def binary_fits(data: bytes) -> List[Fit]:
    """Every dialect that parses a serialized NetParameter (a caffemodel), best first.
    Raises google.protobuf.message.DecodeError when none can."""
    fits: List[Fit] = []
    failure = None
    for dialect in ENTRIES:
        net = messages(dialect).NetParameter()
        try:
            net.ParseFromString(data)
        except DecodeError as err:
            failure = failure or err
            continue
        fits.append(Fit(dialect, len(unknown_fields(net)), _votes(net, dialect), _ceil_mode_set(net)))
    if not fits:
        raise failure
    order = list(ENTRIES)
    return sorted(fits, key=lambda f: (f.unknown, -f.votes, order.index(f.dialect)))


def binary_candidates(data: bytes) -> List[str]:
    """The dialects a caffemodel fits equally well, best first: fewest unknown fields,
    then most layers of their own; BVLC when no fork shows."""
    return _candidates(binary_fits(data))


def _candidates(fits: List[Fit]) -> List[str]:
    best = fits[0]
    if not best.votes:  # no fork shows: BVLC if it reads the file as well as any
        if not any(f.dialect == BVLC and f.unknown == best.unknown for f in fits):
            return [best.dialect]
        # PoolingParameter 13 set: BVLC's round_mode or a fork's ceil_mode (CEIL = 0 = false), the
        # opposite rounding, and the bytes cannot tell: every reading is named.
        return [BVLC] + [f.dialect for f in fits if f.ceil_mode and f.unknown == best.unknown]
    return [f.dialect for f in fits if (f.unknown, f.votes) == (best.unknown, best.votes)]


def choose_binary(fits: List[Fit], source: str, prototxt: Optional[Tuple[str, str]] = None) -> Tuple[str, str]:
    """The dialect to read a caffemodel in, and a note when the choice needs one.

    With a prototxt of a fork (its dialect, its path), the prototxt's dialect whenever it
    reads the caffemodel as well as the best fit; a caffemodel that it reads worse is
    written for another fork: an error naming both files. Otherwise (no prototxt, or a
    BVLC one, which claims no fork: a deploy net beside a fork's trained weights) the best
    fit; a note names the others that fit as well."""
    candidates = _candidates(fits)
    alternatives = f"it fits dialects {', '.join(candidates)}"
    if prototxt is None or prototxt[0] == BVLC:
        note = f"{source}: {alternatives}; read as {candidates[0]} (--dialect chooses)" if len(candidates) > 1 else ""
        return candidates[0], note
    dialect, prototxt_path = prototxt
    fit = next((f for f in fits if f.dialect == dialect), None)
    if fit is None or fit.unknown > fits[0].unknown:
        left = "cannot parse it" if fit is None else f"leaves {fit.unknown} of its fields unknown"
        raise CaffeCompatError(
            f"{source}: written in dialect {candidates[0]} ({ENTRIES[candidates[0]].fork}), but {prototxt_path} "
            f"is in dialect {dialect}, which {left}; --dialect reads both in one")
    if len(candidates) > 1:
        return dialect, f"{source}: {alternatives}; read as {dialect}, the prototxt's (--dialect chooses)"
    return dialect, ""


def detect_text_dialect(text: str) -> str:
    """The dialect of a text-format net (a prototxt)."""
    return text_candidates(text)[0]


def detect_binary_dialect(data: bytes) -> str:
    """The dialect of a serialized NetParameter (a caffemodel). Raises
    google.protobuf.message.DecodeError when it is not one."""
    return binary_candidates(data)[0]
