"""`caffe-compat inspect`: what a net holds, as a table or JSON. Needs no torch: blob
shapes and parameter counts come from arithmetic (caffe_compat.shapes), so no weights
are ever allocated."""
from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

from ..deploy import recorded_shapes
from ..errors import CaffeCompatError, printable
from ..graph import PHASES, Graph, LayerNode, build_graph, check_weights_fit
from ..io.blobs import blob_shape
from ..io.dialects import likely_fork
from ..io.files import read_net, read_with_weights
from ..io.schema import is_repeated, unknown_fields
from ..layers.catalog import CATALOG
from ..shapes import net_shapes

PathLike = Union[str, Path]


def _plain(field, value):
    """One protobuf value as JSON: enums by name, messages as objects, floats at float32 precision."""
    if field.message_type is not None:
        return message_dict(value)
    if field.enum_type is not None:
        enum = field.enum_type.values_by_number.get(value)
        return enum.name if enum is not None else value
    if isinstance(value, float):
        return float(f"{value:.7g}")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def message_dict(message) -> dict:
    """The fields set in a protobuf message, field name -> value."""
    return {field.name: [_plain(field, v) for v in value] if is_repeated(field) else _plain(field, value)
            for field, value in message.ListFields()}


def layer_params(layer) -> dict:
    """The layer's own *_param messages, e.g. {'convolution_param': {'num_output': 64, ...}}."""
    return {field.name: message_dict(value) for field, value in layer.ListFields()
            if field.name.endswith("_param") and field.message_type is not None}


def _short(value) -> str:
    if isinstance(value, list):
        return ",".join(_short(v) for v in value)
    return f"{value:.7g}" if isinstance(value, float) else str(value)


def settings_text(params: dict) -> str:
    """The scalar settings, e.g. 'num_output=64 kernel_size=7' (nested messages left out)."""
    return " ".join(f"{name}={_short(value)}" for fields in params.values() for name, value in fields.items()
                    if not isinstance(value, dict) and not (isinstance(value, list) and value
                                                            and isinstance(value[0], dict)))


def is_automatic_split(node: LayerNode) -> bool:
    """A Split layer Caffe's InsertSplits added (saved into caffemodels): named
    '<blob>_<layer>_<i>_split', with tops '<name>_0', '<name>_1', ..."""
    return (node.type == "Split" and len(node.bottoms) == 1 and node.name.startswith(node.bottoms[0] + "_")
            and node.name.endswith("_split") and node.tops == [f"{node.name}_{k}" for k in range(len(node.tops))])


def buildable(layer_type: str) -> bool:
    """Whether the project has a builder for `layer_type`: a built-in one (the catalog) or one
    registered from Python, looked up without importing torch."""
    registry = sys.modules.get("caffe_compat.layers.registry")
    return (layer_type == "Input" or layer_type in CATALOG  # Input layers are the graph's own
            or (registry is not None and registry.REGISTRY.registered(layer_type)))


def _stored_fits(stored: Sequence[int], expected: Sequence[int]) -> bool:
    stored, expected = tuple(stored), tuple(expected)
    # legacy blobs are 4-D with leading 1s where the current shape has fewer axes
    return stored == expected or (len(stored) == 4 and len(expected) < 4
                                  and stored == (1,) * (4 - len(expected)) + expected)


def _graph(net_file, phase: str) -> Graph:
    """The graph of `phase`; where that phase has no data or no layers and the other
    phase builds, the error says to use it."""
    other = PHASES[1 - PHASES.index(phase)]
    try:
        graph = build_graph(net_file.net, phase, net_file.dialect, source=str(net_file.path))
        problem = None if graph.layers else CaffeCompatError(f"net '{graph.name}' has no layers in the {phase} phase")
    except CaffeCompatError as err:
        problem = err
    if problem is None:
        return graph
    try:
        alternative = build_graph(net_file.net, other, net_file.dialect)
    except CaffeCompatError:
        raise problem from None
    if not alternative.layers:
        raise problem
    raise CaffeCompatError(f"{net_file.path}: {problem} (its {other} phase has its data: try --phase {other})")


