"""The one exception users see: a message naming the file, layer or field at fault; and
how text from a file is shown in messages and output: quoted short, printed escaped."""
import reprlib

QUOTE_LIMIT = 200  # characters of file content one message quotes
MESSAGE_LIMIT = 2000  # characters of one error or warning line on the terminal


class CaffeCompatError(Exception):
    """Bad input or an unsupported construct; the CLI prints it on one line and exits 2."""


def printable(text: str) -> str:
    """`text` with control and other unprintable characters written as escapes (\\n,
    \\x1b, \\u202e): a name from a file can neither start a line of its own nor send the
    terminal a command."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """File content as a message quotes it: a string in quotes, escaped, cut to `limit`
    characters with its full length told; any other value as reprlib writes it, bounded
    in length and depth (a list nested 5,000 deep would overflow repr)."""
    if not isinstance(value, str):
        shown = reprlib.Repr()
        shown.maxstring = shown.maxother = limit
        return shown.repr(value)
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value):,} characters)"


def shortened(text: str, limit: int = QUOTE_LIMIT) -> str:
    """Free text that quotes a file (a parser's complaint) cut to `limit` characters,
    saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def terminal_line(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """An error or warning as one line of at most about `limit` characters: the middle of a
    longer one cut (its start names the file, its end says what is wrong), the rest escaped."""
    if len(message) > limit:
        cut = len(message) - limit
        message = f"{message[:limit // 2]} ...[{cut:,} characters cut]... {message[-(limit // 2):]}"
    return printable(message)
