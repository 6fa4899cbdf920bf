"""`compare` follows Caffe's rule for which diffs its backward writes (Net::Init,
Net::Backward): every top of a layer that needs backward takes the diff its readers send
back, whether or not the layer's own value is differentiable; a read loss top adds its
readers' diffs to its loss weight (its Split sums them); and a top's diff leaves out a
path inside the layer that made it. The references here are worked out by hand from
that rule, on explicit formulas; BVLC Caffe (9b89154, CPU) computes the same numbers for
every key (relative error under 2e-7)."""
import numpy as np
import pytest
import torch

from caffe_compat.tools.compare import compare_case

RNG = np.random.default_rng(20)


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float32)


def _grad(output, wrt):
    return torch.autograd.grad(output, wrt, retain_graph=True)[0]


def _leaf(array) -> torch.Tensor:
    return torch.tensor(array, dtype=torch.float64, requires_grad=True)


def _euclidean(a, b):
    """Caffe's EuclideanLoss: sum((a - b)^2) / 2 / num, num the first axis."""
    return ((a - b) ** 2).sum() / 2 / a.shape[0]


def _scaled(extra: str = "") -> str:
    """Inputs data and target (2x4); scores = 1.5 data by a learned Scale."""
    return ('layer { name: "in" type: "Input" top: "data" top: "target" input_param { '
            'shape { dim: 2 dim: 4 } shape { dim: 2 dim: 4 } } }\n'
            f'layer {{ name: "scale" type: "Scale" bottom: "data" top: "scores" {extra}'
            'scale_param { filler { type: "constant" value: 1.5 } } }\n')


def _scale_inputs():
    return RNG.standard_normal((2, 4)).astype(np.float32), RNG.uniform(0, 1, (2, 4)).astype(np.float32)


def pool_mask_read():
    """MAX Pooling needs backward (its bottom comes from a learned scale), so its mask top
    does too: the EuclideanLoss reading the mask writes the mask's diff, although the mask
    is no differentiable function of anything (Pooling's backward ignores its diff)."""
    prototxt = ('layer { name: "in" type: "Input" top: "data" top: "target" input_param { '
                'shape { dim: 1 dim: 1 dim: 2 dim: 4 } shape { dim: 1 dim: 1 dim: 1 dim: 2 } } }\n'
                'layer { name: "scale" type: "Scale" bottom: "data" top: "scores" '
                'scale_param { filler { type: "constant" value: 1.5 } } }\n'
                'layer { name: "pool" type: "Pooling" bottom: "scores" top: "pooled" top: "mask" '
                'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
                'layer { name: "fit" type: "EuclideanLoss" bottom: "pooled" bottom: "target" top: "fit" }\n'
                'layer { name: "fit_mask" type: "EuclideanLoss" bottom: "mask" bottom: "target" top: "fit_mask" }\n')
    data = RNG.standard_normal((1, 1, 2, 4)).astype(np.float32)
    target = RNG.uniform(0, 4, (1, 1, 1, 2)).astype(np.float32)
    scores = _leaf(1.5 * data)
    pooled, index = torch.nn.functional.max_pool2d(scores, 2, 2, return_indices=True)  # index h * W + w, as Caffe's
    mask = _leaf(index.numpy().astype(np.float32))
    fit = _euclidean(pooled, torch.tensor(target, dtype=torch.float64))
    fit_mask = _euclidean(mask, torch.tensor(target, dtype=torch.float64))
    diff_scores = _grad(fit, scores)
    return prototxt, {"input/data": data, "input/target": target, "blob/pooled": _array(pooled),
                      "blob/mask": _array(mask), "blob/fit_mask": _array(fit_mask),
                      "diff/mask": _array(_grad(fit_mask, mask)), "diff/pooled": _array(_grad(fit, pooled)),
                      "diff/scores": _array(diff_scores), "diff/fit": np.float32(1), "diff/fit_mask": np.float32(1),
                      "paramdiff/scale/0": _array((diff_scores * torch.tensor(data, dtype=torch.float64)).sum()[None]),
                      "diff/target": np.zeros((1, 1, 1, 2), np.float32)}


