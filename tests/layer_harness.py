"""What the layer tests share: one Caffe layer built alone from its prototxt text, and
that layer's ONNX emitter exported alone into a checked model that onnxruntime runs."""
import numpy as np
import onnx
import torch
from google.protobuf import text_format
from onnx import TensorProto, helper

from caffe_compat.io.schema import messages
from caffe_compat.layers.onnx_graph import OnnxGraph
from caffe_compat.layers.registry import REGISTRY, LayerContext
from caffe_compat.net import infer_top_shapes


def rel_err(ours, ref):
    """max|ours - ref| / max|ref|, the reference README's relative error."""
    ref = np.asarray(ref, np.float64)
    return np.abs(np.asarray(ours, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30)


def build(layer_type, params="", shapes=((2, 3, 4, 5),), tops=1, top_names=None, phase="TEST", dialect="bvlc"):
    """Build the layer "layer" of `layer_type` with `params` (LayerParameter text in
    `dialect`'s schema), reading bottoms b0, b1, ... of `shapes` and writing `top_names`
    (by default `tops` tops t0, t1, ...), its module in `phase`'s train/eval mode as a
    net sets it.
    Returns (ctx, converted)."""
    bottoms = [f"b{i}" for i in range(len(shapes))]
    top_names = [f"t{i}" for i in range(tops)] if top_names is None else list(top_names)
    param = text_format.Parse(f'name: "layer" type: "{layer_type}" {params}', messages(dialect).LayerParameter())
    param.bottom.extend(bottoms)
    param.top.extend(top_names)
    ctx = LayerContext("layer", layer_type, param, bottoms, top_names, [tuple(s) for s in shapes], phase)
    converted = REGISTRY[layer_type].build(ctx)
    converted.module.train(phase == "TRAIN")
    return ctx, converted


def tops_of(module, *tensors):
    """The module's tops as a tuple, however many it has."""
    out = module(*tensors)
    return out if isinstance(out, tuple) else (out,)


class CallWithList(torch.nn.Module):
    """Calls `layer` with the bottoms of one list: fx cannot trace a *bottoms signature on
    its own (a net's trace calls the layer with its bottoms, as here)."""

    def __init__(self, layer, count):
        super().__init__()
        self.layer = layer
        self.count = count

    def forward(self, bottoms):
        return self.layer(*[bottoms[i] for i in range(self.count)])


def onnx_model(layer_type, ctx, converted, opset, input_dims=None, output_dims=None):
    """The layer's registered emitter alone in a model that passes ONNX's full check.
    `input_dims` and `output_dims` declare each bottom's and top's axes (sizes or
    symbolic names). By default every bottom's batch axis is the symbolic "N" and a top
    declares only its rank, since some top sizes depend on the batch."""
    g = OnnxGraph(opset)
    for name in ctx.bottoms + ctx.tops:
        g.reserve(name)
    REGISTRY[layer_type].to_onnx(g, ctx, converted.module, list(ctx.bottoms), list(ctx.tops))
    if input_dims is None:
        input_dims = [["N", *shape[1:]] for shape in ctx.bottom_shapes]
    if output_dims is None:
        top_shapes = converted.top_shapes
        if top_shapes is None:  # the builder leaves them to the net's own inference
            top_shapes = infer_top_shapes(converted.module, ctx.bottom_shapes)
        output_dims = [[f"{top}_{i}" for i in range(len(shape))] for top, shape in zip(ctx.tops, top_shapes)]
    graph = helper.make_graph(
        g.nodes, "layer",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in zip(ctx.bottoms, input_dims)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in zip(ctx.tops, output_dims)],
        g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def run_onnx(model, arrays):
    """The model's outputs from onnxruntime on the CPU, `arrays` feeding its inputs in order."""
    import onnxruntime as ort  # only the ONNX tests pay for loading it

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {graph_input.name: array for graph_input, array in zip(model.graph.input, arrays)})


def onnx_and_module_tops(model, module, arrays):
    """Each top as onnxruntime and as the module compute it from the float32 `arrays`:
    (onnx, module) pairs of numpy arrays, checked to have the same shape."""
    with torch.no_grad():
        ours = tops_of(module, *[torch.tensor(a) for a in arrays])
    pairs = [(theirs, top.detach().numpy()) for theirs, top in zip(run_onnx(model, arrays), ours)]
    for theirs, top in pairs:
        assert theirs.shape == top.shape
    return pairs
