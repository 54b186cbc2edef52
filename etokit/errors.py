"""Exceptions that mean "the user's input is wrong". The CLI prints them as one line (no
traceback) and exits with code 2; library callers can catch them."""

from __future__ import annotations


class EtokitError(Exception):
    """Bad input: a file, a row, an option, a repo id. The message names what and where."""

    exit_code = 2
