"""Outputs are written to a temporary beside the target and renamed, so a reader never
sees half an output and a failed write leaves the old one in place. Files use
`atomic_path` (or `atomic_file`, `write_bytes`, `write_text`); folders built in several
steps (an LMDB, a prepared dataset) use `atomic_folder`.

The temporary is `.NAME.caffe-compat-tmp-HOST-PID-N`: a write killed midway leaves it
behind, and the next write of the same output on the same host removes those whose
process is gone (another host's, in a shared folder, are not this host's to judge).

Every failure to write, a full disk above all, ends in one CaffeCompatError naming the
output: `OUT: cannot be written (no space left on device)`, the temporary removed.

A target that exists and is not a regular file (a device node, a FIFO, a socket) is
refused: renaming over it would replace the node. The null device is the exception:
the output is written through it (discarded), never renamed over it."""
from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Tuple, Type, Union

from ..errors import CaffeCompatError

_MARK = ".caffe-compat-tmp-"
_serial = itertools.count()  # two threads of one process never share a temporary
_HOST = socket.gethostname().replace("/", "_") or "host"
# A write that failed with no errno to show (LMDB reports a short write as EIO, torch's
# own file writer as RuntimeError) is put down to a full disk when less than this is free.
_FULL_BELOW = 1 << 20
# What os.replace raises when a folder appeared at the target: a non-empty one, or a file.
_TAKEN = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)

Failures = Tuple[Type[BaseException], ...]


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


def check_writable(target: Union[str, Path], what: str) -> None:
    """Refuse before any work an output that could not be written at the end: a directory,
    a device node, a folder that takes no new file (read-only, /proc, a file in the way).
    Creates nothing (a probe file in the nearest existing folder comes and goes); the null
    device passes, as it is written through."""
    target = Path(target)
    label = f"{what} {target}"
    if target.is_dir():
        raise CaffeCompatError(f"{label}: is a directory; give a file name")
    check_target(target, label)
    if is_null_device(target):
        return
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".caffe-compat-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CaffeCompatError(f"{label}: cannot write in {folder}: {err.strerror or err}") from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def temporary_of(name: str) -> Optional[str]:
    """The output whose temporary `name` is (a killed write's leftover), else None."""
    if not name.startswith(".") or _MARK not in name:
        return None
    return name[1:name.index(_MARK)] or None


def _remove_stale(target: Path) -> None:
    prefix = f".{target.name}{_MARK}{_HOST}-"
    with os.scandir(target.parent) as entries:
        for entry in entries:
            pid, _, serial = entry.name[len(prefix):].partition("-")
            if (entry.name.startswith(prefix) and pid.isdigit() and serial.isdigit()
                    and not _process_alive(int(pid))):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_failure(err: Optional[BaseException]) -> Optional[OSError]:
    """The OSError behind `err`: itself, or one it was raised from or while handling
    (torch's writer raises RuntimeError while handling its file's OSError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _disk_full(folder: Path) -> bool:
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):  # statvfs is POSIX's
        return False
    # root may write into the blocks reserved for it; others only into the available ones
    blocks = stats.f_bfree if getattr(os, "geteuid", lambda: -1)() == 0 else stats.f_bavail
    return blocks * stats.f_frsize < _FULL_BELOW


def _write_failure(target: Union[str, Path], err: BaseException, failures: Failures = (),
                   folder: Optional[Path] = None) -> Optional[CaffeCompatError]:
    """The one-line error for a write of `target` (into `folder`, by default its own) that
    raised `err`; None when neither an OS failure, nor one of `failures` (a writer's own
    error types), nor a full disk explains it: then it is a fault of ours, shown as it is."""
    cause = _os_failure(err)
    if cause is not None and cause.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif cause is None and _disk_full(folder or Path(target).parent):
        reason = "no space left on device"
    elif cause is not None:
        reason = cause.strerror or str(cause)
    elif isinstance(err, failures):
        reason = str(err) or type(err).__name__
    else:
        return None
    return CaffeCompatError(f"{target}: cannot be written ({reason})")


@contextlib.contextmanager
def _judged(target: Union[str, Path], failures: Failures = (), folder: Optional[Path] = None) -> Iterator[None]:
    """The block's errors as `_write_failure` judges them; what it cannot explain, as it is."""
    try:
        yield
    except CaffeCompatError:
        raise
    except Exception as err:
        failure = _write_failure(target, err, failures, folder)
        if failure is None:
            raise
        raise failure from None


