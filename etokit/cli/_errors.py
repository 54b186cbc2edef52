"""User errors end a command with one clear line and a non-zero exit code, never a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 runs on its own vendored copy of click: its exceptions are those classes
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer uses click itself
    import click

from etokit.cli._console import err_console
from etokit.errors import EtokitError  # re-exported for commands

F = TypeVar("F", bound=Callable)


def fail(message: str, code: int = 2) -> None:
    from etokit.train.config import redact

    # An error may quote what the user typed; a token typed in the wrong place is not echoed back.
    err_console.print(f"[bold red]Error:[/] {redact(message)}", markup=True)
    sys.exit(code)


def user_errors(func: F) -> F:
    """Turn etokit's user-facing exceptions into a one-line error and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EtokitError as e:
            fail(_escape(str(e)), e.exit_code)

    return wrapper  # type: ignore[return-value]


class OneLineErrors(TyperGroup):
    """The root command group. Every error a user can cause ends as one ``Error: ...`` line and
    its exit code: click's usage errors (a bad option value, an unknown option, a missing
    argument), which typer would draw as a multi-line box that wraps long paths at the terminal
    width, and an EtokitError raised outside ``user_errors`` (an option callback, a command that
    forgot the decorator). Anything else is a bug and keeps its traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra: Any):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            sys.exit(e.exit_code)  # the help is already printed
        except click.exceptions.ClickException as e:
            fail(_escape(_one_line(e)), e.exit_code)
        except typer.Abort:
            err_console.print("Aborted!")
            sys.exit(1)
        except EtokitError as e:
            fail(_escape(str(e)), e.exit_code)
        # Without standalone mode, click returns what the command returned, or the code of an Exit.
        sys.exit(rv if isinstance(rv, int) else 0)


def _one_line(e: "click.exceptions.ClickException") -> str:
    message = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click.exceptions.UsageError) and ctx is not None:
        message += f" (see '{ctx.command_path} {ctx.help_option_names[0]}')"
    return message


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
