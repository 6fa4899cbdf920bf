"""Progress of long work through tqdm: a live bar on a terminal, and in a log (stderr
not a terminal) one plain line every `log_every` seconds and at the end, so a log
shows rate and time remaining without carriage-return noise."""
from __future__ import annotations

import sys
from typing import Iterable, Optional, TextIO

from tqdm import tqdm

LOG_EVERY_S = 30.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed} elapsed, {remaining} left, {rate_fmt}]"


class _Lines:
    """A stream for tqdm that turns its in-place redraws into whole lines."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
             unit: str = "it", stream: Optional[TextIO] = None, log_every: float = LOG_EVERY_S) -> tqdm:
    """A tqdm over `iterable` (or updated by hand), drawn on `stream` (stderr)."""
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=_Lines(stream), mininterval=log_every,
                bar_format=LOG_FORMAT, ascii=True)
