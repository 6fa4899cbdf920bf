"""How much memory a net may take: sizes as users write them ('8G'), and what this
process can still allocate (free RAM, and the address-space limit when one is set);
and the C allocator's setting for training."""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import platform
import re
from typing import Mapping, Optional, Sequence, Union

from .errors import CaffeCompatError

_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: Union[str, int, float], what: str = "--max-memory") -> int:
    """'8G', '512M', '1.5GB', '4096' (bytes) -> bytes; units are powers of 1024."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        size = int(text)
    else:
        match = _SIZE.fullmatch(str(text))
        if not match:
            raise CaffeCompatError(f"{what} {text!r}: expected a size such as 8G, 512M or 1048576 (bytes)")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise CaffeCompatError(f"{what} {text!r}: must be positive")
    return size


def format_size(size: int) -> str:
    for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _address_space_left() -> Optional[int]:
    """What RLIMIT_AS still allows this process to map, or None without a limit."""
    try:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError):
        return None
    if limit == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status", encoding="ascii") as lines:
            used = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmSize:"))
    except (OSError, ValueError, StopIteration):
        used = 0
    return max(0, limit - used)


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate, as far as the system says; None when unknown."""
    known = [n for n in (_meminfo_available(), _address_space_left()) if n is not None]
    return min(known) if known else None


def _device_memory(device) -> Optional[int]:
    """Free bytes on `device` (a torch.device or its name): the GPU's own for CUDA, else
    what this process can allocate."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def check_blob_memory(blob_shapes: Mapping[str, Sequence[int]], where: str, gradients: bool = False,
                      device="cpu") -> None:
    """Running a net holds every blob at once (training, each with its gradient): refuse,
    before any is allocated, blobs that cannot fit in the memory available on `device`."""
    budget = _device_memory(device)
    copies = 2 if gradients else 1
    sizes = {name: 4 * copies * math.prod(shape) for name, shape in blob_shapes.items()}
    if budget is None or sum(sizes.values()) <= budget:
        return
    largest = max(sizes, key=sizes.get)
    what = "its blobs and their gradients" if gradients else "its blobs"
    raise CaffeCompatError(f"{where}: {what} need {format_size(sum(sizes.values()))} (blob '{largest}' "
                           f"{tuple(blob_shapes[largest])} alone {format_size(sizes[largest])}), more than "
                           f"the memory available on {device} ({format_size(budget)})")


# glibc's mallopt parameters, and the environment variables by which a user sets them
# (their setting is left alone).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
KEEP_FREED_MEMORY_SWITCH = "CAFFE_COMPAT_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory torch frees for its next tensors, as Caffe keeps
    its blobs from one pass to the next. By default glibc maps each block over its mmap
    threshold (32 MB at most) afresh and unmaps it when freed, and trims its heap: every
    training pass then pays a page fault per 4 KiB of its large tensors (measured: 1.2-1.4x
    the iteration of the paper's net at batch 32 on CPU). Kept, the process's resident size
    does not shrink until it ends. For the whole process (a second call changes nothing), on
    glibc only, unless the user set glibc's own MALLOC_* variables or
    CAFFE_COMPAT_KEEP_FREED_MEMORY=0; True when applied."""
    if os.environ.get(KEEP_FREED_MEMORY_SWITCH, "1") == "0" or any(v in os.environ for v in _MALLOC_ENVIRONMENT):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # no block of its own mapping, and no trimming of the heap (-1 turns it off)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))
    except (OSError, AttributeError):
        return False
