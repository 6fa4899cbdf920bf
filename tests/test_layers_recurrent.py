"""RNN, LSTM and LSTMUnit against loops written here from Caffe's unrolled nets
(rnn_layer.cpp, lstm_layer.cpp) and LSTMUnitLayer's own forward and backward: gate order
i, f, o, g; cont_t multiplying h_{t-1} and the forget gate; state carried between
forward passes; exposed states that pass no gradient; blob order; the ONNX Scan."""
import numpy as np
import pytest
import torch

from caffe_compat.errors import CaffeCompatError
from layer_harness import build, onnx_and_module_tops, onnx_model, rel_err, tops_of

RNG = np.random.default_rng(7)
FILLERS = 'weight_filler { type: "uniform" min: -0.5 max: 0.5 } bias_filler { type: "uniform" min: -0.5 max: 0.5 }'


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def lstm_reference(x, cont, w_xc, b_c, w_hc, h, c, static=None, w_static=None):
    """LSTMLayer's unrolled net, step by step; returns (h for every step, h_T, c_T)."""
    steps, streams = x.shape[:2]
    hidden = w_hc.shape[1]
    x_gates = x.reshape(steps, streams, -1) @ w_xc.T + b_c
    tops = []
    for t in range(steps):
        gates = (h * cont[t][:, None]) @ w_hc.T + x_gates[t]
        if static is not None:
            gates = gates + static.reshape(streams, -1) @ w_static.T
        i = sigmoid(gates[:, :hidden])
        f = np.where(cont[t][:, None] == 0, 0, cont[t][:, None] * sigmoid(gates[:, hidden:2 * hidden]))
        o = sigmoid(gates[:, 2 * hidden:3 * hidden])
        g = np.tanh(gates[:, 3 * hidden:])
        c = f * c + i * g
        h = o * np.tanh(c)
        tops.append(h)
    return np.stack(tops), h, c


def rnn_reference(x, cont, w_xh, b_h, w_hh, w_ho, b_o, h, static=None, w_static=None):
    steps, streams = x.shape[:2]
    x_in = x.reshape(steps, streams, -1) @ w_xh.T + b_h
    tops = []
    for t in range(steps):
        pre = (h * cont[t][:, None]) @ w_hh.T + x_in[t]
        if static is not None:
            pre = pre + static.reshape(streams, -1) @ w_static.T
        h = np.tanh(pre)
        tops.append(np.tanh(h @ w_ho.T + b_o))
    return np.stack(tops), h


def blobs(module):
    return [b.detach().double().numpy() for b in module.caffe_blobs()]


def cont_of(steps, streams):
    cont = np.ones((steps, streams))
    cont[0] = 0
    cont[2, 0] = 0  # stream 0 starts a new sequence at step 2
    return cont


@pytest.mark.parametrize("static", [False, True])
def test_lstm_matches_the_unrolled_net(static):
    shapes = [(5, 3, 2, 2), (5, 3)] + ([(3, 4)] if static else [])
    _, converted = build("LSTM", f"recurrent_param {{ num_output: 6 {FILLERS} }}", shapes)
    module = converted.module
    x = RNG.standard_normal(shapes[0])
    cont = cont_of(5, 3)
    x_static = RNG.standard_normal((3, 4)) if static else None
    inputs = [torch.tensor(x, dtype=torch.float32), torch.tensor(cont, dtype=torch.float32)]
    if static:
        inputs.append(torch.tensor(x_static, dtype=torch.float32))
    (top,) = tops_of(module, *inputs)
    params = blobs(module)
    assert [p.shape for p in params] == [(24, 4), (24,)] + ([(24, 4)] if static else []) + [(24, 6)]
    w_xc, b_c, *rest = params
    w_static, w_hc = rest if static else (None, rest[0])
    zeros = np.zeros((3, 6))
    ref, _, _ = lstm_reference(x, cont, w_xc, b_c, w_hc, zeros, zeros, x_static, w_static)
    assert rel_err(top.detach().numpy(), ref) < 1e-5


def test_lstm_carries_its_state_into_the_next_forward_pass():
    shapes = [(3, 2, 4), (3, 2)]
    _, converted = build("LSTM", f"recurrent_param {{ num_output: 5 {FILLERS} }}", shapes)
    module = converted.module
    x1, x2 = RNG.standard_normal(shapes[0]), RNG.standard_normal(shapes[0])
    cont = np.ones((3, 2))  # the second pass continues the first's sequences
    w_xc, b_c, w_hc = blobs(module)
    zeros = np.zeros((2, 5))
    _, h, c = lstm_reference(x1, cont, w_xc, b_c, w_hc, zeros, zeros)
    ref, _, _ = lstm_reference(x2, cont, w_xc, b_c, w_hc, h, c)
    tops_of(module, torch.tensor(x1, dtype=torch.float32), torch.tensor(cont, dtype=torch.float32))
    (top,) = tops_of(module, torch.tensor(x2, dtype=torch.float32), torch.tensor(cont, dtype=torch.float32))
    assert rel_err(top.detach().numpy(), ref) < 1e-5


