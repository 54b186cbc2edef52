"""The errors etokit's commands end with: one line (no traceback), and an exit code a script can act
on. Library callers can catch them.

| exit code | class | meaning | what a scheduler should do |
|---|---|---|---|
| 2 | EtokitError | bad input: a file, a row, an option, a repo id | not retry: fix the input |
| 3 | ServiceUnavailable | a service (the Hub) still failed after every retry | retry later: the command resumes |
"""

from __future__ import annotations


class EtokitError(Exception):
    """Bad input: a file, a row, an option, a repo id. The message names what and where."""

    exit_code = 2


class ServiceUnavailable(EtokitError):
    """A service etokit depends on (the Hub) kept failing with transient errors (timeouts, 5xx,
    429, dropped connections) past the retry budget. The input was fine: re-running the same
    command later finishes the work, and what already landed is not done twice."""

    exit_code = 3