def propagate_down_false():
    """A layer whose only bottom has `propagate_down: false` still needs backward (its
    bottom needs it), so its top takes its reader's diff; the scale behind it gets none."""
    prototxt = (_scaled() +
                'layer { name: "twice" type: "Power" bottom: "scores" top: "doubled" propagate_down: false '
                'power_param { scale: 2 } }\n'
                'layer { name: "fit" type: "EuclideanLoss" bottom: "doubled" bottom: "target" top: "fit" }\n')
    data, target = _scale_inputs()
    doubled = _leaf(3.0 * data)
    fit = _euclidean(doubled, torch.tensor(target, dtype=torch.float64))
    return prototxt, {
        "input/data": data, "input/target": target, "blob/doubled": _array(doubled), "blob/fit": _array(fit),
        "diff/doubled": _array(_grad(fit, doubled)), "diff/scores": np.zeros((2, 4), np.float32),
        "paramdiff/scale/0": np.zeros(4, np.float32), "diff/fit": np.float32(1)}


def force_backward_over_propagate_down():
    """force_backward sets every bottom_need_backward a layer allows (AllowForceBackward),
    `propagate_down: false` ones included: the diff reaches `data` after all."""
    prototxt = ('force_backward: true\n' + _scaled() +
                'layer { name: "twice" type: "Power" bottom: "data" top: "doubled" propagate_down: false '
                'power_param { scale: 2 } }\n'
                'layer { name: "fit" type: "EuclideanLoss" bottom: "doubled" bottom: "target" top: "fit" }\n')
    data, target = _scale_inputs()
    x = _leaf(data)
    target = _leaf(target)
    fit = _euclidean(2 * x, target)
    return prototxt, {"input/data": data, "input/target": _array(target), "blob/fit": _array(fit),
                      "diff/data": _array(_grad(fit, x)), "diff/target": _array(_grad(fit, target)),
                      "diff/scores": np.zeros((2, 4), np.float32), "paramdiff/scale/0": np.zeros(4, np.float32)}


def in_place_without_propagate_down():
    """A blob rewritten in place shares one diff: with the in-place ReLU declining it
    (`propagate_down: false`), the diff keeps what the ReLU's reader wrote, the gradient
    for the ReLU's value rather than the Scale's."""
    prototxt = (_scaled().replace('top: "scores"', 'top: "y"') +
                'layer { name: "relu" type: "ReLU" bottom: "y" top: "y" propagate_down: false }\n'
                'layer { name: "fit" type: "EuclideanLoss" bottom: "y" bottom: "target" top: "fit" }\n')
    data, target = _scale_inputs()
    rectified = _leaf(np.maximum(1.5 * data, 0))
    fit = _euclidean(rectified, torch.tensor(target, dtype=torch.float64))
    return prototxt, {"input/data": data, "input/target": target, "blob/y": _array(rectified),
                      "diff/y": _array(_grad(fit, rectified)), "paramdiff/scale/0": np.zeros(4, np.float32)}


def read_loss_top():
    """A loss_weight on a top another layer reads: Caffe's Split carries the weight and
    sums it with the reader's diff."""
    prototxt = (_scaled(extra="loss_weight: 0.5 ") +
                'layer { name: "fit" type: "EuclideanLoss" bottom: "scores" bottom: "target" top: "fit" }\n')
    data, target = _scale_inputs()
    scores = _leaf(1.5 * data)
    total = 0.5 * scores.sum() + _euclidean(scores, torch.tensor(target, dtype=torch.float64))
    diff_scores = _grad(total, scores)
    return prototxt, {"input/data": data, "input/target": target, "blob/scores": _array(scores),
                      "diff/scores": _array(diff_scores),
                      "paramdiff/scale/0": _array((diff_scores * torch.tensor(data, dtype=torch.float64)).sum(0))}


