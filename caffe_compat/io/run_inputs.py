"""The files a run reads, and the check that none of its outputs lands on one of them:
`train --output train.prototxt`, `--log train_lmdb/data.mdb` or a snapshot_prefix inside
an LMDB destroyed what the run was given. An input is compared with an output by its
resolved path (symlinks followed) and, when both exist, by (device, inode) (hard links);
an input folder (an LMDB) takes no output anywhere inside it. Outputs that exist and are
not regular files are refused too (atomic.check_target), the null device aside: what is
written to it is discarded."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

from ..errors import CaffeCompatError
from .atomic import check_target, is_null_device

PathLike = Union[str, Path]
Identity = Tuple[int, int]


class _Input(NamedTuple):
    given: str  # as the run named it, for the message
    what: str
    real: str
    identity: Optional[Identity]


def _identity(path: PathLike) -> Optional[Identity]:
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return None
    return status.st_dev, status.st_ino


def _resolved(path: PathLike) -> Optional[str]:
    """The path with its symlinks resolved; None for one no file can have (a NUL byte in it)."""
    try:
        return os.path.realpath(path)
    except ValueError:
        return None


def _phase_of(layer) -> str:
    """'training ' or 'test ' when the layer's include rules name one phase, else ''."""
    phases = {rule.phase for rule in layer.include if rule.HasField("phase")}
    return {frozenset([0]): "training ", frozenset([1]): "test "}.get(frozenset(phases), "")


def _read_lines(path: str) -> List[str]:
    """The lines of a list file, or none when it cannot be read (its layer reports that)."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, ValueError):
        return []


class RunInputs:
    """Every file one run reads; `check_output` refuses an output path that would replace one."""

    def __init__(self):
        self._files: List[_Input] = []
        self._folders: List[_Input] = []
        # Images of lists, by resolved path: too many to stat unless an output has hard links.
        self._images: Dict[str, Tuple[str, str]] = {}

    def add(self, path: PathLike, what: str) -> None:
        """A file, or a folder with everything in it (an LMDB: its data.mdb and lock.mdb)."""
        real = _resolved(path)
        if real is None:
            return
        if not os.path.isdir(path):
            self._files.append(_Input(str(path), what, real, _identity(path)))
            return
        self._folders.append(_Input(str(path), what, real, _identity(path)))
        try:
            with os.scandir(path) as entries:
                files = [entry.path for entry in entries if entry.is_file()]
        except OSError:  # unreadable: the run's reader of it says so
            files = []
        for file in files:
            self._files.append(_Input(file, f"in {what}", os.path.realpath(file), _identity(file)))

    def add_image_list(self, list_path: str, root_folder: str, what: str) -> None:
        """An ImageData list and the images it names (root_folder + entry, as Caffe joins them)."""
        self.add(list_path, f"the image list of {what}")
        names = (line.strip().rpartition(" ")[0] for line in _read_lines(list_path))
        self.add_images([root_folder + name for name in names if name], f"an image of {what}")

    def add_images(self, paths: Iterable[str], what: str) -> None:
        """Image files, compared by resolved folder (a list may name a million of them)."""
        folders: Dict[str, str] = {}  # many images, few folders: resolve each folder once
        for path in paths:
            folder, base = os.path.split(path)
            if folder not in folders:
                folders[folder] = _resolved(folder or ".")
            if folders[folder] is not None:
                self._images[os.path.join(folders[folder], base)] = (path, what)

    def add_net_layers(self, layers: Iterable, where: str) -> None:
        """What the given layers of the net in `where` read: LMDBs, image lists and their images,
        HDF5 file lists and their files, mean files, infogain matrices."""
        for layer in layers:
            what = f"layer '{layer.name}' in {where}"
            if layer.type == "Data" and layer.data_param.source:
                self.add(layer.data_param.source, f"the {_phase_of(layer)}LMDB of {what}")
            elif layer.type == "ImageData" and layer.image_data_param.source:
                param = layer.image_data_param
                self.add_image_list(param.source, param.root_folder, f"{_phase_of(layer)}{what}")
            elif layer.type == "HDF5Data" and layer.hdf5_data_param.source:
                source = layer.hdf5_data_param.source
                self.add(source, f"the HDF5 file list of {what}")
                for name in " ".join(_read_lines(source)).split():
                    self.add(name, f"an HDF5 file of {what}")
            elif layer.type == "InfogainLoss" and layer.infogain_loss_param.source:
                self.add(layer.infogain_loss_param.source, f"the infogain matrix of {what}")
            if layer.transform_param.mean_file:
                self.add(layer.transform_param.mean_file, f"the mean file of {what}")

    def check_output(self, path: PathLike, role: str = "") -> None:
        """Refuse `path` (an output; `role` says which, e.g. a snapshot) if it is an input,
        lies inside an input folder, or exists and is not a regular file."""
        label = f"output {path}{f' ({role})' if role else ''}"
        check_target(path, label)
        real = _resolved(path)
        if real is None or is_null_device(path):  # no such file can exist; or the output is discarded
            return
        identity = _identity(path)
        for given in self._files:
            if real == given.real or (identity is not None and identity == given.identity):
                self._refuse(label, "is", given)
        for given in self._folders:
            if os.path.commonpath([real, given.real]) == given.real:
                self._refuse(label, "is inside" if real != given.real else "is", given)
        image = self._images.get(real)
        if image is None and identity is not None and os.stat(path).st_nlink > 1:
            image = next((named for named in self._images.values() if _identity(named[0]) == identity), None)
        if image is not None:
            self._refuse(label, "is", _Input(image[0], image[1], real, identity))

    def check_snapshots(self, prefix: str, iterations: range, suffixes: Sequence[str], role: str) -> None:
        """Refuse a snapshot `<prefix>_iter_<N><suffix>` (N in `iterations`) that would land on
        an input: one named so, one that a file already there shares an inode with, or an
        input folder holding the snapshots' folder."""
        shown, stem = os.path.split(prefix)
        folder = shown or "."
        if len(iterations):
            self.check_output(f"{prefix}_iter_{iterations[-1]}{suffixes[0]}", role)
        pattern = re.compile(re.escape(stem) + r"_iter_(\d+)(" + "|".join(map(re.escape, suffixes)) + r")\Z")
        real_folder = _resolved(folder)
        for given in self._files:
            found = pattern.match(os.path.basename(given.real))
            if found and os.path.dirname(given.real) == real_folder and int(found[1]) in iterations:
                self._refuse(f"output {os.path.join(shown, os.path.basename(given.real))} ({role})", "is", given)
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                found = pattern.match(name)
                if found and int(found[1]) in iterations:
                    self.check_output(os.path.join(shown, name), role)

    @staticmethod
    def _refuse(label: str, relation: str, given: _Input) -> None:
        raise CaffeCompatError(f"{label}: {relation} the input {given.given} ({given.what}); write to another path")
