"""Caffe net -> one standalone PyTorch source file (`model.py`) and its weights beside it
(`model.pth`), which need only torch to run.

Each layer of the built `CaffeNet` is handed to its type's source emitter in the layer
registry (the same graph and built modules the ONNX emitters read). An emitter adds the
plain-torch helpers its type needs (written once, at the top of the file), the layer's
attribute when it has parameters, and its line of `forward`; it makes the same torch
calls as the layer's module, so the file computes the `CaffeNet`'s numbers.

The weights are a state dict read with `torch.load(weights_only=True)`: torch's own
format keeps the file free of any import beyond torch, and that loader builds tensors
only, never arbitrary objects.
"""
from __future__ import annotations

import hashlib
import io
import keyword
import re
import textwrap
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

from .. import __version__
from ..errors import CaffeCompatError
from ..graph import param_owners
from ..io.atomic import write_bytes, write_text
from ..io.files import NetFile
from ..layers.registry import REGISTRY, LayerContext
from ..net import CaffeNet, safe_name
from .artifact import load as load_model
from .preprocess import describe as describe_preprocess

PathLike = Union[str, Path]
LINE_LIMIT = 120
WEIGHTS_SUFFIX = ".pth"
INDENT = " " * 8  # a statement in forward or __init__
# Built-in types a model file cannot hold, and why.
READS_FILES = "it reads its records from files, which a model file leaves to its user: convert the deploy net"
NO_SOURCE_FORM = {"Data": READS_FILES, "ImageData": READS_FILES, "HDF5Data": READS_FILES,
                  "HDF5Output": "it writes its bottoms to a file at every pass"}
# Names the generated file defines or imports besides the helpers: no blob variable takes them.
RESERVED = frozenset(keyword.kwlist) | {"self", "torch", "nn", "F", "Path", "load", "INPUTS", "OUTPUTS"}


class SourceWriter:
    """What the emitters write into: helpers, attributes, forward's lines, the weights."""

    def __init__(self, attribute_names: Mapping[str, str]):
        self.attribute_names = attribute_names  # Caffe layer name -> attribute name
        self.helpers: Dict[str, None] = {}  # helper sources, in first-use order
        self.init_lines: List[str] = []
        self.forward_lines: List[str] = []
        self.state: Dict[str, torch.Tensor] = {}

    def helper(self, source: str) -> None:
        """A function (or class) the layer's line calls, written once at the top of the file."""
        self.helpers.setdefault(source.strip("\n"))

    def attribute(self, ctx: LayerContext, constructor: str, blobs: Mapping[str, torch.Tensor]) -> str:
        """`self.<layer>`, built by `constructor`, whose parameters `blobs` (name -> tensor) are saved."""
        name = self.attribute_names[ctx.name]
        self.init_lines.append(f"self.{name} = {constructor}")
        for key, tensor in blobs.items():
            self.state[f"{name}.{key}"] = tensor
        return f"self.{name}"

    def assign(self, outputs: Sequence[str], expression: str) -> None:
        self.forward_lines.append(f"{', '.join(outputs)} = {expression}")


def class_name(net_name: str) -> str:
    """'googlenet_deploy' -> 'GooglenetDeploy'; a net without a usable name is 'CaffeNetModel'."""
    parts = [p for p in re.split(r"\W|_", net_name) if p]
    name = "".join(p[0].upper() + p[1:] for p in parts)
    return name if name and name.isidentifier() and not name[0].isdigit() else "CaffeNetModel"


def wrap(line: str, indent: str) -> List[str]:
    """A statement over LINE_LIMIT broken after commas, continued under its first bracket."""
    text = indent + line
    if len(text) <= LINE_LIMIT:
        return [text]
    targets, sep, value = line.partition(" = ")
    if sep:  # brackets around a tuple on either side, so that it may continue on the next line
        text = indent + " = ".join(f"({side})" if _top_level_comma(side) else side for side in (targets, value))
    opening = min(i for i in (text.find("("), text.find("[")) if i >= 0)
    hang = " " * (opening + 1)
    lines, current = [], ""
    for piece in re.split(r"(?<=, )", text):
        if current and len(current) + len(piece.rstrip()) > LINE_LIMIT:
            lines.append(current.rstrip())
            current = hang + piece
        else:
            current += piece
    lines.append(current)
    return lines


