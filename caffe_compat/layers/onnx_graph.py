"""The graph under construction that ONNX emitters append to.

An emitter is registered with `@register_onnx(type)` and called as
`emit(graph, ctx, module, inputs, outputs)`: `ctx` is the layer's LayerContext,
`module` the built PyTorch module (its tensors are the weights to export), `inputs`
the ONNX names of the bottoms, `outputs` the names its last nodes must write. The
batch axis stays symbolic, so emitters use `ctx.bottom_shapes` only for other axes. An emitter may describe its outputs in
`graph.metadata`, which the model's metadata_props receive.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

# TensorProto.DataType values (fixed by the ONNX spec), for Cast's `to`: the layer
# families name them without importing onnx, which building a net for training never needs.
FLOAT, INT64 = 1, 7


class OnnxGraph:
    def __init__(self, opset: int):
        from onnx import helper, numpy_helper

        self._helper, self._numpy_helper = helper, numpy_helper
        self.opset = opset
        self.nodes: List = []
        self.initializers: List = []  # TensorProto
        self._used: Dict[str, int] = {}
        self.metadata: Dict[str, str] = {}

    def fresh(self, hint: str) -> str:
        """A tensor name not used before, derived from `hint`."""
        count = self._used.get(hint, 0)
        self._used[hint] = count + 1
        return hint if count == 0 else f"{hint}__{count}"

    def reserve(self, name: str) -> None:
        self._used.setdefault(name, 1)

    def initializer(self, value: Union[np.ndarray, torch.Tensor], hint: str) -> str:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        name = self.fresh(hint)
        # np.ascontiguousarray would turn a 0-d value into shape (1,).
        self.initializers.append(self.tensor(value, name))
        return name

    def tensor(self, value, name: str = ""):
        """A TensorProto of `value` (for initializers and Constant / ConstantOfShape attributes)."""
        return self._numpy_helper.from_array(np.array(value, order="C"), name)

    def ints(self, values: Sequence[int], hint: str) -> str:
        return self.initializer(np.asarray(values, dtype=np.int64), hint)

    def floats(self, values, hint: str) -> str:
        return self.initializer(np.asarray(values, dtype=np.float32), hint)

    def node(self, op_type: str, inputs: Sequence[str], outputs: Optional[Sequence[str]] = None,
             hint: Optional[str] = None, **attributes) -> List[str]:
        """Append a node; `outputs` defaults to one fresh name. Returns the output names."""
        if outputs is None:
            outputs = [self.fresh(hint or op_type.lower())]
        self.nodes.append(self._helper.make_node(op_type, list(inputs), list(outputs),
                                           name=self.fresh(f"{op_type}:{outputs[0]}"), **attributes))
        return list(outputs)