def _temporary(target: Path, create: Callable[[Path], None]) -> Path:
    with _judged(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target)
        tmp = target.parent / f".{target.name}{_MARK}{_HOST}-{os.getpid()}-{next(_serial)}"
        create(tmp)
    return tmp


def _new_file(path: Path) -> None:
    # Created as open() would create it: mode 0666 less the umask.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


@contextlib.contextmanager
def atomic_path(target: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success make it durable and
    rename it to target. Raises CaffeCompatError naming target when it cannot be written
    (see `_write_failure`; errors the block raises are judged the same way)."""
    target = Path(target)
    if target.is_dir():
        raise CaffeCompatError(f"{target}: is a directory; the output must be a file path")
    check_target(target, str(target))
    if is_null_device(target):
        with _written_through(target) as tmp:
            yield tmp
        return
    tmp = _temporary(target, _new_file)
    try:
        with _judged(target):
            yield tmp
            _fsync(tmp, os.O_RDONLY)
            os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # folders cannot be opened for fsync everywhere
        _fsync(target.parent, os.O_RDONLY)


@contextlib.contextmanager
def _written_through(device: Path) -> Iterator[Path]:
    """A temporary (in the system's temporary folder, not the device's) copied into `device`."""
    fd, name = tempfile.mkstemp(prefix=f".{device.name}{_MARK}")
    os.close(fd)
    tmp = Path(name)
    try:
        with _judged(device):
            yield tmp
            with open(tmp, "rb") as source, open(device, "wb") as sink:
                shutil.copyfileobj(source, sink)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_file(target: Union[str, Path]) -> Iterator[BinaryIO]:
    """`atomic_path` as an open binary file; it is closed (and its last writes checked)
    before the rename. Writers given a file report its OSError, where torch given a path
    reports only a RuntimeError."""
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        yield handle


def write_bytes(target: Union[str, Path], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: Union[str, Path], text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def folder_target(target: Union[str, Path]) -> Path:
    """Where a folder output lands: a symbolic link's destination (a folder is renamed over
    that, keeping the link); a dangling link is refused."""
    target = Path(target)
    if not target.is_symlink():
        return target
    if not target.exists():
        raise CaffeCompatError(f"{target}: is a symbolic link to {os.readlink(target)}, which does not exist; "
                               f"give a new or empty folder")
    return target.resolve()


@contextlib.contextmanager
def atomic_folder(target: Union[str, Path], failures: Failures = ()) -> Iterator[Path]:
    """Yield a new temporary folder beside `target` (new, or an empty folder, or a link to
    one); when the block completes rename it to target. Failures are judged as in
    `atomic_path` and remove the temporary; a folder that appeared at target meanwhile
    (another run writing the same output) is left as it is and this run's discarded."""
    named = Path(target)
    target = folder_target(named)
    tmp = _temporary(target, os.mkdir)
    try:
        with _judged(named, failures, target.parent):
            yield tmp
            try:
                os.replace(tmp, target)
            except OSError as err:
                if err.errno not in _TAKEN:
                    raise
                raise CaffeCompatError(f"{named}: was created by another writer while this run built it "
                                       f"(another run to the same output?); it is left as it is and this run's "
                                       f"result discarded") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(OSError):
        _fsync(target.parent, os.O_RDONLY)
