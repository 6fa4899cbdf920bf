"""Outputs are written to a temporary file beside the target and renamed, so a reader
never sees half a file and a failed write leaves the old file in place.

The temporary is `.NAME.caffe-compat-tmp-HOST-PID-N`: a write killed midway leaves it
behind, and the next write of the same output on the same host removes those whose
process is gone (another host's, in a shared folder, are not this host's to judge).

A target that exists and is not a regular file (a device node, a FIFO, a socket) is
refused: renaming over it would replace the node. The null device is the exception:
the output is written through it (discarded), never renamed over it."""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Iterator, Union

from ..errors import CaffeCompatError

_MARK = ".caffe-compat-tmp-"
_serial = itertools.count()  # two threads of one process never share a temporary
_HOST = socket.gethostname().replace("/", "_") or "host"


_SPECIAL_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                  (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def is_null_device(path: Union[str, Path]) -> bool:
    """Whether `path` is the null device: /dev/null, or any node with its device numbers."""
    try:
        status = os.stat(path)
        return stat.S_ISCHR(status.st_mode) and status.st_rdev == os.stat(os.devnull).st_rdev
    except (OSError, ValueError):
        return False


def check_target(target: Union[str, Path], label: str) -> None:
    """Refuse an output path that exists as a device node, FIFO or socket (the null device aside)."""
    try:
        mode = os.stat(target).st_mode
    except (OSError, ValueError):  # absent (or unreachable: writing it will say so)
        return
    for is_kind, kind in _SPECIAL_KINDS:
        if is_kind(mode) and not is_null_device(target):
            raise CaffeCompatError(f"{label}: is {kind}, not a regular file; write to a file path "
                                   f"(or {os.devnull} to discard the output)")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale(target: Path) -> None:
    prefix = f".{target.name}{_MARK}{_HOST}-"
    with os.scandir(target.parent) as entries:
        for entry in entries:
            pid, _, serial = entry.name[len(prefix):].partition("-")
            if (entry.name.startswith(prefix) and pid.isdigit() and serial.isdigit()
                    and not _process_alive(int(pid))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success make it durable and
    rename it to target. Raises CaffeCompatError naming target when it cannot be written."""
    target = Path(target)
    if target.is_dir():
        raise CaffeCompatError(f"{target}: is a directory; the output must be a file path")
    check_target(target, str(target))
    if is_null_device(target):
        with _written_through(target) as tmp:
            yield tmp
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target)
        tmp = target.parent / f".{target.name}{_MARK}{_HOST}-{os.getpid()}-{next(_serial)}"
        # Created as open() would create it: mode 0666 less the umask.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as err:
        raise CaffeCompatError(f"{target}: cannot be written ({err.strerror})") from None
    try:
        yield tmp
        try:
            _fsync(tmp, os.O_RDONLY)
            os.replace(tmp, target)
        except OSError as err:
            raise CaffeCompatError(f"{target}: cannot be written ({err.strerror})") from None
        with contextlib.suppress(OSError):  # folders cannot be opened for fsync everywhere
            _fsync(target.parent, os.O_RDONLY)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def _written_through(device: Path) -> Iterator[Path]:
    """A temporary (in the system's temporary folder, not the device's) copied into `device`."""
    fd, name = tempfile.mkstemp(prefix=f".{device.name}{_MARK}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        try:
            with open(tmp, "rb") as source, open(device, "wb") as sink:
                shutil.copyfileobj(source, sink)
        except OSError as err:
            raise CaffeCompatError(f"{device}: cannot be written ({err.strerror})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes(target: Union[str, Path], data: bytes) -> None:
    with atomic_path(target) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as err:
            raise CaffeCompatError(f"{target}: cannot be written ({err.strerror})") from None


def write_text(target: Union[str, Path], text: str) -> None:
    write_bytes(target, text.encode("utf-8"))
