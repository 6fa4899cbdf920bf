"""C kernels shipped as source, built on first use with the machine's C compiler.

A kernel's shared library is cached under the user's cache folder
($CAFFE_COMPAT_CACHE, else $XDG_CACHE_HOME/caffe-compat or ~/.cache/caffe-compat), in
`native/`, named by a hash of its source, the compiler's version, the flags and the
CPU's feature flags: `-march=native` code is never loaded on a CPU it was not built
for. A build takes seconds (about ten for the LRN kernel on two cores), once per
machine.

Where no library can be had (no compiler, a failed build, a folder that cannot be
written, or CAFFE_COMPAT_NATIVE=0), `library` returns None after one warning, and
callers run their PyTorch form: the same formulas, equal within float32 rounding, and
slower.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

SWITCH_VARIABLE = "CAFFE_COMPAT_NATIVE"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c11", "-fPIC", "-shared")
# With OpenMP a kernel runs on the libgomp torch has loaded (same soname: the loader
# reuses it); a compiler without OpenMP builds a one-thread kernel instead.
OPENMP_FLAGS = ("-fopenmp",)

_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL | None] = {}


def cache_folder() -> Path:
    if os.environ.get("CAFFE_COMPAT_CACHE"):
        return Path(os.environ["CAFFE_COMPAT_CACHE"]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "caffe-compat" / "native"


def library(source: Path) -> ctypes.CDLL | None:
    """The built library of a C source file, or None (warned once per source)."""
    with _lock:
        key = str(source)
        if key not in _libraries:
            _libraries[key] = _build_and_load(source)
        return _libraries[key]


def _build_and_load(source: Path) -> ctypes.CDLL | None:
    if os.environ.get(SWITCH_VARIABLE, "1") == "0":
        return None
    try:
        target = _built(source)
        try:
            return ctypes.CDLL(str(target))
        except OSError:  # a damaged cached build (a full disk, say): once more from scratch
            target.unlink(missing_ok=True)
            return ctypes.CDLL(str(_built(source)))
    except (OSError, subprocess.SubprocessError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"{source.name}: no native build ({reason}); using the slower PyTorch form "
                      f"(set {SWITCH_VARIABLE}=0 to silence this)", stacklevel=3)
        return None


def _built(source: Path) -> Path:
    """The cached library of `source`, compiled first if missing."""
    compiler = shlex.split(os.environ.get("CC", "cc"))
    if not compiler or shutil.which(compiler[0]) is None:
        raise OSError(f"C compiler {' '.join(compiler) or '(empty CC)'!r} not found")
    version = subprocess.run([*compiler, "--version"], capture_output=True, timeout=60).stdout
    digest = hashlib.sha256()
    for part in (source.read_bytes(), version, " ".join(FLAGS + OPENMP_FLAGS).encode(), platform.machine().encode(),
                 _cpu_features().encode()):
        digest.update(part + b"\0")
    folder = cache_folder()
    target = folder / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    if sys.stderr is not None:  # seconds of silence otherwise, in a log as at a terminal
        print(f"caffe-compat: building {source.name} with {compiler[0]}, about 10 s (once per machine)",
              file=sys.stderr, flush=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        # The source is compiled by its absolute path: it includes itself by __FILE__.
        for extra in (OPENMP_FLAGS, ()):
            build = subprocess.run([*compiler, *FLAGS, *extra, "-o", temporary, str(source.resolve()), "-lm"],
                                   capture_output=True, text=True, timeout=300)
            if build.returncode == 0:
                break
        if build.returncode != 0:
            first_error = next((line for line in build.stderr.splitlines() if "error" in line), build.stderr)
            detail = f": {first_error.strip()[:300]}" if first_error.strip() else ""
            raise OSError(f"{' '.join(compiler)} exited with {build.returncode}{detail}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()