def inspect_net(net_path: PathLike, weights_path: Optional[PathLike] = None, phase: str = "TEST",
                dialect: Optional[str] = None, show_all: bool = False,
                input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> dict:
    """What `inspect` shows, as a JSON-able dict. Caffe's automatic split layers are left
    out unless `show_all` (consumers then read the split blob's source). `input_shapes`
    ({blob: shape}) sizes inputs and data layers' tops, as `load_net`'s does."""
    net_file = read_net(net_path, dialect, lenient=True)  # inspect refuses no net for a fork's field
    weights_file = None
    if weights_path:
        net_file, weights_file = read_with_weights(net_file, weights_path, dialect)
    blob_source = weights_file or (net_file if any(len(l.blobs) for l in net_file.net.layer) else None)
    stored = {}
    if blob_source is not None:
        stored = {l.name: [blob_shape(b) for b in l.blobs] for l in blob_source.net.layer if len(l.blobs)}
    graph = _graph(net_file, phase.upper())
    # Data layers whose records are here shape their tops from the first one, as Caffe's do.
    shapes = net_shapes(graph, {**recorded_shapes(net_file.net, phase.upper()), **(input_shapes or {})})
    net_not_in_weights: List[str] = []
    if weights_file is not None:  # weights that set nothing are refused, as every other verb refuses them
        counts = {n.name: len(shapes.params[n.name] or ()) for n in graph.layers if n.type != "Input"}
        check_weights_fit(graph, counts, list(stored), str(weights_path), allow_missing=True)
        # A layer whose every blob is another's (a shared param) gets its values through that one.
        net_not_in_weights = [name for name, count in counts.items() if count and name not in stored
                              and any((name, i) not in shapes.shared for i in range(count))]
    hidden = [] if show_all else [node for node in graph.layers if is_automatic_split(node)]
    hidden_names = {node.name for node in hidden}
    source_of = {top: node.bottoms[0] for node in hidden for top in node.tops}
    rows: List[dict] = []
    mismatched: List[str] = []
    for node in graph.layers:
        if node.name in hidden_names:
            continue
        have = stored.get(node.name)
        if shapes.params[node.name] is None and have is not None:
            shapes.params[node.name] = [tuple(s) for s in have]  # unknown from the prototxt: the weights tell
        blobs = shapes.params[node.name]
        if have is not None and blobs is not None and (
                len(have) != len(blobs) or not all(map(_stored_fits, have, blobs))):
            mismatched.append(f"{node.name} {[tuple(s) for s in have]} (the net needs {[tuple(s) for s in blobs]})")
        top_shapes = {t: None if shapes.blobs.get(t) is None else list(shapes.blobs[t]) for t in node.tops}
        rows.append({
            "name": node.name, "type": node.type,
            "fork": None if buildable(node.type) else likely_fork(node.type),
            "bottoms": [source_of.get(b, b) for b in node.bottoms], "tops": node.tops,
            "params": layer_params(node.param),
            "blobs": None if blobs is None else [list(s) for s in blobs],
            "param_count": shapes.param_count(node.name),
            "top_shapes": top_shapes,
            "loss_weights": [w for w in node.loss_weights if w],
            "unknown_fields": unknown_fields(node.param),  # settings the dialect does not decode, by number
        })
    total, complete = shapes.total_params()
    return {
        "net": graph.name, "file": str(net_file.path), "weights": str(weights_path) if weights_path else None,
        "phase": graph.phase, "dialect": net_file.dialect,
        "weights_dialect": weights_file.dialect if weights_file else None,
        "upgraded_from_legacy": net_file.upgraded or bool(weights_file and weights_file.upgraded),
        "unknown_fields": net_file.unknown + (weights_file.unknown if weights_file else []),
        "layers": rows, "inputs": {k: None if v is None else list(v) for k, v in graph.inputs.items()},
        "outputs": graph.outputs, "total_layers": len(rows),
        "total_params": total, "total_params_complete": complete,
        "shared_param_blobs": len(shapes.shared),
        "hidden_split_layers": len(hidden),
        "weights_not_in_net": sorted(set(stored) - {node.name for node in graph.layers}),
        "net_not_in_weights": net_not_in_weights,
        "weights_mismatched": mismatched,
        "shape_notes": shapes.notes,
        "cannot_build": [f"'{r['name']}' ({r['type']}, from {r['fork']})" for r in rows if r["fork"]],
    }


def _shape_text(shape: Optional[Sequence[int]]) -> str:
    if shape is None:
        return "?"
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


HEADER = ("layer", "type", "bottoms -> tops", "output shape", "blobs", "params", "settings")
WIRING, BLOBS, SETTINGS = 2, 4, 6
# Columns that wrap to fit the terminal, with their least widths ...
_FLEXIBLE = {WIRING: 16, BLOBS: 12, SETTINGS: 20}
# ... and the order in which they move to a line under their row when even that is too wide.
_DETACHABLE = (SETTINGS, BLOBS, WIRING)


def _layout(natural: Sequence[int], columns: int):
    """The columns kept in the table with their widths, and those moved under each row."""
    for count in range(len(_DETACHABLE) + 1):
        detached = _DETACHABLE[:count]
        widths = {i: w for i, w in enumerate(natural) if i not in detached}
        room = columns - 2 * (len(widths) - 1)
        # the last resort wraps the layer names and types too
        flexible = {**_FLEXIBLE, **({0: 12, 1: 8} if count == len(_DETACHABLE) else {})}
        # narrow the widest flexible column, one character at a time, down to its least width
        while sum(widths.values()) > room:
            slack = [(widths[i] - least, i) for i, least in flexible.items() if i in widths and widths[i] > least]
            if not slack:
                break
            widths[max(slack)[1]] -= 1
        if sum(widths.values()) <= room:
            break
    return widths, detached


def _table(rows: List[Sequence[str]], columns: int) -> List[str]:
    natural = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(HEADER)]
    widths, detached = _layout(natural, columns)
    dashes = ["-" * widths.get(i, 0) for i in range(len(HEADER))]
    lines = []
    for row, cells in enumerate([HEADER, dashes] + rows):
        wrapped = [textwrap.wrap(cells[i], w, break_on_hyphens=False) if len(cells[i]) > w else [cells[i][:w]]
                   for i, w in widths.items()]
        for k in range(max(len(w) for w in wrapped)):
            parts = [(w[k] if k < len(w) else "").ljust(width) for w, width in zip(wrapped, widths.values())]
            lines.append("  ".join(parts).rstrip())
        below = "; ".join(("blobs " if i == BLOBS else "") + cells[i]
                          for i in sorted(detached) if cells[i] and row > 1)
        if below:
            lines += textwrap.wrap(below, columns, initial_indent="    ", subsequent_indent="      ",
                                   break_on_hyphens=False)
    return lines