def _top_level_comma(text: str) -> bool:
    depth = 0
    for i, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if depth == 0 and text.startswith(", ", i):
            return True
    return False


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _variables(net: CaffeNet, reserved: frozenset) -> Dict[str, str]:
    """Blob name -> a Python identifier, in the order blobs appear."""
    names: Dict[str, str] = {}
    blobs = list(net.input_names) + [b for _, bottoms, tops in net._plan for b in list(bottoms) + list(tops)]
    for blob in blobs:
        if blob not in names:
            names[blob] = safe_name(blob, reserved | set(names.values()))
    return names


def _attribute_names(net: CaffeNet) -> Dict[str, str]:
    """Caffe layer name -> attribute name; nn.Module's own attributes (`training`, `eval`) are avoided."""
    taken = {name for name in dir(torch.nn.Module())} | RESERVED
    result = {}
    for module_name, layer in net.layer_names.items():
        result[layer] = safe_name(module_name, taken)
        taken.add(result[layer])
    return result


def _emit(net: CaffeNet, reserved: frozenset) -> tuple:
    variables = _variables(net, reserved)
    writer = SourceWriter(_attribute_names(net))
    nodes = {node.name: node for node in net.graph.layers}
    refused = []
    for module_name, bottoms, tops in net._plan:
        node = nodes[net.layer_names[module_name]]
        entry = REGISTRY.get(node.type)
        if entry is None or entry.to_source is None:
            refused.append((node.name, node.type))
            continue
        ctx = LayerContext(node.name, node.type, node.param, list(node.bottoms), list(node.tops),
                           [net.blob_shapes[b] for b in node.bottoms], net.phase, list(node.loss_weights))
        stopped = net._stop_gradient[module_name]
        inputs = [variables[b] + (".detach()" if i in stopped else "") for i, b in enumerate(bottoms)]
        entry.to_source(writer, ctx, net.layers[module_name], inputs, [variables[t] for t in tops])
    if refused:
        layer, layer_type = refused[0]
        why = f" ({NO_SOURCE_FORM[layer_type]})" if layer_type in NO_SOURCE_FORM else ""
        raise CaffeCompatError(f"net '{net.graph.name}': layer '{layer}' ({layer_type}) has no standalone PyTorch "
                               f"source form{why}"
                               + (f" (nor {len(refused) - 1} other layer(s))" if len(refused) > 1 else "")
                               + "; convert to .pt or .safetensors instead")
    for (layer, index), (owner, owner_index) in param_owners(net.graph).items():
        attr = _blob_attribute(net, layer, index)
        owner_attr = _blob_attribute(net, owner, owner_index)
        writer.init_lines.append(f"self.{writer.attribute_names[layer]}.{attr} = "
                                 f"self.{writer.attribute_names[owner]}.{owner_attr}")
    return writer, variables


def _blob_attribute(net: CaffeNet, layer: str, index: int) -> str:
    return net.layers[net.module_names[layer]].blob_names[index]


def _defined_names(sources) -> frozenset:
    """The functions, classes and constants the helpers define."""
    names = set()
    for source in sources:
        names.update(re.findall(r"^(?:def|class) (\w+)", source, re.M))
        names.update(re.findall(r"^(\w+) =", source, re.M))
    return frozenset(names)


