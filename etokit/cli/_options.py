"""Option aliases shared by the commands (as huggingface_hub's CLI does), so a flag means the
same thing and reads the same in every `--help`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Iterable, Optional

import typer

from etokit.errors import EtokitError

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


def env_name(value: str | None) -> str | None:
    """typer callback: an --env must be an environment etokit has (official rows take it as theirs)."""
    from etokit.data.names import check_env_name

    if value is not None:
        try:
            check_env_name(value)
        except EtokitError as e:
            raise typer.BadParameter(str(e).removeprefix("--env: ")) from None
    return value


EnvOpt = Annotated[
    Optional[str],
    typer.Option(
        "--env", callback=env_name, help="Environment of the rows, for official ETO files that do not record it."
    ),
]
ExpertRewardOpt = Annotated[
    Optional[float],
    typer.Option(
        "--expert-reward",
        min=0.0,
        max=1.0,
        help="Reward stated for official expert rows that carry none (WebShop's Hub copy of the paper's "
        "data): the pair rule compares agents with it, so it is never assumed; recorded in each "
        "row's extra and in the cards. ScienceWorld and ALFWorld experts score 1.0 by the official "
        "rule.",
        show_default=False,
    ),
]
HUB_SOURCE_HELP = (
    "a local file (etokit or official ETO format), or a Hub dataset NAMESPACE/NAME[@REVISION][:SPLIT] "
    "(default split: the environment's, e.g. agent-eto/eto-sft-trajectory:scienceworld)"
)
LicenseOpt = Annotated[str, typer.Option("--license", help="License identifier written into the dataset card.")]
DataPathArg = Annotated[
    Path,
    typer.Argument(
        help="A .jsonl, .json or .parquet file in etokit's schema or an official ETO format (auto-detected).",
        show_default=False,
    ),
]


# --- checks shared by the commands ------------------------------------------------------------


def finite_float(value: float | None) -> float | None:
    """typer callback: click's float ranges let NaN through (every comparison with it is false)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"expected a finite number, got {value}")
    return value


def check_output(
    out: Path,
    *,
    inputs: Iterable[Path | None] = (),
    suffixes: tuple[str, ...] | None = None,
    overwrite: bool | None = None,
    option: str = "--out",
) -> None:
    """Refuse an output path before anything is read or computed: a wrong extension, one of the
    command's own inputs (it would be replaced by the output), or, for commands with
    ``--overwrite``, an existing file the user did not ask to replace."""
    if suffixes and out.suffix not in suffixes:
        raise EtokitError(
            f"{option} {out}: expected a {' or '.join(suffixes)} file, got {out.suffix or 'no extension'!r}"
        )
    if out.exists():
        for src in inputs:
            if src is not None and Path(src).exists() and out.resolve() == Path(src).resolve():
                raise EtokitError(f"{option} {out} is the input file; write to another path")
        if out.is_dir():
            raise EtokitError(f"{option} {out} is a folder; expected a file path")
        if overwrite is False:
            raise EtokitError(f"{option} {out} already exists; pass --overwrite to replace it")