def lstm_unit_inner_path():
    """LSTMUnit computes h from c inside the layer; Caffe's diff of c is what c's reader
    sent back, and the layer adds h's path to c only on the way to its bottoms."""
    prototxt = ('force_backward: true\n'
                'layer { name: "in" type: "Input" top: "c_prev" top: "gates" top: "cont" top: "t_c" top: "t_h" '
                'input_param { shape { dim: 1 dim: 2 dim: 3 } shape { dim: 1 dim: 2 dim: 12 } '
                'shape { dim: 1 dim: 2 } shape { dim: 1 dim: 2 dim: 3 } shape { dim: 1 dim: 2 dim: 3 } } }\n'
                'layer { name: "unit" type: "LSTMUnit" bottom: "c_prev" bottom: "gates" bottom: "cont" '
                'top: "c" top: "h" }\n'
                'layer { name: "fit_c" type: "EuclideanLoss" bottom: "c" bottom: "t_c" top: "loss_c" }\n'
                'layer { name: "fit_h" type: "EuclideanLoss" bottom: "h" bottom: "t_h" top: "loss_h" }\n')
    arrays = {"input/c_prev": RNG.standard_normal((1, 2, 3)), "input/gates": RNG.standard_normal((1, 2, 12)),
              "input/cont": np.array([[1.0, 0.0]]), "input/t_c": RNG.standard_normal((1, 2, 3)),
              "input/t_h": RNG.standard_normal((1, 2, 3))}
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    c_prev, gates = _leaf(arrays["input/c_prev"]), _leaf(arrays["input/gates"])
    cont = torch.tensor(arrays["input/cont"], dtype=torch.float64).unsqueeze(-1)
    i, f, o = (torch.sigmoid(gates[..., k * 3:(k + 1) * 3]) for k in range(3))
    c = cont * f * c_prev + i * torch.tanh(gates[..., 9:])
    h = o * torch.tanh(c)
    t_c, t_h = (_leaf(arrays[k]) for k in ("input/t_c", "input/t_h"))
    loss_c, loss_h = _euclidean(c, t_c), _euclidean(h, t_h)
    total = loss_c + loss_h
    arrays.update({"blob/c": _array(c), "blob/h": _array(h), "blob/loss_c": _array(loss_c),
                   "blob/loss_h": _array(loss_h),
                   "diff/c": _array(_grad(loss_c, c)),  # c's reader only, not h's path through c
                   "diff/h": _array(_grad(loss_h, h)), "diff/c_prev": _array(_grad(total, c_prev)),
                   "diff/gates": _array(_grad(total, gates)), "diff/t_c": _array(_grad(total, t_c)),
                   "diff/t_h": _array(_grad(total, t_h)), "diff/cont": np.zeros((1, 2), np.float32),
                   "diff/loss_c": np.float32(1), "diff/loss_h": np.float32(1)})
    return prototxt, arrays


@pytest.mark.parametrize("case", [pool_mask_read, propagate_down_false, force_backward_over_propagate_down,
                                  in_place_without_propagate_down, read_loss_top, lstm_unit_inner_path])
def test_compare_gives_each_blob_the_diff_caffe_writes(tmp_path, case):
    prototxt, arrays = case()
    (tmp_path / "net.prototxt").write_text(prototxt)
    np.savez(tmp_path / "ref.npz", **arrays)
    rows = compare_case(tmp_path / "net.prototxt", None, tmp_path / "ref.npz")
    assert {row.key for row in rows} == {k for k in arrays if not k.startswith("input/")}
    failed = [row.format() for row in rows if not row.ok]
    assert not failed, "\n".join(failed)


def test_a_diff_caffe_writes_is_a_value_even_where_nothing_reached_it(tmp_path):
    """Under force_backward every layer runs backward: `side` is written (zeros, from a
    reader whose top reaches no loss), `side2`, read by nothing and given no diff, is not."""
    prototxt = ('force_backward: true\n'
                'layer { name: "in" type: "Input" top: "data" top: "target" '
                'input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }\n'
                'layer { name: "fit" type: "EuclideanLoss" bottom: "data" bottom: "target" top: "fit" }\n'
                'layer { name: "side" type: "Power" bottom: "data" top: "side" power_param { scale: 2 } }\n'
                'layer { name: "side2" type: "Power" bottom: "side" top: "side2" power_param { scale: 2 } }\n')
    data, target = RNG.standard_normal((2, 2, 3)).astype(np.float32)
    zeros = np.zeros((2, 3), np.float32)
    (tmp_path / "net.prototxt").write_text(prototxt)
    np.savez(tmp_path / "ref.npz", **{"input/data": data, "input/target": target, "diff/data": (data - target) / 2,
                                      "diff/side": zeros, "diff/side2": zeros})
    rows = {row.key: row for row in compare_case(tmp_path / "net.prototxt", None, tmp_path / "ref.npz")}
    assert all(row.ok for row in rows.values())
    assert (rows["diff/side"].note, rows["diff/side2"].note) == ("", "no gradient here")