def generate(net: CaffeNet, sources: Sequence[str], dialect: str,
             preprocess: Optional[Mapping[str, str]] = None) -> tuple:
    """(the module's source text, its state dict) for `net`. `sources` are the header's
    lines naming where the net and its weights came from."""
    writer, _ = _emit(net, RESERVED)
    reserved = RESERVED | _defined_names(writer.helpers)
    writer, variables = _emit(net, reserved)  # again, now that no blob may take a helper's name
    cls = class_name(net.graph.name)
    if cls in reserved:  # a net named like a helper
        cls += "Net"
    inputs = [variables[b] for b in net.input_names]
    outputs = [variables[b] for b in net.output_names]
    doc = (f"Caffe net '{net.graph.name}', phase {net.phase}: forward({', '.join(inputs)}) -> "
           f"{', '.join(net.output_names) or 'nothing'}.")
    doc_lines = textwrap.wrap(doc, LINE_LIMIT - len('    """"""'), break_on_hyphens=False)
    if len(doc_lines) > 1:  # a long signature: the docstring over several lines, closed on its own
        doc_lines = doc_lines[:1] + ["    " + line for line in doc_lines[1:]] + ["    "]
    body = [f"class {cls}(nn.Module):", '    """' + "\n".join(doc_lines) + '"""', "",
            "    def __init__(self):", "        super().__init__()"]
    body += [line for statement in writer.init_lines for line in wrap(statement, INDENT)] or ["        pass"]
    body += ["", f"    def forward({', '.join(['self', *inputs])}):"]
    body += [line for statement in writer.forward_lines for line in wrap(statement, INDENT)]
    body += wrap(f"return {', '.join(outputs) or 'None'}", INDENT)
    shapes = ", ".join(f"{b} {tuple(net.blob_shapes[b])}" for b in net.input_names) or "none"
    header = [f"# Caffe net '{net.graph.name}' as standalone PyTorch, written by caffe-compat {__version__}.",
              *[f"# {line}" for line in sources],
              f"# dialect {dialect}, phase {net.phase}; inputs as Caffe was given them: {shapes}",
              f"# preprocessing the net expects: {describe_preprocess(preprocess or {})}",
              "# Needs only torch: load() builds the net and reads its weights (the .pth beside this file)."]
    header = [line for text in header for line in textwrap.wrap(text, LINE_LIMIT, subsequent_indent="#   ")]
    text = "\n".join(header) + '\n"""Generated by caffe-compat from a Caffe net; see the comments above."""\n'
    text += "from pathlib import Path\n\nimport torch\n"
    code = "\n\n\n".join(list(writer.helpers) + ["\n".join(body)])
    if re.search(r"\bF\.", code):
        text += "import torch.nn.functional as F\n"
    text += "from torch import nn\n\n"
    text += f"INPUTS = {tuple(net.input_names)!r}\nOUTPUTS = {tuple(net.output_names)!r}\n\n\n"
    text += code + "\n\n\n"
    text += (f'def load(path=None, device="cpu"):\n'
             f'    """The net with its weights (the .pth beside this file unless `path`), in eval mode."""\n'
             f'    path = Path(__file__).with_suffix("{WEIGHTS_SUFFIX}") if path is None else path\n'
             f"    model = {cls}()\n"
             f"    model.load_state_dict(torch.load(path, map_location=device, weights_only=True))\n"
             f"    return model.to(device).eval()\n")
    return text, _state_dict(writer.state)


def _state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached copies; a tensor shared by several layers stays one tensor (saved once)."""
    copies: Dict[int, torch.Tensor] = {}
    return {key: copies.setdefault(id(t), t.detach().cpu().clone().contiguous()) for key, t in state.items()}


def file_origin(what: str, path: PathLike) -> str:
    """A header line naming a source file by its name and sha256."""
    return f"{what} {Path(path).name} (sha256 {file_sha256(path)})"


def write_source(net: CaffeNet, out: PathLike, origin: Sequence[str], dialect: str,
                 preprocess: Optional[Mapping[str, str]] = None, inputs: Sequence[PathLike] = ()) -> Path:
    """Write `out` (model.py) and its weights beside it (model.pth); returns the weights' path.
    `origin`: the header's lines naming where the net and its weights came from; `inputs`: the
    files read, which the weights must not overwrite. Nothing is written when a layer has no
    source form."""
    weights_out = Path(out).with_suffix(WEIGHTS_SUFFIX)
    if any(Path(p).resolve() == weights_out.resolve() for p in inputs):
        raise CaffeCompatError(f"{weights_out}: the weights of {out} would go there, but the conversion reads it; "
                               f"name the output otherwise")
    text, state = generate(net, origin, dialect, preprocess)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(weights_out, buffer.getvalue())
    write_text(out, text)
    return weights_out


def net_to_source(net: CaffeNet, out: PathLike, net_file: NetFile, weights: Optional[PathLike], seed: int,
                  preprocess: Optional[Mapping[str, str]] = None) -> Path:
    """`convert NET (WEIGHTS | --random-init) -o model.py`."""
    origin = [file_origin("net", net_file.path),
              file_origin("weights", weights) if weights is not None
              else f"weights: the prototxt's fillers, seed {seed} (--random-init)"]
    inputs = [net_file.path] + ([weights] if weights is not None else [])
    return write_source(net, out, origin, net_file.dialect, preprocess, inputs)


def model_to_source(model_path: PathLike, out: PathLike) -> Path:
    """`convert MODEL -o model.py`: a model file written by convert or train, in its saved phase."""
    net = load_model(model_path)
    return write_source(net, out, [file_origin("model", model_path)], net.graph.dialect, net.preprocess,
                        [model_path])
