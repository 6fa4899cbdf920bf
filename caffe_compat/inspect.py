"""`caffe-compat inspect`: what a net holds, as a table or JSON. Needs no torch, except
for output shapes, which come from building the net when the layers allow it."""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Union

from .graph import Graph, build_graph
from .io.blobs import blob_shape
from .io.files import read_caffemodel, read_net
from .io.upgrade import is_repeated

PathLike = Union[str, Path]


def _short(value) -> str:
    return f"{value:.7g}" if isinstance(value, float) else str(value)


def _key_params(layer) -> str:
    """The scalar settings of the layer's own *_param message, e.g. 'num_output=64 kernel_size=7'."""
    parts = []
    for field, value in layer.ListFields():
        if not field.name.endswith("_param") or field.message_type is None:
            continue
        for sub_field, sub_value in value.ListFields():
            if sub_field.message_type is not None:
                continue
            if sub_field.enum_type is not None:
                names = sub_field.enum_type.values_by_number
                sub_value = ([names[v].name for v in sub_value] if is_repeated(sub_field)
                             else names[sub_value].name)
            if is_repeated(sub_field):
                sub_value = ",".join(_short(v) for v in sub_value)
            else:
                sub_value = _short(sub_value)
            parts.append(f"{sub_field.name}={sub_value}")
    return " ".join(parts)


def _output_shapes(graph: Graph) -> Optional[Dict[str, tuple]]:
    try:
        from .net import CaffeNet
    except ImportError:  # torch missing: shapes are an extra, not the point of inspect
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(CaffeNet(graph).blob_shapes)
    except Exception as err:  # any layer we cannot build: show the table without shapes
        return {"__error__": str(err)}


def inspect_net(net_path: PathLike, weights_path: Optional[PathLike] = None, phase: str = "TEST",
                dialect: Optional[str] = None, shapes: bool = True) -> dict:
    net_file = read_net(net_path, dialect)
    weights_file = read_caffemodel(weights_path, dialect) if weights_path else None
    blob_source = weights_file or (net_file if any(len(l.blobs) for l in net_file.net.layer) else None)
    stored = {}
    if blob_source is not None:
        stored = {l.name: [blob_shape(b) for b in l.blobs] for l in blob_source.net.layer if len(l.blobs)}
    graph = build_graph(net_file.net, phase, net_file.dialect)
    top_shapes = _output_shapes(graph) if shapes else None
    shape_error = top_shapes.pop("__error__", None) if top_shapes else None
    rows: List[dict] = []
    for node in graph.layers:
        blob_shapes = stored.get(node.name, [])
        rows.append({
            "name": node.name, "type": node.type, "bottoms": node.bottoms, "tops": node.tops,
            "params": _key_params(node.param),
            "blobs": [list(s) for s in blob_shapes],
            "param_count": sum(math.prod(s) for s in blob_shapes),
            "top_shapes": {t: list(top_shapes[t]) for t in node.tops if top_shapes and t in top_shapes},
            "loss_weights": [w for w in node.loss_weights if w],
        })
    return {
        "net": graph.name, "file": str(net_file.path), "weights": str(weights_path) if weights_path else None,
        "phase": graph.phase, "dialect": net_file.dialect,
        "weights_dialect": weights_file.dialect if weights_file else None,
        "upgraded_from_legacy": net_file.upgraded or bool(weights_file and weights_file.upgraded),
        "unknown_fields": net_file.unknown + (weights_file.unknown if weights_file else []),
        "layers": rows, "inputs": {k: list(v) for k, v in graph.inputs.items()}, "outputs": graph.outputs,
        "total_layers": len(rows), "total_params": sum(r["param_count"] for r in rows),
        "weights_not_in_net": sorted(set(stored) - {r["name"] for r in rows}),
        "shape_error": shape_error,
    }


def format_inspection(info: dict) -> str:
    header = ("layer", "type", "bottoms -> tops", "output shape", "blobs", "params", "settings")
    rows = []
    for r in info["layers"]:
        shapes = "; ".join("x".join(str(d) for d in s) for s in r["top_shapes"].values())
        blobs = " ".join("(" + ",".join(str(d) for d in s) + ")" for s in r["blobs"])
        wiring = f"{','.join(r['bottoms']) or '-'} -> {','.join(r['tops']) or '-'}"
        rows.append((r["name"], r["type"], wiring, shapes, blobs, f"{r['param_count']:,}" if r["blobs"] else "",
                     r["params"]))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [f"net '{info['net']}' ({info['file']}), phase {info['phase']}, dialect {info['dialect']}"
           + (f", weights {info['weights']} (dialect {info['weights_dialect']})" if info["weights"] else "")
           + (", upgraded from the legacy format" if info["upgraded_from_legacy"] else ""),
           line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out.append(f"total: {info['total_layers']} layers, {info['total_params']:,} parameters")
    if info["weights_not_in_net"]:
        out.append(f"in the weights but not this net: {', '.join(info['weights_not_in_net'])}")
    if info["unknown_fields"]:
        out.append("unknown fields (kept, not understood): " + "; ".join(info["unknown_fields"]))
    if info["shape_error"]:
        out.append(f"output shapes unavailable: {info['shape_error']}")
    return "\n".join(out)
