"""`caffe-compat compare`: run a converted net on the inputs Caffe was given and compare
every blob, gradient and parameter Caffe recorded (the format of the reference README)."""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data import close_data_layers
from ..devices import resolve_device
from ..errors import CaffeCompatError, printable
from ..io.files import read_caffemodel, read_prototxt, weights_of
from ..io.text import parse_json
from ..layers.registry import caffe_blobs
from ..need_backward import need_backward

PathLike = Union[str, Path]
ZERO_ATOL = 1e-7  # where Caffe's reference is exactly zero, ours must be too
DEEP_NET_LAYERS = 10


@dataclass
class Row:
    case: str
    key: str
    shape: Tuple[int, ...]
    max_abs: float
    rel: float
    tol: float
    ok: bool
    note: str = ""

    def format(self) -> str:
        if self.key == CASE_ERROR_KEY:
            return f"{self.case:<24} {self.key:<40} {'-':>14} {'-':>11} {'-':>11} FAIL  {self.note}"
        status = "ok" if self.ok else "FAIL"
        shape = "x".join(str(s) for s in self.shape) or "scalar"
        return (f"{self.case:<24} {self.key:<40} {shape:>14} {self.max_abs:>11.3e} {self.rel:>11.3e} "
                f"{status}{('  ' + self.note) if self.note else ''}")


CASE_ERROR_KEY = "(case)"


def failed_case(case: str, err: BaseException) -> Row:
    """The one FAIL row of a case that could not be built or run, naming the error."""
    detail = str(err) if isinstance(err, CaffeCompatError) else f"{type(err).__name__}: {err}"
    return Row(case, CASE_ERROR_KEY, (), float("nan"), float("nan"), float("nan"), False,
               detail.splitlines()[0] if detail else type(err).__name__)


HEADER = f"{'case':<24} {'key':<40} {'shape':>14} {'max abs err':>11} {'rel err':>11} status"


def _row(case: str, key: str, ours: Optional[np.ndarray], ref: np.ndarray, tol: float) -> Row:
    ref = np.asarray(ref, dtype=np.float64)
    if ours is None:
        # No gradient flows here: fine exactly when Caffe's is zero too.
        peak = float(np.abs(ref).max()) if ref.size else 0.0
        return Row(case, key, ref.shape, peak, float("nan"), tol, peak <= ZERO_ATOL, "no gradient here")
    ours = np.asarray(ours, dtype=np.float64)
    if ours.shape != ref.shape:
        if ours.size == ref.size:
            ours = ours.reshape(ref.shape)
        else:
            return Row(case, key, ref.shape, float("inf"), float("inf"), tol, False,
                       f"shape {ours.shape} != reference {ref.shape}")
    if not ref.size:
        return Row(case, key, ref.shape, 0.0, 0.0, tol, True)
    err = np.abs(ours - ref)
    max_abs = float(np.nanmax(err)) if not np.isnan(err).all() else float("nan")
    if np.isnan(ours).any() != np.isnan(ref).any() or (np.isnan(ours) != np.isnan(ref)).any():
        return Row(case, key, ref.shape, max_abs, float("nan"), tol, False, "NaN where the reference has none")
    scale = float(np.abs(ref).max())
    if scale == 0.0:
        return Row(case, key, ref.shape, max_abs, float("nan"), tol, max_abs <= ZERO_ATOL)
    rel = max_abs / scale
    return Row(case, key, ref.shape, max_abs, rel, tol, rel <= tol)


def _missing(case: str, key: str, ref: np.ndarray) -> Row:
    """A recorded blob the net does not have."""
    return Row(case, key, np.shape(ref), float("inf"), float("inf"), 0.0, False, "the net has no such blob")


