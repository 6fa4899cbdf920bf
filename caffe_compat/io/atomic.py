"""Outputs are written to a temporary file beside the target and renamed, so a reader
never sees half a file and a failed write leaves the old file in place.

The temporary is `.NAME.caffe-compat-tmp-HOST-PID-N`: a write killed midway leaves it
behind, and the next write of the same output on the same host removes those whose
process is gone (another host's, in a shared folder, are not this host's to judge)."""
from __future__ import annotations

import contextlib
import itertools
import os
import socket
from pathlib import Path
from typing import Iterator, Union

from ..errors import CaffeCompatError

_MARK = ".caffe-compat-tmp-"
_serial = itertools.count()  # two threads of one process never share a temporary
_HOST = socket.gethostname().replace("/", "_") or "host"


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


def write_bytes(target: Union[str, Path], data: bytes) -> None:
    with atomic_path(target) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as err:
            raise CaffeCompatError(f"{target}: cannot be written ({err.strerror})") from None


def write_text(target: Union[str, Path], text: str) -> None:
    write_bytes(target, text.encode("utf-8"))