def format_inspection(info: dict, columns: Optional[int] = None) -> str:
    """The table, fitted to `columns` (default: the terminal's width)."""
    columns = columns or shutil.get_terminal_size().columns
    rows = []
    for r in info["layers"]:
        shapes = "; ".join(_shape_text(s) for s in r["top_shapes"].values())
        if r["blobs"] is None:
            blobs, count = "?", "?"
        else:
            blobs = " ".join("(" + ",".join(str(d) for d in s) + ")" for s in r["blobs"])
            count = f"{r['param_count']:,}" if r["blobs"] else ""
        if r["bottoms"] and r["bottoms"] == r["tops"]:
            wiring = f"{', '.join(r['tops'])} (in place)"
        else:
            wiring = f"{', '.join(r['bottoms']) or '-'} -> {', '.join(r['tops']) or '-'}"
        # Names and settings come from the file: escaped, a name cannot break the table.
        rows.append(tuple(map(printable, (r["name"], r["type"], wiring, shapes, blobs, count,
                                          settings_text(r["params"])))))
    head = [f"net '{info['net']}' ({info['file']}), phase {info['phase']}, dialect {info['dialect']}"
            + (f", weights {info['weights']} (dialect {info['weights_dialect']})" if info["weights"] else "")
            + (", upgraded from the legacy format" if info["upgraded_from_legacy"] else "")]
    out = []
    total = f"{info['total_params']:,} parameters"
    if not info["total_params_complete"]:
        total = f"at least {total} ('?': unknown, see below)"
    if info["shared_param_blobs"]:
        total += f", {info['shared_param_blobs']} shared blob(s) counted once"
    out.append(f"total: {info['total_layers']} layers, {total}")
    if info["hidden_split_layers"]:
        out.append(f"{info['hidden_split_layers']} automatic split layer(s) of Caffe hidden (--all shows them)")
    if info["weights_not_in_net"]:
        out.append(f"in the weights but not this net: {', '.join(info['weights_not_in_net'])}")
    if info["net_not_in_weights"]:
        out.append(f"in this net but not the weights (their fillers' values unless given): "
                   f"{', '.join(info['net_not_in_weights'])}")
    if info["weights_mismatched"]:
        out.append("in the weights with other shapes: " + "; ".join(info["weights_mismatched"]))
    if info["cannot_build"]:
        out.append("layers this project cannot build (no builder; inspect only): " + "; ".join(info["cannot_build"]))
    if info["unknown_fields"]:
        out.append("unknown fields (kept, not understood): " + "; ".join(info["unknown_fields"]))
    for note in info["shape_notes"]:
        out.append(f"shapes after this are unknown ('?'): {note}")
    wrap = [line for text in map(printable, head)
            for line in textwrap.wrap(text, columns, subsequent_indent="  ", break_on_hyphens=False)]
    wrap += _table(rows, columns)
    wrap += [line for text in map(printable, out)
             for line in textwrap.wrap(text, columns, subsequent_indent="  ", break_on_hyphens=False)]
    return "\n".join(wrap)
