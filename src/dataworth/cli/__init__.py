"""The `dataworth` command line: a thin layer that parses flags, calls one API function and prints.

Each command lives in its own module under `dataworth.cli` and is registered in `COMMANDS` only once it
works. Bad input raises `dataworth.errors.InputError`; here it becomes one line on stderr and exit code 2. So
does an ``OSError`` (permission denied, disk full, read-only file system, a directory where a file belongs):
the user's environment, not a bug, so one line naming the path and the system's reason, not a traceback.
What was already written stays valid: every file is replaced atomically, and a store resumes from its
finished shards.
"""

from __future__ import annotations

import importlib
import sys

import click

from dataworth.errors import InputError, one_line
from dataworth.util import displayable

# (module under dataworth.cli, attribute holding the click command), in the order `--help` lists them.
COMMANDS: list[tuple[str, str]] = [
    ("demo", "demo_command"),
    ("train", "train_command"),
    ("generate", "generate_command"),
    ("extract", "extract_command"),
    ("fit", "fit_command"),
    ("score", "score_command"),
    ("combine", "combine_command"),
    ("report", "report_command"),
    ("value", "value_command"),
    ("select", "select_group"),
    ("index", "index_group"),
    ("eval", "eval_group"),
]


class _Group(click.Group):
    """Click group that turns `InputError` into one line + exit 2, and loads commands lazily."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name.replace("_", "-") for name, _ in COMMANDS]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        for module, attr in COMMANDS:
            if module.replace("_", "-") == cmd_name:
                return getattr(importlib.import_module(f"dataworth.cli.{module}"), attr)
        return None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(os_error_line(exc))


def fail(message: str) -> None:
    """``error: <message>`` on stderr (escaped: a message may quote a path or id from the data), exit 2."""
    click.echo(f"error: {displayable(one_line(message).strip(), one_line=True, reversible=False)}", err=True)
    sys.exit(2)


def os_error_line(exc: OSError) -> str:
    """``path: reason`` for an OSError (``path -> other: reason`` for a rename), or its reason alone.

    ``strerror`` is the system's text for the errno (``Permission denied``, ``No space left on device``);
    errors raised by libraries without an errno keep their own message.
    """
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return reason
    target = f" -> {exc.filename2}" if exc.filename2 is not None else ""
    return f"{exc.filename}{target}: {reason}"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dataworth")
def cli() -> None:
    """dataworth: what is your training data worth to a language model?

    \b
    Example (the whole pipeline on the built-in world):
      dataworth demo --out demo_out
    """


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="dataworth")
