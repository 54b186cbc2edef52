"""`etokit` command line. One module per command group (as huggingface_hub's CLI); each module
exposes ``register(app)`` and is listed in ``_COMMAND_MODULES``."""

from __future__ import annotations

import importlib

import typer

from etokit import __version__
from etokit.cli._errors import OneLineErrors

app = typer.Typer(
    name="etokit",
    help="ETO (Exploration-based Trajectory Optimization) for LLM agents on the Hugging Face stack.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    cls=OneLineErrors,  # usage errors and stray EtokitErrors as one line, like every other user error
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Imported lazily per module so `etokit --help` does not pay for torch/transformers imports.
_COMMAND_MODULES = [
    "etokit.cli.push",
    "etokit.cli.hub",
    "etokit.cli.envs",
    "etokit.cli.models",
    "etokit.cli.data",
    "etokit.cli.eto",
    "etokit.cli.train",
    "etokit.cli.run",
    "etokit.cli.report",
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"etokit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """ETO in three stages, then a loop: behavioral cloning on expert trajectories, exploration,
    contrastive pairs and DPO. Datasets and checkpoints are published to the Hugging Face Hub."""


for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()
