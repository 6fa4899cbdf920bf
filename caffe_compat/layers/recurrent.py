"""Caffe's recurrent layers: RNN and LSTM (over T timesteps of N streams, bottoms x
(T, N, ...) and cont (T, N), then an optional static input x_static (N, ...), then with
expose_hidden the initial states), and LSTMUnit (one LSTM step).

As in Caffe's unrolled nets (recurrent_layer.cpp, rnn_layer.cpp, lstm_layer.cpp):
- h_{t-1} is multiplied by cont_t before it enters step t, so cont_t = 0 starts a new
  sequence; the LSTM's cell c_{t-1} is cut by the forget gate, f_t = cont_t sigmoid(.);
- the LSTM's gate pre-activations are W_xc x_t + b_c + W_hc h + W_xc_static x_static,
  4 H wide in the order input, forget, output, candidate (i, f, o, g);
- blobs: LSTM W_xc, b_c, [W_xc_static], W_hc; RNN W_xh, b_h, [W_xh_static], W_hh, W_ho, b_o;
- without expose_hidden the initial states are the final states of the previous
  forward pass (zeros at first); with it they are bottoms and the final states extra
  tops (h_T, then c_T), through which, as in Caffe, no gradient flows (Caffe shares
  only their data);
- cont gets no gradient.
"""
from __future__ import annotations

import inspect
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import fillers
from .loss import _with_gradient
from .onnx_graph import FLOAT, OnnxGraph
from .registry import CaffeLayer, Converted, LayerContext, register, register_onnx, register_source


