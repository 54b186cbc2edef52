"""User errors end a command with one clear line and a non-zero exit code, never a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

from etokit.cli._console import err_console
from etokit.errors import EtokitError  # re-exported for commands

F = TypeVar("F", bound=Callable)



def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]Error:[/] {message}", markup=True)
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


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
