"""Caffe net -> ONNX model, written straight from the Caffe graph: each layer the
outputs need is handed to its type's emitter in the layer registry.

Blobs rewritten in place (ReLU, Dropout on their bottom) become a chain of ONNX
tensors: each blob's last version keeps the blob's name, earlier versions are named
'<blob>:<layer that wrote it>'. Graph inputs and outputs therefore carry Caffe's blob
names, and an output is the value Caffe's `net.blobs[name]` holds after `forward()`.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import onnx
from onnx import TensorProto, helper

from .. import __version__
from ..deploy import data_layers_of, deploy_net, is_training_only
from ..errors import CaffeCompatError
from ..graph import build_graph
from ..io.atomic import write_bytes
from ..io.files import read_prototxt, read_with_weights, weights_of
from ..layers.normalization import onnx_reduce
from ..layers.onnx_graph import OnnxGraph
from ..layers.registry import REGISTRY, LayerContext
from ..net import CaffeNet
from .artifact import model_net_file, model_weights, read_model
from .onnx_preprocess import IMAGE_INPUT, ImageFront, append_front, image_front, image_input
from .preprocess import PreprocessOverrides, preprocess_metadata, with_overrides

PathLike = Union[str, Path]
DEFAULT_OPSET = 17
MIN_OPSET = 13  # Split with sizes as an input, Softmax over one axis
EMBEDDING_BLOB = "fc_embedding"
BATCH_DIM = "N"
# The floor under the row norm in l2_normalize, as torch.nn.functional.normalize's:
# a zero row stays zero instead of becoming NaN.
L2_EPS = 1e-12
L2_SUFFIX = "/l2_normalized"

Version = Tuple[str, int]  # (blob, how many times it was written before: 0 is the first value)


@dataclass
class _Step:
    module_name: str
    reads: List[Version]
    writes: List[Version]


def _trace(net: CaffeNet) -> Tuple[List[_Step], Dict[str, int]]:
    """The net's layers as steps over blob versions, and each blob's last version."""
    last = {name: 0 for name in net.input_names}
    steps = []
    for module_name, bottoms, tops in net._plan:
        reads = [(b, last[b]) for b in bottoms]
        writes = []
        for top in tops:
            last[top] = last.get(top, -1) + 1
            writes.append((top, last[top]))
        steps.append(_Step(module_name, reads, writes))
    return steps, last


def default_outputs(net: CaffeNet) -> List[str]:
    """`fc_embedding` where the net has one (the paper's embedders), else the net's
    outputs that are not losses or metrics."""
    if EMBEDDING_BLOB in net.blob_shapes:
        return [EMBEDDING_BLOB]
    scoring = {top for node in net.graph.layers if is_training_only(node.type) or any(node.loss_weights)
               for top in node.tops}
    return [blob for blob in net.output_names if blob not in scoring]


def _needed_steps(steps: List[_Step], wanted: List[Version]) -> Tuple[List[_Step], set]:
    needed = set(wanted)
    kept = []
    for step in reversed(steps):
        if any(w in needed for w in step.writes):
            kept.append(step)
            needed.update(step.reads)
    kept.reverse()
    return kept, needed


def _value_info(name: str, shape: Optional[Sequence]):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None if shape is None else list(shape))


def _inferred_outputs(model: onnx.ModelProto) -> Dict[str, onnx.ValueInfoProto]:
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    return {info.name: info for info in list(inferred.graph.value_info) + list(inferred.graph.output)}


def _with_inputs(net: CaffeNet) -> CaffeNet:
    """A net fed by Input layers: one built with data layers is rebuilt from its deploy net."""
    if net.input_names:
        return net
    graph = build_graph(deploy_net(net.graph.net), net.phase, net.graph.dialect)
    return CaffeNet(graph, net.caffe_weights())


def export_onnx(net: CaffeNet, outputs: Optional[Sequence[str]] = None, opset: int = DEFAULT_OPSET,
                l2_normalize: bool = False, static_batch: bool = False,
                metadata: Optional[Mapping[str, str]] = None, front: Optional[ImageFront] = None) -> onnx.ModelProto:
    """The ONNX model computing `outputs` (blob names; default: `default_outputs`) of
    `net`'s layers with their inference (TEST) behaviour.

    Only the layers the outputs depend on are exported, so losses, Accuracy, Silence
    and data layers drop out. The batch axis of inputs of rank 2 or more is the
    symbolic 'N' unless `static_batch`. `l2_normalize` replaces each output by x / max(||x||_2, 1e-12),
    the norm taken per example over all axes but the first, named '<blob>/l2_normalized'.
    `metadata` adds to (and overrides) the model's metadata_props; where it holds
    `preprocess.*` entries (see `converters.preprocess`) they replace the net's own account.
    `front` (see `onnx_preprocess.image_front`) makes the image input uint8 images, the
    preprocessing done in the graph.
    """
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise CaffeCompatError(f"opset {opset} is not supported: give one from {MIN_OPSET} to "
                               f"{onnx.defs.onnx_opset_version()}")
    given = dict(metadata or {})
    props = {"caffe_compat.version": __version__}
    if not any(key.startswith("preprocess.") for key in given):  # else the caller's account stands whole
        props.update(preprocess_metadata(net.graph.net,
                                         input_shapes={name: net.blob_shapes[name] for name in net.input_names}))
    props.update(given)
    net = _with_inputs(net)
    outputs = list(outputs) if outputs else default_outputs(net)
    if not outputs:
        raise CaffeCompatError(f"net '{net.graph.name}' has no outputs besides losses and metrics; "
                               f"name the blob(s) to export")
    unknown = [b for b in outputs if b not in net.blob_shapes]
    if unknown:
        raise CaffeCompatError(f"net '{net.graph.name}' has no blob(s) {', '.join(map(repr, unknown))} "
                               f"in its TEST phase")
    outputs = list(dict.fromkeys(outputs))

    steps, last = _trace(net)
    fed = [b for b in outputs if b in net.input_names and last[b] == 0]
    if fed:
        raise CaffeCompatError(f"net '{net.graph.name}': {', '.join(map(repr, fed))} is an input of the net, "
                               f"not something it computes; name a blob a layer writes")
    kept, needed = _needed_steps(steps, [(b, last[b]) for b in outputs])
    nodes = {node.name: node for node in net.graph.layers}
    missing = []
    for step in kept:
        node = nodes[net.layer_names[step.module_name]]
        entry = REGISTRY.get(node.type)
        if entry is None or entry.to_onnx is None:
            missing.append(f"'{node.name}' ({node.type})")
    if missing:
        raise CaffeCompatError(f"net '{net.graph.name}': {len(missing)} layer(s) needed for "
                               f"{', '.join(outputs)} have no ONNX mapping: {', '.join(missing)}")

    g = OnnxGraph(opset)
    inputs = [name for name in net.input_names if (name, 0) in needed]
    fronted = None
    if front is not None:
        fronted = props.get("preprocess.input")
        if fronted not in inputs or len(net.blob_shapes[fronted]) != 4:
            raise CaffeCompatError(f"net '{net.graph.name}': --embed-preprocessing needs a 4-D image input the "
                                   f"outputs use; the net's inputs are {', '.join(inputs)}")
        g.reserve(IMAGE_INPUT)
        props["preprocess.embedded"] = front.describe()
    names: Dict[Version, str] = {}
    for name in inputs:
        names[(name, 0)] = name
    for step in kept:
        for blob, version in step.writes:
            # An Input blob rewritten in place: its name stays with the graph input.
            if version == last[blob] and blob not in net.input_names:
                names[(blob, version)] = blob
    for name in names.values():
        g.reserve(name)
    for step in kept:
        layer_name = net.layer_names[step.module_name]
        for write in step.writes:
            if write not in names:
                names[write] = g.fresh(f"{write[0]}:{layer_name}")

    if fronted is not None:
        append_front(g, front, IMAGE_INPUT, fronted)
    was_training = net.training
    net.eval()
    try:
        for step in kept:
            node = nodes[net.layer_names[step.module_name]]
            ctx = LayerContext(node.name, node.type, node.param, list(node.bottoms), list(node.tops),
                               [net.blob_shapes[b] for b in node.bottoms], "TEST", list(node.loss_weights))
            REGISTRY[node.type].to_onnx(g, ctx, net.layers[step.module_name],
                                        [names[r] for r in step.reads], [names[w] for w in step.writes])
    finally:
        net.train(was_training)
    props.update({key: value for key, value in g.metadata.items() if key not in given})

    output_names = [names[(b, last[b])] for b in outputs]
    if l2_normalize:
        output_names = [_append_l2_normalize(g, name, len(net.blob_shapes[blob]))
                        for name, blob in zip(output_names, outputs)]
        props["postprocess.l2_normalize"] = f"x / max(||x||_2, {L2_EPS:g}) per example"

    def declared(blob: str) -> List:
        # 0-d and 1-d inputs (a Scale's or Bias's second bottom) have no batch axis.
        shape = list(net.blob_shapes[blob])
        if not static_batch and len(shape) >= 2:
            shape[0] = BATCH_DIM
        return shape

    graph_inputs = [image_input(front, net.blob_shapes[name], declared(name)[0]) if name == fronted
                    else _value_info(name, declared(name)) for name in inputs]
    graph = helper.make_graph(g.nodes, net.graph.name or "caffe_net", graph_inputs,
                              [_value_info(name, None) for name in output_names], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="caffe-compat", producer_version=__version__,
                              doc_string=f"Caffe net '{net.graph.name}' exported by caffe-compat {__version__}")
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    # Output shapes as ONNX infers them: the batch axis stays symbolic wherever it flows.
    inferred = _inferred_outputs(model)
    for index, name in enumerate(output_names):
        if name in inferred and inferred[name].type.tensor_type.HasField("shape"):
            model.graph.output[index].CopyFrom(inferred[name])
    helper.set_model_props(model, {k: str(v) for k, v in props.items()})
    return model


def _append_l2_normalize(g: OnnxGraph, x: str, rank: int) -> str:
    if rank < 2:
        raise CaffeCompatError(f"l2_normalize needs outputs with a batch axis; '{x}' has rank {rank}")
    norm = onnx_reduce(g, "ReduceL2", x, list(range(1, rank)), 1, hint=f"{x}/l2_norm")
    (floored,) = g.node("Max", [norm, g.floats(L2_EPS, f"{x}/l2_eps")], hint=f"{x}/l2_norm_floored")
    output = g.fresh(x + L2_SUFFIX)
    g.node("Div", [x, floored], [output])
    return output


def write_onnx(net: CaffeNet, path: PathLike, **options) -> onnx.ModelProto:
    """`export_onnx(net, **options)`, checked and written to `path` atomically."""
    model = export_onnx(net, **options)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:  # an emitter's mistake: say where, in one line
        raise CaffeCompatError(f"{path}: the exported graph does not pass ONNX's checker "
                               f"({str(err).strip().splitlines()[0]})") from None
    try:
        data = model.SerializeToString()
    except ValueError as err:  # protobuf's 2 GiB ceiling
        raise CaffeCompatError(f"{path}: the model is too large for one ONNX file ({err})") from None
    write_bytes(path, data)
    return model


# ---------------------------------------------------------------- from files

def parse_shape(text: str) -> Tuple[int, ...]:
    """'N,C,H,W' (or 'BLOB=N,C,H,W', as convert takes it) -> (N, C, H, W), all positive."""
    try:
        shape = tuple(int(part) for part in text.rpartition("=")[2].replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise CaffeCompatError(f"--input-shape {text!r}: expected positive integers like 1,3,227,227")
    return shape


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_for_export(source: PathLike, weights: Optional[PathLike] = None,
                    input_shape: Optional[Sequence[int]] = None, dialect: Optional[str] = None,
                    preprocess: Optional[PreprocessOverrides] = None, allow_missing_weights: bool = False,
                    max_memory=None) -> Tuple[CaffeNet, Dict[str, str]]:
    """The TEST-phase net of NET.prototxt + WEIGHTS.caffemodel (or of a MODEL written by
    `convert`/`train` when `weights` is None), made a deploy net where it has data
    layers, and the metadata of its source: preprocessing (the net's, a MODEL's
    recorded one, then `preprocess`'s overrides) and the prototxt's sha256 (of the
    file's bytes; for a MODEL, of the prototxt text it holds).

    `input_shape` shapes the image input: the data layers' first tops, or else the
    net's first Input blob."""
    source = Path(source)
    recorded = None
    if weights is None:
        if source.suffix == ".prototxt":
            raise CaffeCompatError(f"{source}: give the weights (NET.prototxt WEIGHTS.caffemodel), "
                                   f"or a MODEL written by 'caffe-compat convert'")
        payload = read_model(source)
        net_file = model_net_file(payload, source)
        blobs = model_weights(payload)
        digest = _sha256(payload["net_prototxt"].encode("utf-8"))
        recorded = payload["preprocess"]
    else:
        net_file, weights_file = read_with_weights(read_prototxt(source, dialect), weights, dialect)
        blobs = weights_of(weights_file)
        digest = _sha256(source.read_bytes())
    has_data_layers = bool(data_layers_of(net_file.net))
    net_param = deploy_net(net_file.net, input_shape) if has_data_layers else net_file.net
    graph = build_graph(net_param, "TEST", net_file.dialect, source=str(source))
    input_shapes = None
    if input_shape is not None and not has_data_layers:
        if not graph.inputs:
            raise CaffeCompatError(f"{source}: the net has neither Input nor data layers")
        input_shapes = {next(iter(graph.inputs)): tuple(input_shape)}
    net = CaffeNet(graph, blobs, input_shapes, weights_source=str(weights or source),
                   allow_missing_weights=allow_missing_weights, max_memory=max_memory)
    if recorded is not None:
        props = with_overrides(recorded, preprocess, net_file.net.name)
    else:
        props = preprocess_metadata(net_file.net, source.resolve().parent, preprocess,
                                    {name: net.blob_shapes[name] for name in net.input_names})
    return net, {**props, "source.prototxt_sha256": digest}


def _dim(dim) -> str:
    return dim.dim_param or str(dim.dim_value)


@dataclass
class ExportSummary:
    path: Path
    model: onnx.ModelProto

    def describe(self) -> str:
        def shapes(values) -> str:
            return ", ".join(f"{v.name}[{','.join(_dim(d) for d in v.type.tensor_type.shape.dim)}]" for v in values)

        graph = self.model.graph
        size = os.path.getsize(self.path)
        return (f"wrote {self.path}: opset {self.model.opset_import[0].version}, {len(graph.node)} nodes, "
                f"{size / 2**20:.1f} MiB; inputs {shapes(graph.input)}; outputs {shapes(graph.output)}")


def export_files(source: PathLike, weights: Optional[PathLike], out: PathLike,
                 input_shape: Optional[Sequence[int]] = None, dialect: Optional[str] = None,
                 preprocess: Optional[PreprocessOverrides] = None, allow_missing_weights: bool = False,
                 max_memory=None, **options) -> ExportSummary:
    """`caffe-compat export-onnx`: load (see `load_for_export`), export, write."""
    net, metadata = load_for_export(source, weights, input_shape, dialect, preprocess, allow_missing_weights,
                                    max_memory)
    metadata.update(options.pop("metadata", None) or {})
    embed = options.pop("embed_preprocessing", None)
    layout = options.pop("image_layout", "nhwc")
    if embed is not None:
        options["front"] = image_front(metadata, embed, layout, Path(source).resolve().parent)
    try:
        model = write_onnx(net, out, metadata=metadata, **options)
    except CaffeCompatError as err:
        raise CaffeCompatError(f"{source}: {err}") from None
    return ExportSummary(Path(out), model)