def lstm_unit(c_prev: torch.Tensor, gates: torch.Tensor, cont: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One LSTMUnit step: (c_t, h_t) from c_{t-1} (..., H), the gate pre-activations
    (..., 4H) and cont (...). Caffe differentiates the forget gate f = cont sigmoid(x_f)
    as f (1 - f), which is exact for binary cont; so does this."""
    hidden = c_prev.shape[-1]
    i = torch.sigmoid(gates[..., :hidden])
    forget_x = gates[..., hidden:2 * hidden]
    o = torch.sigmoid(gates[..., 2 * hidden:3 * hidden])
    g = torch.tanh(gates[..., 3 * hidden:])
    f_value = cont.detach().unsqueeze(-1) * torch.sigmoid(forget_x.detach())
    f = _with_gradient(f_value, (f_value * (1 - f_value)) * forget_x)
    c = f * c_prev + i * g
    return c, o * torch.tanh(c)


class _Recurrent(CaffeLayer):
    """What RNN and LSTM share: the state carried between forward passes and the bottom
    and top layout; `unroll` is each one's loop over the timesteps."""

    states = 1  # recurrent state blobs (h; LSTM: h, c)

    def __init__(self, hidden: int, static: bool, expose_hidden: bool):
        super().__init__()
        self.hidden = hidden
        self.static = static
        self.expose_hidden = expose_hidden
        self.carried: Optional[List[torch.Tensor]] = None

    def _initial(self, x: torch.Tensor, given) -> List[torch.Tensor]:
        shape = (1, x.shape[1], self.hidden)
        if self.expose_hidden:
            return [state.detach().reshape(shape) for state in given]
        carried = self.carried
        if carried is None or tuple(carried[0].shape) != shape or carried[0].device != x.device:
            return [x.new_zeros(shape) for _ in range(self.states)]
        return [state.to(x.dtype) for state in carried]

    def forward(self, x, cont, *rest):
        static = rest[0] if self.static else None
        initial = self._initial(x, rest[1:] if self.static else rest)
        top, final = self.unroll(x, cont.detach(), static, initial)
        self.carried = [state.detach() for state in final]
        if not self.expose_hidden:
            return top
        return (top, *self.carried)

    def unroll(self, x, cont, static, initial):
        raise NotImplementedError


class LSTM(_Recurrent):
    states = 2

    def __init__(self, hidden: int, static: bool, expose_hidden: bool, w_xc, b_c, w_xc_static, w_hc):
        super().__init__(hidden, static, expose_hidden)
        self.w_xc = nn.Parameter(w_xc)
        self.b_c = nn.Parameter(b_c)
        self.w_hc = nn.Parameter(w_hc)
        if static:
            self.w_xc_static = nn.Parameter(w_xc_static)
            self.blob_names = ("w_xc", "b_c", "w_xc_static", "w_hc")
        else:
            self.blob_names = ("w_xc", "b_c", "w_hc")

    def unroll(self, x, cont, static, initial):
        x_gates = F.linear(x.flatten(2), self.w_xc, self.b_c)
        static_gates = None if static is None else F.linear(static.flatten(1), self.w_xc_static).unsqueeze(0)
        h, c = initial
        tops = []
        for t in range(x.shape[0]):
            cont_t = cont[t:t + 1]
            gates = F.linear(h * cont_t.unsqueeze(-1), self.w_hc) + x_gates[t:t + 1]
            if static_gates is not None:
                gates = gates + static_gates
            c, h = lstm_unit(c, gates, cont_t)
            tops.append(h)
        return torch.cat(tops, 0), (h, c)


class RNN(_Recurrent):
    def __init__(self, hidden: int, static: bool, expose_hidden: bool, w_xh, b_h, w_xh_static, w_hh, w_ho, b_o):
        super().__init__(hidden, static, expose_hidden)
        self.w_xh = nn.Parameter(w_xh)
        self.b_h = nn.Parameter(b_h)
        self.w_hh = nn.Parameter(w_hh)
        self.w_ho = nn.Parameter(w_ho)
        self.b_o = nn.Parameter(b_o)
        if static:
            self.w_xh_static = nn.Parameter(w_xh_static)
            self.blob_names = ("w_xh", "b_h", "w_xh_static", "w_hh", "w_ho", "b_o")
        else:
            self.blob_names = ("w_xh", "b_h", "w_hh", "w_ho", "b_o")

    def unroll(self, x, cont, static, initial):
        x_in = F.linear(x.flatten(2), self.w_xh, self.b_h)
        static_in = None if static is None else F.linear(static.flatten(1), self.w_xh_static).unsqueeze(0)
        (h,) = initial
        tops = []
        for t in range(x.shape[0]):
            pre = F.linear(h * cont[t:t + 1].unsqueeze(-1), self.w_hh) + x_in[t:t + 1]
            if static_in is not None:
                pre = pre + static_in
            h = torch.tanh(pre)
            tops.append(torch.tanh(F.linear(h, self.w_ho, self.b_o)))
        return torch.cat(tops, 0), (h,)


def _check_recurrent(ctx: LayerContext, states: int) -> Tuple[int, int, Optional[int]]:
    """(hidden, input dim, static input dim or None), the bottoms and tops checked."""
    param = ctx.param.recurrent_param
    hidden = param.num_output
    if hidden <= 0:
        raise ctx.error("recurrent_param.num_output must be positive")
    exposed = states if param.expose_hidden else 0
    if len(ctx.bottoms) not in (2 + exposed, 3 + exposed):
        raise ctx.error(f"expects bottoms x, cont, [x_static]{', and the initial states' if exposed else ''}: "
                        f"{2 + exposed} or {3 + exposed}, got {len(ctx.bottoms)}")
    if len(ctx.tops) != 1 + exposed:
        raise ctx.error(f"expects {1 + exposed} top(s), got {len(ctx.tops)}")
    x, cont = (tuple(s) for s in ctx.bottom_shapes[:2])
    if len(x) < 3:  # Caffe's input transform is an InnerProduct from axis 2
        raise ctx.error(f"bottom '{ctx.bottoms[0]}' must have at least 3 axes (timesteps, streams, input...), "
                        f"got {x}")
    if cont != x[:2]:
        raise ctx.error(f"bottom '{ctx.bottoms[1]}' (cont) must have shape {x[:2]} (timesteps, streams), got {cont}")
    static = len(ctx.bottoms) == 3 + exposed
    static_dim = None
    if static:
        shape = tuple(ctx.bottom_shapes[2])
        if not shape or shape[0] != x[1]:
            raise ctx.error(f"static input '{ctx.bottoms[2]}' must have {x[1]} streams first, got {shape}")
        static_dim = math.prod(shape[1:])
    for name, shape in zip(ctx.bottoms[2 + static:], ctx.bottom_shapes[2 + static:]):
        if tuple(shape) != (1, x[1], hidden):
            raise ctx.error(f"initial state '{name}' must have shape {(1, x[1], hidden)}, got {tuple(shape)}")
    return hidden, math.prod(x[2:]), static_dim


def _tops(ctx: LayerContext, hidden: int, states: int) -> List[Tuple[int, ...]]:
    x = ctx.bottom_shapes[0]
    exposed = states if ctx.param.recurrent_param.expose_hidden else 0
    return [(x[0], x[1], hidden)] + [(1, x[1], hidden)] * exposed


@register("LSTM")
def build_lstm(ctx: LayerContext) -> Converted:
    hidden, inputs, static = _check_recurrent(ctx, LSTM.states)
    param = ctx.param.recurrent_param

    def weight(*shape):
        return fillers.fill(param.weight_filler, shape, ctx.name)

    module = LSTM(hidden, static is not None, param.expose_hidden, weight(4 * hidden, inputs),
                  fillers.fill(param.bias_filler, (4 * hidden,), ctx.name),
                  None if static is None else weight(4 * hidden, static), weight(4 * hidden, hidden))
    return ctx.wire(module, top_shapes=_tops(ctx, hidden, LSTM.states))


@register("RNN")
def build_rnn(ctx: LayerContext) -> Converted:
    hidden, inputs, static = _check_recurrent(ctx, RNN.states)
    param = ctx.param.recurrent_param

    def weight(*shape):
        return fillers.fill(param.weight_filler, shape, ctx.name)

    bias = fillers.fill(param.bias_filler, (hidden,), ctx.name)
    module = RNN(hidden, static is not None, param.expose_hidden, weight(hidden, inputs), bias,
                 None if static is None else weight(hidden, static), weight(hidden, hidden),
                 weight(hidden, hidden), fillers.fill(param.bias_filler, (hidden,), ctx.name))
    return ctx.wire(module, top_shapes=_tops(ctx, hidden, RNN.states))


class LSTMUnit(CaffeLayer):
    """Bottoms c_{t-1} (1, N, H), gates (1, N, 4H), cont (1, N); tops c_t, h_t."""

    def forward(self, c_prev, gates, cont):
        return lstm_unit(c_prev, gates, cont.detach())


@register("LSTMUnit")
def build_lstm_unit(ctx: LayerContext) -> Converted:
    ctx.expect_bottoms(3)
    if len(ctx.tops) != 2:
        raise ctx.error(f"expects 2 tops (c, h), got {len(ctx.tops)}")
    c_prev, gates, cont = (tuple(s) for s in ctx.bottom_shapes)
    if len(c_prev) != 3 or c_prev[0] != 1:
        raise ctx.error(f"bottom '{ctx.bottoms[0]}' must have shape (1, N, H), got {c_prev}")
    if gates != (1, c_prev[1], 4 * c_prev[2]):
        raise ctx.error(f"bottom '{ctx.bottoms[1]}' must have shape {(1, c_prev[1], 4 * c_prev[2])}, got {gates}")
    if cont != (1, c_prev[1]):
        raise ctx.error(f"bottom '{ctx.bottoms[2]}' must have shape {(1, c_prev[1])}, got {cont}")
    return ctx.wire(LSTMUnit(), top_shapes=[c_prev, c_prev])


# ---------------------------------------------------------------- standalone source

LSTM_UNIT_SOURCE = """
def lstm_unit(c_prev, gates, cont):
    \"\"\"One step of Caffe's LSTM: (c_t, h_t) from c_{t-1} (..., H), the gate pre-activations (..., 4H)
    in the order input, forget, output, candidate, and cont (...), which cuts the forget gate
    f = cont sigmoid(x_f); Caffe differentiates f as f (1 - f).\"\"\"
    hidden = c_prev.shape[-1]
    i = torch.sigmoid(gates[..., :hidden])
    forget_x = gates[..., hidden:2 * hidden]
    o = torch.sigmoid(gates[..., 2 * hidden:3 * hidden])
    g = torch.tanh(gates[..., 3 * hidden:])
    f_value = cont.detach().unsqueeze(-1) * torch.sigmoid(forget_x.detach())
    surrogate = (f_value * (1 - f_value)) * forget_x
    f = f_value.detach() + (surrogate - surrogate.detach())  # f's value, Caffe's gradient
    c = f * c_prev + i * g
    return c, o * torch.tanh(c)
"""

RECURRENT_SOURCE = """
class Recurrent(nn.Module):
    \"\"\"Caffe's RNN and LSTM over x (T, N, ...) and cont (T, N), then x_static (N, ...) if `static`:
    h_{t-1} times cont_t enters step t. Without expose_hidden the initial states are the last
    forward's final states (zeros at first); with it they are inputs and the final states extra
    outputs, through which no gradient flows.\"\"\"

    states = 1

    def __init__(self, hidden, static, expose_hidden):
        super().__init__()
        self.hidden, self.static, self.expose_hidden = hidden, static, expose_hidden
        self.carried = None

    def forward(self, x, cont, *rest):
        static, given = (rest[0], rest[1:]) if self.static else (None, rest)
        shape = (1, x.shape[1], self.hidden)
        carried = self.carried
        if self.expose_hidden:
            initial = [state.detach().reshape(shape) for state in given]
        elif carried is None or tuple(carried[0].shape) != shape or carried[0].device != x.device:
            initial = [x.new_zeros(shape) for _ in range(self.states)]
        else:
            initial = [state.to(x.dtype) for state in carried]
        top, final = self.unroll(x, cont.detach(), static, initial)
        self.carried = [state.detach() for state in final]
        return (top, *self.carried) if self.expose_hidden else top
"""

LSTM_SOURCE = """
class LSTM(Recurrent):
    \"\"\"Caffe's LSTM: gates W_xc x_t + b_c + W_hc (cont_t h_{t-1}) (+ W_xc_static x_static), then lstm_unit.\"\"\"

    states = 2

    def __init__(self, hidden, inputs, static_inputs=None, expose_hidden=False):
        super().__init__(hidden, static_inputs is not None, expose_hidden)
        self.w_xc = nn.Parameter(torch.empty(4 * hidden, inputs))
        self.b_c = nn.Parameter(torch.empty(4 * hidden))
        if static_inputs is not None:
            self.w_xc_static = nn.Parameter(torch.empty(4 * hidden, static_inputs))
        self.w_hc = nn.Parameter(torch.empty(4 * hidden, hidden))

"""
LSTM_SOURCE += inspect.getsource(LSTM.unroll)  # the module's own loop, verbatim

RNN_SOURCE = """
class RNN(Recurrent):
    \"\"\"Caffe's RNN: h_t = tanh(W_xh x_t + b_h + W_hh (cont_t h_{t-1}) (+ W_xh_static x_static)),
    o_t = tanh(W_ho h_t + b_o).\"\"\"

    def __init__(self, hidden, inputs, static_inputs=None, expose_hidden=False):
        super().__init__(hidden, static_inputs is not None, expose_hidden)
        self.w_xh = nn.Parameter(torch.empty(hidden, inputs))
        self.b_h = nn.Parameter(torch.empty(hidden))
        if static_inputs is not None:
            self.w_xh_static = nn.Parameter(torch.empty(hidden, static_inputs))
        self.w_hh = nn.Parameter(torch.empty(hidden, hidden))
        self.w_ho = nn.Parameter(torch.empty(hidden, hidden))
        self.b_o = nn.Parameter(torch.empty(hidden))

"""
RNN_SOURCE += inspect.getsource(RNN.unroll)  # the module's own loop, verbatim


@register_source("LSTM", "RNN")
def recurrent_to_source(src, ctx, module, inputs, outputs):
    if isinstance(module, LSTM):
        src.helper(LSTM_UNIT_SOURCE)
    src.helper(RECURRENT_SOURCE)
    src.helper(LSTM_SOURCE if isinstance(module, LSTM) else RNN_SOURCE)
    weight = module.w_xc if isinstance(module, LSTM) else module.w_xh
    static = getattr(module, "w_xc_static", getattr(module, "w_xh_static", None))
    settings = [str(module.hidden), str(weight.shape[1])]
    if static is not None:
        settings.append(f"static_inputs={static.shape[1]}")
    settings += ["expose_hidden=True"] * module.expose_hidden
    layer = src.attribute(ctx, f"{ctx.type}({', '.join(settings)})",
                          {name: getattr(module, name) for name in module.blob_names})
    src.assign(outputs, f"{layer}({', '.join(inputs)})")


@register_source("LSTMUnit")
def lstm_unit_to_source(src, ctx, module, inputs, outputs):
    src.helper(LSTM_UNIT_SOURCE)
    src.assign(outputs, f"lstm_unit({', '.join(inputs)})")


# ---------------------------------------------------------------- ONNX
# A Scan over the timesteps carrying the states; ONNX's own LSTM and RNN have no cont
# (and another gate order). The model is stateless: without expose_hidden it starts
# from zero states, as Caffe's first forward pass does.

def _onnx_gate_slices(g: OnnxGraph, gates: str, hidden: int, axis: int, hint: str) -> List[str]:
    """The four H-wide blocks (i, f, o, g) of the gate pre-activations along `axis`."""
    blocks = []
    for k in range(4):
        bounds = [g.ints([k * hidden], f"{hint}/start{k}"), g.ints([(k + 1) * hidden], f"{hint}/end{k}"),
                  g.ints([axis], f"{hint}/axis{k}")]
        blocks += g.node("Slice", [gates, *bounds], hint=f"{hint}/gate{k}")
    return blocks


def _onnx_lstm_unit(g: OnnxGraph, c_prev: str, gates: str, cont: str, hidden: int, axis: int, hint: str,
                    outputs: Sequence[str]) -> None:
    """c_t, h_t into `outputs` from c_{t-1}, the gates (blocks along `axis`) and cont
    (one axis short of them)."""
    cont = g.node("Unsqueeze", [cont, g.ints([axis], hint + "/cont_axis")], hint=hint + "/cont")[0]
    i_x, f_x, o_x, g_x = _onnx_gate_slices(g, gates, hidden, axis, hint)
    i = g.node("Sigmoid", [i_x], hint=hint + "/i")[0]
    f = g.node("Mul", [g.node("Sigmoid", [f_x], hint=hint + "/f_raw")[0], cont], hint=hint + "/f")[0]
    o = g.node("Sigmoid", [o_x], hint=hint + "/o")[0]
    candidate = g.node("Tanh", [g_x], hint=hint + "/g")[0]
    kept = g.node("Mul", [f, c_prev], hint=hint + "/kept")[0]
    written = g.node("Mul", [i, candidate], hint=hint + "/written")[0]
    g.node("Add", [kept, written], [outputs[0]])
    g.node("Mul", [o, g.node("Tanh", [outputs[0]], hint=hint + "/tanh_c")[0]], [outputs[1]])


def _onnx_linear(g: OnnxGraph, x: str, weight: torch.Tensor, bias: Optional[torch.Tensor], hint: str) -> str:
    y = g.node("MatMul", [x, g.initializer(weight.detach().t().contiguous(), hint + "/weight_t")], hint=hint)[0]
    if bias is None:
        return y
    return g.node("Add", [y, g.initializer(bias.detach(), hint + "/bias")], hint=hint + "/biased")[0]


def _onnx_flat_input(g: OnnxGraph, x: str, rank: int, keep: int, size: int, hint: str) -> str:
    """`x` with its axes from `keep` on flattened (InnerProduct's view), leading ones kept."""
    if rank == keep + 1:
        return x
    return g.node("Reshape", [x, g.ints([0] * keep + [size], hint + "/shape")], hint=hint)[0]


def _onnx_initial_states(g: OnnxGraph, ctx, module: _Recurrent, inputs, hint: str) -> List[str]:
    if module.expose_hidden:
        given = inputs[2 + module.static:]
        return [g.node("Squeeze", [state, g.ints([0], f"{hint}/axis{k}")], hint=f"{hint}/state{k}")[0]
                for k, state in enumerate(given)]
    shape = g.node("Shape", [inputs[0]], hint=hint + "/x_shape")[0]
    streams = g.node("Slice", [shape, g.ints([1], hint + "/one"), g.ints([2], hint + "/two")],
                     hint=hint + "/streams")[0]
    size = g.node("Concat", [streams, g.ints([module.hidden], hint + "/hidden")], hint=hint + "/state_shape", axis=0)[0]
    zero = g.tensor(np.zeros(1, np.float32))
    return [g.node("ConstantOfShape", [size], hint=f"{hint}/zeros{k}", value=zero)[0] for k in range(module.states)]


def _onnx_scan(g: OnnxGraph, ctx, module: _Recurrent, inputs, outputs, body_build) -> None:
    """Scan over (per-step input, cont) with the module's states; `body_build(body, states,
    step_input, cont, new_states, scanned)` fills the body graph."""
    hint = ctx.name
    x_shape = ctx.bottom_shapes[0]
    flat = _onnx_flat_input(g, inputs[0], len(x_shape), 2, math.prod(x_shape[2:]), hint + "/x_flat")
    weights, bias = (module.w_xc, module.b_c) if isinstance(module, LSTM) else (module.w_xh, module.b_h)
    step_inputs = _onnx_linear(g, flat, weights, bias, hint + "/x_transform")
    static = None
    if module.static:
        static_shape = ctx.bottom_shapes[2]
        static_flat = _onnx_flat_input(g, inputs[2], len(static_shape), 1, math.prod(static_shape[1:]),
                                       hint + "/static_flat")
        static_weight = module.w_xc_static if isinstance(module, LSTM) else module.w_xh_static
        static = _onnx_linear(g, static_flat, static_weight, None, hint + "/static_transform")
    initial = _onnx_initial_states(g, ctx, module, inputs, hint)

    body = OnnxGraph(g.opset)
    body._used = g._used  # one namespace: the body reads outer names (weights, static)
    states = [body.fresh(f"{hint}/step_state{k}") for k in range(module.states)]
    step_input, cont = body.fresh(hint + "/step_input"), body.fresh(hint + "/step_cont")
    new_states = [body.fresh(f"{hint}/step_new_state{k}") for k in range(module.states)]
    scanned = body.fresh(hint + "/step_top")
    body_build(body, states, step_input, cont, static, new_states, scanned)
    from onnx import helper  # the emitters run only when exporting

    # The body's values typed with their shapes: without them ONNX's shape inference
    # cannot give the Scan's outputs a shape, and the checker refuses a graph output
    # without one.
    streams, state = x_shape[1], [x_shape[1], module.hidden]
    float_info = [helper.make_tensor_value_info(name, FLOAT, state) for name in states]
    float_info += [helper.make_tensor_value_info(step_input, FLOAT, [streams, weights.shape[0]]),
                   helper.make_tensor_value_info(cont, FLOAT, [streams])]
    out_info = [helper.make_tensor_value_info(name, FLOAT, state) for name in new_states + [scanned]]
    g.initializers.extend(body.initializers)
    graph = helper.make_graph(body.nodes, hint + "/step", float_info, out_info)
    finals = [g.fresh(f"{hint}/final_state{k}") for k in range(module.states)]
    g.node("Scan", initial + [step_inputs, inputs[1]], finals + [outputs[0]], body=graph, num_scan_inputs=2)
    for k, (final, top) in enumerate(zip(finals, outputs[1:])):
        g.node("Unsqueeze", [final, g.ints([0], f"{hint}/final_axis{k}")], [top])


@register_onnx("LSTM")
def lstm_to_onnx(g: OnnxGraph, ctx, module: LSTM, inputs, outputs):
    def step(body, states, x_gates, cont, static, new_states, scanned):
        h, c = states
        cont_column = body.node("Unsqueeze", [cont, body.ints([1], ctx.name + "/cont_column_axis")],
                                hint=ctx.name + "/cont_column")[0]
        carried = body.node("Mul", [h, cont_column], hint=ctx.name + "/h_conted")[0]
        gates = body.node("Add", [_onnx_linear(body, carried, module.w_hc, None, ctx.name + "/transform"), x_gates],
                          hint=ctx.name + "/gate_input")[0]
        if static is not None:
            gates = body.node("Add", [gates, static], hint=ctx.name + "/gate_input_static")[0]
        h_new, c_new = new_states
        _onnx_lstm_unit(body, c, gates, cont, module.hidden, 1, ctx.name + "/unit", [c_new, h_new])
        body.node("Identity", [h_new], [scanned])

    _onnx_scan(g, ctx, module, inputs, outputs, step)


@register_onnx("RNN")
def rnn_to_onnx(g: OnnxGraph, ctx, module: RNN, inputs, outputs):
    def step(body, states, x_in, cont, static, new_states, scanned):
        (h,) = states
        cont_column = body.node("Unsqueeze", [cont, body.ints([1], ctx.name + "/cont_column_axis")],
                                hint=ctx.name + "/cont_column")[0]
        carried = body.node("Mul", [h, cont_column], hint=ctx.name + "/h_conted")[0]
        pre = body.node("Add", [_onnx_linear(body, carried, module.w_hh, None, ctx.name + "/w_hh"), x_in],
                        hint=ctx.name + "/h_input")[0]
        if static is not None:
            pre = body.node("Add", [pre, static], hint=ctx.name + "/h_input_static")[0]
        body.node("Tanh", [pre], [new_states[0]])
        output = _onnx_linear(body, new_states[0], module.w_ho, module.b_o, ctx.name + "/w_ho")
        body.node("Tanh", [output], [scanned])

    _onnx_scan(g, ctx, module, inputs, outputs, step)


@register_onnx("LSTMUnit")
def lstm_unit_to_onnx(g: OnnxGraph, ctx, module: LSTMUnit, inputs, outputs):
    hidden = ctx.bottom_shapes[0][2]
    _onnx_lstm_unit(g, inputs[0], inputs[1], inputs[2], hidden, 2, ctx.name, outputs)