def test_lstm_exposed_states_are_bottoms_and_tops_without_gradient():
    shapes = [(4, 2, 3), (4, 2), (1, 2, 5), (1, 2, 5)]
    _, converted = build("LSTM", f"recurrent_param {{ num_output: 5 expose_hidden: true {FILLERS} }}", shapes,
                         tops=3)
    module = converted.module.double()
    x = torch.tensor(RNG.standard_normal(shapes[0]), requires_grad=True)
    cont = torch.tensor(cont_of(4, 2))
    cont[0] = 1  # the given states matter from the first step
    h0 = torch.tensor(RNG.standard_normal(shapes[2]), requires_grad=True)
    c0 = torch.tensor(RNG.standard_normal(shapes[3]), requires_grad=True)
    top, h_last, c_last = module(x, cont, h0, c0)
    w_xc, b_c, w_hc = blobs(module)
    ref, h_ref, c_ref = lstm_reference(x.detach().numpy(), cont.numpy(), w_xc, b_c, w_hc, h0.detach().numpy()[0],
                                       c0.detach().numpy()[0])
    assert rel_err(top.detach().numpy(), ref) < 1e-10
    assert rel_err(h_last.numpy()[0], h_ref) < 1e-10 and rel_err(c_last.numpy()[0], c_ref) < 1e-10
    # Caffe shares only the data of these with its unrolled net: no gradient goes
    # through them, and h0/c0 get none.
    assert not h_last.requires_grad and not c_last.requires_grad
    top.sum().backward()
    assert h0.grad is None and c0.grad is None
    assert x.grad is not None and np.abs(x.grad.numpy()).max() > 0


def test_lstm_gradients_are_exact_for_binary_cont():
    shapes = [(4, 2, 3), (4, 2), (2, 3)]
    _, converted = build("LSTM", f"recurrent_param {{ num_output: 3 {FILLERS} }}", shapes)
    module = converted.module.double()
    cont = torch.tensor(cont_of(4, 2))

    def run(x, x_static, *params):
        module.carried = None
        return torch.func.functional_call(module, dict(zip(module.blob_names, params)), (x, cont, x_static))

    x = torch.tensor(RNG.standard_normal(shapes[0]), requires_grad=True)
    x_static = torch.tensor(RNG.standard_normal(shapes[2]), requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in module.caffe_blobs()]
    assert torch.autograd.gradcheck(run, (x, x_static, *params))


@pytest.mark.parametrize("static", [False, True])
def test_rnn_matches_the_unrolled_net(static):
    shapes = [(4, 3, 5), (4, 3)] + ([(3, 2, 2)] if static else [])
    _, converted = build("RNN", f"recurrent_param {{ num_output: 4 {FILLERS} }}", shapes)
    module = converted.module
    x = RNG.standard_normal(shapes[0])
    cont = cont_of(4, 3)
    x_static = RNG.standard_normal(shapes[2]) if static else None
    inputs = [torch.tensor(x, dtype=torch.float32), torch.tensor(cont, dtype=torch.float32)]
    if static:
        inputs.append(torch.tensor(x_static, dtype=torch.float32))
    (top,) = tops_of(module, *inputs)
    params = blobs(module)
    assert [p.shape for p in params] == [(4, 5), (4,)] + ([(4, 4)] if static else []) + [(4, 4), (4, 4), (4,)]
    if static:
        w_xh, b_h, w_static, w_hh, w_ho, b_o = params
    else:
        (w_xh, b_h, w_hh, w_ho, b_o), w_static = params, None
    ref, _ = rnn_reference(x, cont, w_xh, b_h, w_hh, w_ho, b_o, np.zeros((3, 4)), x_static, w_static)
    assert rel_err(top.detach().numpy(), ref) < 1e-5


def test_rnn_gradients():
    shapes = [(3, 2, 3), (3, 2)]
    _, converted = build("RNN", f"recurrent_param {{ num_output: 3 {FILLERS} }}", shapes)
    module = converted.module.double()
    cont = torch.tensor(cont_of(3, 2))

    def run(x):
        module.carried = None
        return module(x, cont)

    assert torch.autograd.gradcheck(run, (torch.tensor(RNG.standard_normal(shapes[0]), requires_grad=True),))


def lstm_unit_backward(c_prev, x, cont, c_diff, h_diff):
    """LSTMUnitLayer::Backward_cpu, transcribed: (c_prev diff, gate diff)."""
    hidden = c_prev.shape[-1]
    i = sigmoid(x[..., :hidden])
    f = np.where(cont[..., None] == 0, 0, cont[..., None] * sigmoid(x[..., hidden:2 * hidden]))
    o = sigmoid(x[..., 2 * hidden:3 * hidden])
    g = np.tanh(x[..., 3 * hidden:])
    c = f * c_prev + i * g
    tanh_c = np.tanh(c)
    c_term = c_diff + h_diff * o * (1 - tanh_c * tanh_c)
    gate_diff = np.concatenate([c_term * g * i * (1 - i), c_term * c_prev * f * (1 - f),
                                h_diff * tanh_c * o * (1 - o), c_term * i * (1 - g * g)], axis=-1)
    return c_term * f, gate_diff


