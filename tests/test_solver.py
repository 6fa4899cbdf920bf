"""Caffe's solver arithmetic, checked against the formulas of Caffe's solvers computed by
hand (float64 numpy here): learning-rate policies, each update rule, weight decay,
iter_size normalisation, gradient clipping, lr/decay multipliers, state round trips."""
import io
import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.errors import CaffeCompatError
from caffe_compat.graph import build_graph
from caffe_compat.io.schema import messages
from caffe_compat.net import CaffeNet
from caffe_compat.solver import CaffeSolver, LearnableParam, check_solver, learnable_params, solver_type

pb = messages("bvlc")


def solver_param(text: str):
    param = pb.SolverParameter()
    text_format.Parse(text, param)
    return param


def make_solver(text: str, values=(0.5, -1.0, 0.0, 2.0), lr_mult=1.0, decay_mult=1.0):
    tensor = torch.tensor(values, dtype=torch.float32)
    params = [LearnableParam("w", tensor, lr_mult, decay_mult)]
    return CaffeSolver(solver_param(text), params), tensor


def rates(text: str, iterations: int):
    solver, _ = make_solver(text)
    result = []
    for _ in range(iterations):
        result.append(solver.learning_rate())
        solver.iter += 1
    return result


# ---- learning-rate policies

def test_fixed():
    assert rates('lr_policy: "fixed" base_lr: 0.01', 3) == pytest.approx([0.01] * 3, rel=1e-7)


def test_step():
    got = rates('lr_policy: "step" base_lr: 0.01 gamma: 0.1 stepsize: 3', 7)
    assert got == pytest.approx([0.01] * 3 + [0.001] * 3 + [0.0001], rel=1e-6)


def test_exp():
    got = rates('lr_policy: "exp" base_lr: 0.1 gamma: 0.9', 4)
    assert got == pytest.approx([0.1 * 0.9 ** i for i in range(4)], rel=1e-6)


def test_inv():
    got = rates('lr_policy: "inv" base_lr: 0.01 gamma: 0.0001 power: 0.75', 3)
    assert got == pytest.approx([0.01 * (1 + 0.0001 * i) ** -0.75 for i in range(3)], rel=1e-6)


def test_multistep():
    got = rates('lr_policy: "multistep" base_lr: 1 gamma: 0.5 stepvalue: 2 stepvalue: 5', 7)
    assert got == pytest.approx([1, 1, 0.5, 0.5, 0.5, 0.25, 0.25], rel=1e-7)


def test_multistep_advances_one_step_per_update_as_caffe():
    # Caffe moves current_step by at most one per call: two step values passed at once
    # (e.g. on resuming without the state) take two iterations to apply.
    solver, _ = make_solver('lr_policy: "multistep" base_lr: 1 gamma: 0.5 stepvalue: 1 stepvalue: 2')
    solver.iter = 5
    assert [solver.learning_rate(), solver.learning_rate()] == [0.5, 0.25]


def test_poly():
    got = rates('lr_policy: "poly" base_lr: 0.1 power: 2 max_iter: 10', 4)
    assert got == pytest.approx([0.1 * (1 - i / 10) ** 2 for i in range(4)], rel=1e-6)


def test_sigmoid():
    got = rates('lr_policy: "sigmoid" base_lr: 0.1 gamma: 0.5 stepsize: 2', 4)
    assert got == pytest.approx([0.1 / (1 + math.exp(-0.5 * (i - 2))) for i in range(4)], rel=1e-6)


# ---- update rules, several iterations against the hand-written formulas

GRADS = [np.array(g, dtype=np.float64) for g in ([0.2, -0.1, 0.4, 0.0], [0.1, 0.3, -0.2, 0.5],
                                                  [-0.3, 0.2, 0.1, 0.05])]
W0 = np.array([0.5, -1.0, 0.0, 2.0])


def run_solver(text: str, lr_mult=1.0, decay_mult=1.0):
    solver, tensor = make_solver(text, tuple(W0), lr_mult, decay_mult)
    for grad in GRADS:
        tensor.grad = torch.tensor(grad, dtype=torch.float32)
        solver.step()
    return tensor.numpy().astype(np.float64)


def reference(update, weight_decay=0.0, lr=0.1, lr_mult=1.0, decay_mult=1.0, l1=False):
    w = W0.copy()
    state = {}
    for t, grad in enumerate(GRADS):
        regular = np.sign(w) if l1 else w
        g = grad + weight_decay * decay_mult * regular
        w = w - update(g, lr * lr_mult, state, t + 1)
    return w


def sgd(momentum):
    def update(g, rate, state, t):
        state["v"] = momentum * state.get("v", 0) + rate * g
        return state["v"]
    return update


