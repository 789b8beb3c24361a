"""One exception type for bad input, so the CLI can print one line and exit 2 instead of a traceback."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: a file, a line, a field, a flag.

    The message must name *where* (``path:line``, field or flag) and *what* is wrong, in one line.
    The CLI prints ``error: <message>`` and exits with code 2.
    """


def where(path: object, line: int | None = None, field: str | None = None) -> str:
    """Format a location for an error message: ``path:line field 'x'``."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if field is not None:
        loc += f" field '{field}'"
    return loc


def one_line(text: object) -> str:
    """``text`` with its newlines turned into spaces, for a message that must stay on one line."""
    return " ".join(str(text).split("\n"))
