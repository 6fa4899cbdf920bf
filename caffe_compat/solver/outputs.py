"""What training writes besides its snapshots' contents: the checks that every output
path can be written, made before any training work (a run that trains for hours and
then cannot write its result loses it), and the training log CSV."""
from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Tuple

from ..errors import CaffeCompatError
from ..io import atomic
from ..io.run_inputs import RunInputs
from .state import STATE_SUFFIX

LOG_HEADER = ("iteration", "loss", "lr", "smoothed_loss")


class LogRow(NamedTuple):
    iteration: int
    loss: float
    lr: float
    smoothed_loss: float


def snapshot_prefix(param, solver_path: Path) -> str:
    """Caffe's UpgradeSnapshotPrefixProperty: no snapshot_prefix means the solver file's
    path without its extension; a folder means that folder plus the solver file's stem."""
    if not param.HasField("snapshot_prefix"):
        return str(solver_path.with_suffix(""))
    if Path(param.snapshot_prefix).is_dir():
        return str(Path(param.snapshot_prefix) / solver_path.stem)
    return param.snapshot_prefix


def check_snapshot_prefix(prefix: str, where: str) -> None:
    """Caffe's CheckSnapshotWritePermissions, by writing a probe file in the prefix's folder."""
    _check_folder(Path(prefix).parent, f"{where}: snapshot_prefix '{prefix}'")


def refuse_outputs_over_inputs(solver_path: Path, nets: Sequence[Tuple[str, object]], weights: Optional[Path],
                               resume: Optional[Path], outputs: Sequence[Optional[Path]], prefix: str,
                               snapshot_iterations: range) -> None:
    """No output of the run (--output, --log, its snapshots, HDF5Output files) may land on
    what it reads: the solver, its nets (`nets`: (what, NetFile)) and every file their
    layers read, the weights, the state it resumes."""
    inputs = RunInputs()
    inputs.add(solver_path, "the solver")
    distinct = {}  # the train net is also the test net where the solver names no other
    for what, net_file in nets:
        distinct.setdefault(id(net_file), (what, net_file))
    for what, net_file in distinct.values():
        if os.path.realpath(net_file.path) != os.path.realpath(solver_path):  # not a net_param inside it
            inputs.add(net_file.path, what)
        inputs.add_net_layers(net_file.net.layer, str(net_file.path))
    for path, what in ((weights, "the weights"), (resume, "the solver state to resume")):
        if path is not None:
            inputs.add(path, what)
    for path in outputs:
        if path is not None:
            inputs.check_output(path)
    for _, net_file in distinct.values():  # HDF5Output layers write at every forward pass
        for layer in net_file.net.layer:
            if layer.type == "HDF5Output" and layer.hdf5_output_param.file_name:
                inputs.check_output(layer.hdf5_output_param.file_name, f"hdf5_output_param.file_name of layer "
                                                                       f"'{layer.name}' in {net_file.path}")
    inputs.check_snapshots(prefix, snapshot_iterations, (".caffemodel", STATE_SUFFIX),
                           f"a snapshot of snapshot_prefix '{prefix}' in {solver_path}")


def _check_folder(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".caffe-compat-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CaffeCompatError(f"{what}: cannot write in {folder}: {err.strerror or err}") from None


def write_training_log(path: Path, rows: Sequence[LogRow]) -> None:
    """The training log CSV: one row per iteration, numbers as %.6g (the precision of the
    float32 values behind them, without artefacts such as 9.999999747378752e-05)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(LOG_HEADER)
    for row in rows:
        writer.writerow([row.iteration] + [f"{value:.6g}" for value in row[1:]])
    atomic.write_text(path, text.getvalue())