def test_sgd_momentum_with_l2_decay_and_multipliers():
    text = 'type: "SGD" lr_policy: "fixed" base_lr: 0.1 momentum: 0.9 weight_decay: 0.01'
    got = run_solver(text, lr_mult=2.0, decay_mult=0.5)
    want = reference(sgd(0.9), weight_decay=0.01, lr_mult=2.0, decay_mult=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_l1_regularization_uses_the_sign():
    text = 'lr_policy: "fixed" base_lr: 0.1 weight_decay: 0.05 regularization_type: "L1"'
    np.testing.assert_allclose(run_solver(text), reference(sgd(0.0), weight_decay=0.05, l1=True),
                               rtol=1e-6, atol=1e-7)


def test_nesterov():
    def update(g, rate, state, t):
        previous = state.get("v", 0)
        state["v"] = 0.9 * previous + rate * g
        return 1.9 * state["v"] - 0.9 * previous
    text = 'type: "Nesterov" lr_policy: "fixed" base_lr: 0.1 momentum: 0.9 weight_decay: 0.01'
    np.testing.assert_allclose(run_solver(text), reference(update, weight_decay=0.01), rtol=1e-6, atol=1e-7)


def test_adagrad():
    def update(g, rate, state, t):
        state["h"] = state.get("h", 0) + g * g
        return rate * g / (np.sqrt(state["h"]) + 1e-8)
    text = 'type: "AdaGrad" lr_policy: "fixed" base_lr: 0.1 delta: 1e-8'
    np.testing.assert_allclose(run_solver(text), reference(update), rtol=1e-6, atol=1e-7)


def test_rmsprop():
    def update(g, rate, state, t):
        state["h"] = 0.95 * state.get("h", 0) + 0.05 * g * g
        return rate * g / (np.sqrt(state["h"]) + 1e-6)
    text = 'type: "RMSProp" lr_policy: "fixed" base_lr: 0.1 rms_decay: 0.95 delta: 1e-6'
    np.testing.assert_allclose(run_solver(text), reference(update), rtol=1e-5, atol=1e-7)


def test_adadelta():
    def update(g, rate, state, t):
        state["g2"] = 0.9 * state.get("g2", 0) + 0.1 * g * g
        step = g * np.sqrt((state.get("u2", 0) + 1e-6) / (state["g2"] + 1e-6))
        state["u2"] = 0.9 * state.get("u2", 0) + 0.1 * step * step
        return rate * step
    text = 'type: "AdaDelta" lr_policy: "fixed" base_lr: 1 momentum: 0.9 delta: 1e-6'
    np.testing.assert_allclose(run_solver(text), reference(update, lr=1.0), rtol=1e-5, atol=1e-7)


def test_adam():
    def update(g, rate, state, t):
        state["m"] = 0.9 * state.get("m", 0) + 0.1 * g
        state["v"] = 0.999 * state.get("v", 0) + 0.001 * g * g
        correction = math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        return rate * correction * state["m"] / (np.sqrt(state["v"]) + 1e-8)
    text = 'type: "Adam" lr_policy: "fixed" base_lr: 0.01 momentum: 0.9 momentum2: 0.999'
    np.testing.assert_allclose(run_solver(text), reference(update, lr=0.01), rtol=1e-5, atol=1e-7)


def test_legacy_solver_type_enum():
    assert solver_type(solver_param("solver_type: ADAM")) == "Adam"
    assert solver_type(solver_param("solver_type: NESTEROV")) == "Nesterov"
    assert solver_type(solver_param("")) == "SGD"


# ---- iter_size, clipping, multipliers

def test_iter_size_divides_the_accumulated_gradient():
    solver, w = make_solver('lr_policy: "fixed" base_lr: 1 iter_size: 4', (1.0, 1.0))
    w.grad = torch.tensor([4.0, -8.0])
    solver.step()
    assert w.tolist() == [0.0, 3.0]


def test_clip_gradients_uses_the_global_norm_before_normalising():
    a, b = torch.tensor([1.0]), torch.tensor([1.0])
    params = [LearnableParam("a", a, 1.0, 1.0), LearnableParam("b", b, 1.0, 1.0)]
    solver = CaffeSolver(solver_param('lr_policy: "fixed" base_lr: 1 clip_gradients: 1 iter_size: 2'), params)
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])  # norm 5 of the summed gradients
    solver.step()
    assert a.item() == pytest.approx(1 - 0.6 / 2) and b.item() == pytest.approx(1 - 0.8 / 2)


def test_clip_gradients_leaves_small_gradients_alone():
    solver, w = make_solver('lr_policy: "fixed" base_lr: 1 clip_gradients: 10', (0.0,))
    w.grad = torch.tensor([3.0])
    solver.step()
    assert w.item() == -3.0



