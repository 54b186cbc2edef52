"""Option aliases shared by the commands (as huggingface_hub's CLI does), so a flag means the
same thing and reads the same in every `--help`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

RepoIdOpt = Annotated[str, typer.Option("--repo-id", help="Hub repository, as NAMESPACE/NAME.", show_default=False)]
RevisionOpt = Annotated[
    Optional[str], typer.Option("--revision", help="Branch to push to (created when missing). Default: main.")
]
PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the repository as private.")]
CommitMessageOpt = Annotated[Optional[str], typer.Option("--commit-message", "-m", help="Commit message on the Hub.")]
ConfigNameOpt = Annotated[
    Optional[str], typer.Option("--config-name", help="Dataset config (subset). Default: the rows' environment.")
]
SplitOpt = Annotated[
    Optional[str],
    typer.Option("--split", help="Split name, e.g. iter_1 (letters, digits, '_' and '.'; no hyphens)."),
]
EnvOpt = Annotated[
    Optional[str],
    typer.Option("--env", help="Environment of the rows, for official ETO files that do not record it."),
]
LicenseOpt = Annotated[str, typer.Option("--license", help="License identifier written into the dataset card.")]
DataPathArg = Annotated[
    Path,
    typer.Argument(
        help="A .jsonl, .json or .parquet file in etokit's schema or an official ETO format (auto-detected).",
        show_default=False,
    ),
]