def _numpy(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().cpu().double().numpy()


@contextlib.contextmanager
def working_directory(path: Optional[PathLike]) -> Iterator[None]:
    """Run in `path` (None: where we are), restoring the old one after."""
    if path is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def check_options(device, rtol: Optional[float], grad_rtol: Optional[float]) -> torch.device:
    """The device to compare on; tolerances that are not positive numbers are refused
    (a negative one would fail every key, NaN pass none)."""
    for option, tol in (("--rtol", rtol), ("--grad-rtol", grad_rtol)):
        if tol is not None and not 0 < tol < float("inf"):
            raise CaffeCompatError(f"{option} {tol}: must be a positive number")
    return resolve_device(device)


def compare_case(prototxt: Optional[PathLike], weights: Optional[PathLike], reference: PathLike,
                 device: str = "cpu", rtol: Optional[float] = None, grad_rtol: Optional[float] = None,
                 name: Optional[str] = None, allow_missing_weights: bool = False,
                 max_memory=None, cwd: Optional[PathLike] = None) -> List[Row]:
    """Compare one reference .npz; returns one Row per compared key. The net's relative
    paths (data sources, infogain matrices) resolve from `cwd`, as Caffe's from its
    working directory (default: the current one)."""
    device = check_options(device, rtol, grad_rtol)
    paths = [None if p is None else Path(p) for p in (prototxt, weights, reference)]
    if cwd is not None:  # the files themselves are named from here
        paths = [None if p is None else p.absolute() for p in paths]
    with working_directory(cwd):
        return _compare_case(*paths, device, rtol, grad_rtol, name, allow_missing_weights, max_memory)


def _compare_case(prototxt, weights, reference: Path, device, rtol, grad_rtol, name, allow_missing_weights,
                  max_memory) -> List[Row]:
    try:
        ref = dict(np.load(reference, allow_pickle=False))
    except (OSError, ValueError) as err:
        raise CaffeCompatError(f"{reference}: not a readable .npz: {err}") from None
    case = name or reference.stem
    meta = parse_json(f"{reference}: key 'meta'", str(ref.pop("meta"))) if "meta" in ref else {}
    if not isinstance(meta, dict):
        raise CaffeCompatError(f"{reference}: key 'meta': expected a JSON object")
    keys = list(ref)
    if any(k.startswith("param/") for k in keys) and not any(k.startswith(("input/", "blob/", "batch")) for k in keys):
        return _compare_params(case, weights, ref, rtol if rtol is not None else 1e-4)
    if prototxt is None:
        raise CaffeCompatError(f"{reference}: blob references need the net's prototxt")
    from ..loading import load_net

    net_file = read_prototxt(prototxt)
    phase = meta.get("phase", "TEST")
    batch_keys = sorted({int(m.group(1)) for k in keys if (m := re.match(r"batch(\d+)/", k))})
    net = load_net(net_file, weights, phase=phase, allow_missing_weights=allow_missing_weights,
                   max_memory=max_memory).to(device)
    deep = sum(1 for n in net.graph.layers if n.type != "Input") > DEEP_NET_LAYERS
    fwd_tol = rtol if rtol is not None else (1e-4 if deep else 1e-5)
    bwd_tol = grad_rtol if grad_rtol is not None else 1e-4
    if batch_keys and net.input_names:
        raise CaffeCompatError(f"{reference}: its batch references need the net's data layers, but "
                               f"{', '.join(net.input_names)} has no source here (see the note above)")
    if batch_keys:
        return _compare_batches(case, net, ref, batch_keys, fwd_tol, device)
    return _compare_forward_backward(case, net, ref, fwd_tol, bwd_tol, device)


def _compare_params(case: str, weights: Optional[PathLike], ref: Dict[str, np.ndarray], tol: float) -> List[Row]:
    if weights is None:
        raise CaffeCompatError(f"case '{case}': param/* references need a weights file")
    blobs = weights_of(read_caffemodel(weights))
    rows = []
    for key, value in ref.items():
        match = re.fullmatch(r"param/(.+)/(\d+)", key)
        if not match:
            continue
        layer, index = match.group(1), int(match.group(2))
        ours = blobs.get(layer, [])
        rows.append(_row(case, key, ours[index] if index < len(ours) else np.full(value.shape, np.nan), value, tol))
    return rows


def _compare_batches(case, net, ref, batch_keys, tol, device) -> List[Row]:
    rows = []
    try:
        with torch.no_grad():
            for k in range(max(batch_keys) + 1):
                outputs = net.run({})
                for key, value in ref.items():
                    if key.startswith(f"batch{k}/"):
                        blob = key.split("/", 1)[1]
                        rows.append(_row(case, key, _numpy(outputs[blob]), value, tol) if blob in outputs
                                    else _missing(case, key, value))
    finally:
        close_data_layers(net)  # their prefetching threads must not outlive the comparison
    return rows


def _freeze_unlearned(net) -> None:
    """Without force_backward Caffe computes no diff for a parameter with lr_mult 0, nor
    for the tops of data layers (nor for what only those reach)."""
    for module in net.modules():
        if hasattr(module, "tops_take_gradients"):
            module.tops_take_gradients = False
    learning_rate = {id(p): net.param_multipliers[name][0] for name, p in net.named_parameters()
                     if name in net.param_multipliers}
    for parameter in net.parameters():
        if learning_rate.get(id(parameter), 1.0) == 0:
            parameter.requires_grad_(False)


def _param_lr(net) -> Dict[str, List[float]]:
    """Each layer's lr_mult per parameter blob, as Net::Init reads them (1 where unset)."""
    result = {}
    for module_name, module in net.layers.items():
        node = net.graph.layer(net.layer_names[module_name])
        result[node.name] = [node.param_specs[i].lr_mult if i < len(node.param_specs) else 1.0
                             for i in range(len(getattr(module, "blob_names", ())))]
    return result


def _compare_forward_backward(case, net, ref, fwd_tol, bwd_tol, device) -> List[Row]:
    force_backward = net.graph.net is None or net.graph.net.force_backward
    if not force_backward:
        _freeze_unlearned(net)
    inputs = {key[len("input/"):]: torch.from_numpy(value).to(device) for key, value in ref.items()
              if key.startswith("input/")}
    missing = [n for n in net.input_names if n not in inputs]
    if missing:
        raise CaffeCompatError(f"case '{case}': the reference has no input/ for {', '.join(missing)}")
    # Which diffs Caffe's backward writes (without force_backward: none of an Input blob's,
    # nor of what no learned parameter reaches).
    rule = need_backward(net.graph, _param_lr(net), force_backward)
    for name, tensor in inputs.items():
        tensor.requires_grad_(tensor.is_floating_point() and rule.diff_values.get(name) in rule.receives)
    wants_grad = any(k.startswith(("diff/", "paramdiff/")) for k in ref)
    first: Dict[str, torch.Tensor] = dict(inputs)
    with torch.set_grad_enabled(wants_grad):
        blobs = net.run(dict(inputs), first, caffe_backward=rule)
    rows = [_row(case, key, _numpy(blobs[key[5:]]), value, fwd_tol) if key[5:] in blobs else _missing(case, key, value)
            for key, value in ref.items() if key.startswith("blob/")]
    if not wants_grad:
        return rows
    for tensor in first.values():
        if tensor.requires_grad and not tensor.is_leaf:
            tensor.retain_grad()
    seeds = [(blobs[k[len("topdiff/"):]], torch.from_numpy(v).to(device)) for k, v in ref.items()
             if k.startswith("topdiff/")]
    if net.loss_terms:
        objective = net.loss(blobs)
    elif not force_backward:
        objective = None  # no layer contributes to a loss: Caffe's backward computes nothing
    elif seeds:
        objective = sum((value * seed).sum() for value, seed in seeds)
    else:
        raise CaffeCompatError(f"case '{case}': gradients to compare but neither a loss nor topdiff/ seeds")
    params = {}
    for module_name, module in net.layers.items():
        for i, tensor in enumerate(caffe_blobs(module)):
            params[f"{net.layer_names[module_name]}/{i}"] = tensor
    if objective is not None and objective.requires_grad:
        objective.backward()
    # else nothing the seeds reach depends on an input or parameter: every gradient is zero
    loss_weights = dict(net.loss_terms)
    for key, value in ref.items():
        if key.startswith("diff/"):
            blob = key[len("diff/"):]
            tensor = first.get(blob)
            grad = tensor.grad if tensor is not None and tensor.requires_grad else None
            if rule.diff_values.get(blob) in rule.receives:  # what its readers sent back, zeros where none did
                ours = _numpy(grad) if grad is not None else np.zeros(value.shape)
            elif rule.diff_values.get(blob) in rule.read:
                ours = None  # Caffe's backward never writes it
            elif blob in loss_weights:
                # Caffe seeds a loss top's diff with its loss weight.
                ours = np.full(value.shape, loss_weights[blob])
            else:
                ours = _numpy(grad)  # an output: the topdiff/ seed given, if any
            rows.append(_row(case, key, ours, value, bwd_tol))
        elif key.startswith("paramdiff/"):
            tensor = params.get(key[len("paramdiff/"):])
            grad = tensor.grad if tensor is not None and tensor.requires_grad else None
            rows.append(_row(case, key, _numpy(grad), value, bwd_tol))
    return rows


def cases_in(directory: PathLike) -> List[Tuple[Optional[Path], Optional[Path], Path]]:
    """Every NAME.npz with its NAME.prototxt (and NAME.caffemodel when present). Such a
    folder's cases were recorded from it: compare them with cwd=directory."""
    directory = Path(directory)
    result = []
    for npz in sorted(directory.glob("*.npz")):
        proto = npz.with_suffix(".prototxt")
        model = npz.with_suffix(".caffemodel")
        result.append((proto if proto.exists() else None, model if model.exists() else None, npz))
    if not result:
        raise CaffeCompatError(f"{directory}: holds no .npz references")
    return result


def cases_given(files: Sequence[PathLike]) -> Tuple[List[Tuple[Optional[Path], Optional[Path], Path]], Optional[Path]]:
    """The cases `compare FILES` names, and the folder to run them from: a folder of cases
    runs from that folder, where Caffe resolved their relative paths."""
    paths = [Path(p) for p in files]
    if len(paths) == 1 and paths[0].is_dir():
        return cases_in(paths[0]), paths[0]
    npz = [p for p in paths if p.suffix == ".npz"]
    if len(npz) != 1:
        raise CaffeCompatError("compare takes NET.prototxt [WEIGHTS.caffemodel] REF.npz, or a directory")
    proto = next((p for p in paths if p.suffix != ".npz" and p.suffix != ".caffemodel"), None)
    model = next((p for p in paths if p.suffix == ".caffemodel"), None)
    if proto is None and npz[0].with_suffix(".prototxt").exists():
        proto = npz[0].with_suffix(".prototxt")
        model = model or (npz[0].with_suffix(".caffemodel") if npz[0].with_suffix(".caffemodel").exists() else None)
    return [(proto, model, npz[0])], None


def run_compare(files: Sequence[PathLike], device, rtol: Optional[float], grad_rtol: Optional[float],
                allow_missing_weights: bool = False, max_memory: Optional[int] = None) -> int:
    """Print one row per compared key, then `N passed, M failed`; 0 when every key passed.
    Of several cases, one that fails to build or run is one FAIL row and the others still run."""
    check_options(device, rtol, grad_rtol)  # once, not as a FAIL row per case
    cases, cwd = cases_given(files)
    print(HEADER)
    passed = failed = 0
    for proto, model, npz in cases:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows = compare_case(proto, model, npz, device, rtol, grad_rtol,
                                    allow_missing_weights=allow_missing_weights, max_memory=max_memory, cwd=cwd)
        except CaffeCompatError as err:
            if len(cases) == 1:
                raise
            rows = [failed_case(npz.stem, err)]
        except Exception as err:  # a case that breaks is one FAIL row; the others still run
            rows = [failed_case(npz.stem, err)]
        for row in rows:
            print(printable(row.format()))  # keys and notes come from the files
            passed += row.ok
            failed += not row.ok
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1