def test_lstm_unit_forward_and_caffes_backward_even_for_fractional_cont():
    _, converted = build("LSTMUnit", "", [(1, 4, 3), (1, 4, 12), (1, 4)], tops=2)
    c_prev = torch.tensor(RNG.standard_normal((1, 4, 3)), requires_grad=True)
    gates = torch.tensor(RNG.standard_normal((1, 4, 12)), requires_grad=True)
    cont = torch.tensor([[0.0, 1.0, 0.5, 2.0]], requires_grad=True)
    c, h = converted.module(c_prev, gates, cont)
    c_diff, h_diff = RNG.standard_normal((1, 4, 3)), RNG.standard_normal((1, 4, 3))
    torch.autograd.backward([c, h], [torch.tensor(c_diff), torch.tensor(h_diff)])
    # one step of the LSTM loop: no input transform (the gates are given), h_{t-1} unused
    _, h_ref, c_ref = lstm_reference(np.zeros((1, 4, 1)), cont.detach().numpy(), np.zeros((12, 1)),
                                     gates.detach().numpy()[0], np.zeros((12, 3)), np.zeros((4, 3)),
                                     c_prev.detach().numpy()[0])
    assert rel_err(c.detach().numpy()[0], c_ref) < 1e-12 and rel_err(h.detach().numpy()[0], h_ref) < 1e-12
    c_prev_ref, gates_ref = lstm_unit_backward(c_prev.detach().numpy(), gates.detach().numpy(),
                                               cont.detach().numpy(), c_diff, h_diff)
    assert rel_err(c_prev.grad.numpy(), c_prev_ref) < 1e-12
    assert rel_err(gates.grad.numpy(), gates_ref) < 1e-12
    assert cont.grad is None


@pytest.mark.parametrize("layer_type, params, shapes, message", [
    ("LSTM", "recurrent_param { num_output: 0 }", [(3, 2, 4), (3, 2)], "num_output must be positive"),
    ("LSTM", "recurrent_param { num_output: 2 }", [(3, 2, 4), (3, 1)], "cont"),
    ("RNN", "recurrent_param { num_output: 2 }", [(3, 2), (3, 2)], "at least 3 axes"),
    ("RNN", "recurrent_param { num_output: 2 }", [(3, 2, 4), (3, 2), (3, 5)], "static input"),
    ("LSTM", "recurrent_param { num_output: 2 expose_hidden: true }", [(3, 2, 4), (3, 2), (1, 2, 2), (1, 2, 3)],
     "initial state"),
    ("LSTMUnit", "", [(1, 2, 3), (1, 2, 11), (1, 2)], "must have shape"),
])
def test_bad_recurrent_configurations_name_the_problem(layer_type, params, shapes, message):
    tops = 3 if "expose_hidden" in params else (2 if layer_type == "LSTMUnit" else 1)
    with pytest.raises(CaffeCompatError, match=message):
        build(layer_type, params, shapes, tops=tops)


@pytest.mark.parametrize("layer_type,params,shapes,tops", [
    ("LSTM", "", [(5, 3, 2, 2), (5, 3)], 1),
    ("LSTM", "", [(4, 2, 3), (4, 2), (2, 5)], 1),
    ("LSTM", "expose_hidden: true", [(4, 2, 3), (4, 2), (1, 2, 6), (1, 2, 6)], 3),
    ("RNN", "", [(5, 3, 4), (5, 3)], 1),
    ("RNN", "expose_hidden: true", [(4, 2, 3), (4, 2), (2, 2, 2), (1, 2, 6)], 2),
])
def test_recurrent_onnx_scans_the_steps(layer_type, params, shapes, tops):
    ctx, converted = build(layer_type, f"recurrent_param {{ num_output: 6 {params} {FILLERS} }}", shapes, tops=tops)
    model = onnx_model(layer_type, ctx, converted, 17)
    arrays = [RNG.standard_normal(s).astype(np.float32) for s in shapes]
    arrays[1] = cont_of(*shapes[1]).astype(np.float32)
    for theirs, ours in onnx_and_module_tops(model, converted.module, arrays):
        assert rel_err(theirs, ours) < 1e-5


def test_lstm_unit_onnx():
    shapes = [(1, 3, 4), (1, 3, 16), (1, 3)]
    ctx, converted = build("LSTMUnit", "", shapes, tops=2)
    model = onnx_model("LSTMUnit", ctx, converted, 17, input_dims=[list(s) for s in shapes])
    arrays = [RNG.standard_normal(s).astype(np.float32) for s in shapes[:2]] + [np.array([[0, 1, 0.5]], np.float32)]
    for theirs, ours in onnx_and_module_tops(model, converted.module, arrays):
        assert rel_err(theirs, ours) < 1e-6
