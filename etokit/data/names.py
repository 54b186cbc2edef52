"""Names that end up in Hub URLs and cache paths: repo ids, revisions, environment names.

They are checked where they enter etokit (a CLI option, a config key), before anything is read or
written: a revision like ``../../x`` or a repo id like ``/etc/x`` would otherwise reach URL paths
and the local cache as-is. ``option`` is how the user wrote the name (``--revision``, ``'revision'
in run.yaml``); every error names it and the value.
"""

from __future__ import annotations

import re

from etokit.errors import EtokitError

# git check-ref-format, which the Hub enforces on branches and tags: no "..", no "@{", no component
# starting with "." or ending with ".lock", none of these characters, no control characters.
_REF_BAD_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def check_repo_id(value: str, option: str) -> str:
    """``value`` if it is a Hub repo id of the form NAMESPACE/NAME, else an EtokitError."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(value, str) or value.count("/") != 1:
        raise EtokitError(f"{option} must be NAMESPACE/NAME, got {value!r}")
    try:
        validate_repo_id(value)
    except HFValidationError as e:
        raise EtokitError(f"{option} {value!r} is not a valid Hub repo id: {str(e).splitlines()[0]}") from None
    return value


def check_revision(value: str, option: str) -> str:
    """``value`` if it can name a branch, tag or commit on the Hub, else an EtokitError."""
    problem = _revision_problem(value)
    if problem:
        raise EtokitError(f"{option} {value!r} is not a valid revision: {problem}")
    return value


def _revision_problem(value: str) -> str | None:
    if not isinstance(value, str) or not value:
        return "expected a branch, tag or commit name"
    if value.startswith("/") or value.endswith("/") or "//" in value:
        return "it starts or ends with '/' or has an empty path component"
    if value.startswith("-"):
        return "it starts with '-'"
    if ".." in value or "@{" in value or value == "@":
        return "'..', '@{' and a lone '@' are not allowed (git ref rules)"
    bad = _REF_BAD_CHARS.search(value)
    if bad:
        return f"character {bad.group()!r} is not allowed (git ref rules)"
    for part in value.split("/"):
        if part.startswith(".") or part.endswith(".lock"):
            return f"component {part!r} starts with '.' or ends with '.lock'"
    if value.endswith("."):
        return "it ends with '.'"
    return None


def check_env_name(value: str, option: str = "--env") -> str:
    """``value`` if it is a registered environment or a ``package.module:Class`` plugin path."""
    from etokit.envs.registry import ENV_CLASSES

    if value in ENV_CLASSES or (":" in value and all(value.partition(":")[::2])):
        return value
    raise EtokitError(f"{option}: unknown environment {value!r}; valid names: {', '.join(ENV_CLASSES)}")
