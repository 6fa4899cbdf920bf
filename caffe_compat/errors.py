"""The one exception users see: a message naming the file, layer or field at fault."""


class CaffeCompatError(Exception):
    """Bad input or an unsupported construct; the CLI prints it on one line and exits 2."""