@pytest.mark.parametrize("kind", ["SGD", "Nesterov"])
def test_many_params_update_together_and_each_as_alone(kind):
    # 60 params of 3 (lr_mult, decay_mult) kinds, as a GoogLeNet's weights and biases: each
    # ends as a solver holding it alone would leave it, and SGD, where every step of
    # Caffe's update is one torch._foreach_* call per kind, issues a few calls, not
    # several per param (Python per param cost GoogLeNet's update 4% of an iteration).
    text = f'type: "{kind}" lr_policy: "fixed" base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 iter_size: 2'
    multipliers = [(1.0, 1.0), (2.0, 0.0), (10.0, 1.0)] * 20
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(4, 3, 2, 2, generator=generator).contiguous(memory_format=torch.channels_last)
              if index % 2 else torch.randn(5, generator=generator) for index in range(len(multipliers))]
    grads = [[torch.randn(v.shape, generator=generator) for v in values] for _ in range(3)]
    together = [LearnableParam(f"p{i}", v.clone(), lr, decay) for i, (v, (lr, decay)) in
                enumerate(zip(values, multipliers))]
    solver = CaffeSolver(solver_param(text), together)
    for step_grads in grads:
        for p, grad in zip(together, step_grads):
            p.tensor.grad = grad.clone()
        with torch.profiler.profile() as profiled:
            solver.step()
    calls = [e for e in profiled.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    if kind == "SGD":
        assert len(calls) <= 5 * 3, [e.name for e in calls]
    for index, (v, (lr, decay)) in enumerate(zip(values, multipliers)):
        alone = LearnableParam("p", v.clone(), lr, decay)
        single = CaffeSolver(solver_param(text), [alone])
        for step_grads in grads:
            alone.tensor.grad = step_grads[index].clone()
            single.step()
        assert torch.equal(alone.tensor, together[index].tensor), index


def tiny_net():
    net = pb.NetParameter()
    text_format.Parse('''
        layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
          param { lr_mult: 3 decay_mult: 0 } param { lr_mult: 0 }
          inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }''', net)
    return CaffeNet(build_graph(net, "TRAIN"))


def test_lr_mult_zero_params_are_frozen_and_multipliers_are_read():
    net = tiny_net()
    params = learnable_params(net)
    assert [(p.name, p.lr_mult, p.decay_mult) for p in params] == [("layers.ip.weight", 3.0, 0.0)]
    assert not net.layers["ip"].bias.requires_grad


# ---- checks and state

@pytest.mark.parametrize("text, message", [
    ('type: "Sgd" lr_policy: "fixed"', "unknown solver type 'Sgd'"),
    ('lr_policy: "cosine"', "lr_policy is 'cosine'"),
    ('base_lr: 0.1', "lr_policy is missing"),
    ('lr_policy: "fixed" iter_size: -1', "iter_size must be >= 1"),
    ('lr_policy: "step"', "needs stepsize > 0"),
    ('lr_policy: "fixed" type: "AdaGrad" momentum: 0.9', "momentum cannot be used with AdaGrad"),
    ('lr_policy: "fixed" type: "RMSProp" rms_decay: 1', "rms_decay"),
    ('lr_policy: "fixed" regularization_type: "L3"', "regularization_type 'L3'"),
    ('lr_policy: "fixed" snapshot: 10', "snapshot_prefix is missing"),
    ('lr_policy: "fixed" type: "SGD" solver_type: ADAM', "not both"),
])
def test_bad_solvers_are_named(text, message):
    with pytest.raises(CaffeCompatError, match=message):
        check_solver(solver_param(text), "solver.prototxt")


@pytest.mark.parametrize("field", ["base_lr", "gamma", "momentum", "weight_decay", "momentum2", "delta",
                                   "rms_decay", "power", "clip_gradients"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_fields_are_named(field, value):
    with pytest.raises(CaffeCompatError, match=rf"solver.prototxt: {field} must be a finite number, got "
                                               rf"{value.replace('+', '')}"):
        check_solver(solver_param(f'lr_policy: "step" stepsize: 1 type: "Adam" {field}: {value}'), "solver.prototxt")


def test_state_round_trip_continues_identically():
    text = 'type: "Adam" lr_policy: "multistep" stepvalue: 1 gamma: 0.5 base_lr: 0.01 momentum: 0.9'
    first, w1 = make_solver(text)
    w1.grad = torch.tensor([0.1, 0.2, 0.3, 0.4])
    first.step()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second, w2 = make_solver(text, tuple(w1.tolist()))
    second.load_state_dict(torch.load(buffer, weights_only=True))
    for solver, w in ((first, w1), (second, w2)):
        w.grad = torch.tensor([0.4, -0.3, 0.2, -0.1])
        solver.step()
    assert torch.equal(w1, w2) and second.current_step == 1 and second.iter == 2


def test_state_of_another_solver_is_refused():
    sgd_solver, _ = make_solver('lr_policy: "fixed"')
    adam_solver, _ = make_solver('lr_policy: "fixed" type: "Adam"')
    with pytest.raises(CaffeCompatError, match="written by a SGD solver"):
        adam_solver.load_state_dict(sgd_solver.state_dict())
