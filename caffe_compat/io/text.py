"""Text-format messages (net and solver prototxts), screened before anything parses
them: protobuf's text parser takes quadratic time on long runs of backslashes (a
40,000-character string took 17 s) and never ends on a megabyte, and a regular
expression over an unterminated string full of escaped quotes is quadratic too, so
text that is no plausible prototxt is refused first, naming the line."""
from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import text_format

from ..errors import CaffeCompatError
from .schema import check_strings

MAX_LINE = 1 << 20
_MAX_DETAIL = 300  # protobuf quotes the offending text, however long
# Real prototxts escape one character at a time; protobuf's unescaping backtracks over a
# whole run of backslashes from each of its positions.
MAX_BACKSLASH_RUN = 64

# One token the screen cares about: a whole quoted string, a comment, or a stray quote
# (an opening quote whose string does not end on its line).
_TOKEN = re.compile(r""""(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|#[^\n]*|["']""")
_BACKSLASHES = re.compile(r"\\{%d,}" % (MAX_BACKSLASH_RUN + 1))


def looks_binary(data: bytes) -> bool:
    head = data[:4096]
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        # A multi-byte character cut at the 4096-byte boundary is still text.
        return err.start < len(head) - 4
    return False


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def decode_text(path: Path, data: bytes, what: str) -> str:
    """The file's text, screened; raises naming the line that cannot be a valid `what`."""
    if looks_binary(data):
        raise CaffeCompatError(f"{path}: looks like a binary file, expected a text {what}"
                               + (" (is it a caffemodel? pass it as the weights)" if what == "prototxt" else ""))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise CaffeCompatError(f"{path}: line {line}: not valid UTF-8 text (byte {err.start}), "
                               f"expected a text {what}") from None
    start = 0
    while start <= len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        if end - start > MAX_LINE:
            raise CaffeCompatError(f"{path}: line {_line_of(text, start)} is longer than {MAX_LINE} characters; "
                                   f"not a {what}")
        start = end + 1
    for token in _TOKEN.finditer(text):
        if len(token.group()) == 1:
            raise CaffeCompatError(f"{path}: line {_line_of(text, token.start())}: a string opened with "
                                   f"{token.group()} never ends on its line; not a valid {what}")
        run = _BACKSLASHES.search(token.group()) if token.group()[0] != "#" else None
        if run:
            raise CaffeCompatError(f"{path}: line {_line_of(text, token.start())}: a string holds a run of "
                                   f"{len(run.group())} backslashes (at most {MAX_BACKSLASH_RUN} accepted)")
    return text


def parse_text(path: Path, text: str, message, what: str, allow_unknown: bool = False):
    """`message`, filled from `text` (screened by decode_text); every failure names `path`.
    `allow_unknown` skips fields the schema lacks (the caller lists them)."""
    try:
        text_format.Parse(text, message, allow_unknown_field=allow_unknown)
    except text_format.ParseError as err:
        detail = str(err).replace("\n", " ")
        detail = detail if len(detail) <= _MAX_DETAIL else detail[:_MAX_DETAIL] + "..."
        raise CaffeCompatError(f"{path}: not a valid {what}: {detail}") from None
    except RecursionError:
        raise CaffeCompatError(f"{path}: not a valid {what}: messages nested too deeply") from None
    check_strings(message, str(path))
    return message
