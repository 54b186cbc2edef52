"""`etokit push-expert`, `push-explore`, `push-pairs`: validate a local file, publish it as a Hub
dataset (config = environment, split = iteration) and regenerate its dataset card."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from etokit.cli._console import console

from etokit.cli._errors import user_errors
from etokit.cli._options import (
    CommitMessageOpt,
    ConfigNameOpt,
    DataPathArg,
    EnvOpt,
    LicenseOpt,
    PrivateOpt,
    RepoIdOpt,
    RevisionOpt,
    SplitOpt,
)


_EXAMPLES = {
    "expert": """
[bold]Examples[/bold]

  $ etokit push-expert expert.jsonl --repo-id me/eto-textworld-expert
  $ etokit push-expert webshop_sft.json --env webshop --repo-id me/eto-sft --split train
""",
    "explore": """
[bold]Examples[/bold]

  $ etokit push-explore explore_iter1.jsonl --repo-id me/eto-explore --split iter_1
  $ etokit push-explore explore.parquet --repo-id me/eto-explore --revision dev --private
""",
    "pairs": """
[bold]Examples[/bold]

  $ etokit push-pairs pairs_iter1.jsonl --repo-id me/eto-pairs --split iter_1 --ties 57
  $ etokit push-pairs webshop_pm.json --env webshop --repo-id me/eto-pairs --split iter_1
""",
}


def _push(card: str, path, repo_id, config_name, split, revision, private, commit_message, env, license, ties=None):
    from etokit.data import load_records
    from etokit.hub.publish import CARDS, push_dataset

    kind = CARDS[card][0]
    with console.status(f"Reading {path}..."):
        records = load_records(path, kind, env=env)
    console.print(f"[green]✓[/] {path}: {len(records.records)} valid {kind} rows ({records.format})")
    with console.status(f"Pushing to {repo_id}..."):
        result = push_dataset(
            records,
            repo_id,
            card=card,
            config_name=config_name,
            split=split,
            revision=revision,
            private=private,
            commit_message=commit_message,
            license=license,
            ties=ties,
        )
    console.print(
        f"[green]✓[/] pushed {result.rows} rows to [bold]{result.repo_id}[/] "
        f"config [bold]{result.config_name}[/] split [bold]{result.split}[/] on {result.revision} "
        f"(commit {result.data_commit[:8]}; card {(result.card_commit or '-')[:8]})"
    )
    revision_arg = "" if result.revision == "main" else f', revision="{result.revision}"'
    console.print(
        f'  load_dataset("{result.repo_id}", "{result.config_name}", split="{result.split}"{revision_arg})',
        markup=False,
    )


def _trajectory_command(card: str):
    def command(
        path: DataPathArg,
        repo_id: RepoIdOpt,
        config_name: ConfigNameOpt = None,
        split: SplitOpt = None,
        revision: RevisionOpt = None,
        private: PrivateOpt = False,
        commit_message: CommitMessageOpt = None,
        env: EnvOpt = None,
        license: LicenseOpt = "apache-2.0",
    ) -> None:
        _push(card, path, repo_id, config_name, split, revision, private, commit_message, env, license)

    return user_errors(command)


def register(app: typer.Typer) -> None:
    panel = "Publish to the Hub"
    app.command(
        "push-expert",
        help="Publish expert trajectories (BC data) as a Hub dataset. Default split: train.",
        epilog=_EXAMPLES["expert"],
        rich_help_panel=panel,
    )(_trajectory_command("expert"))
    app.command(
        "push-explore",
        help="Publish exploration trajectories (one split per ETO iteration, e.g. iter_1) as a Hub dataset.",
        epilog=_EXAMPLES["explore"],
        rich_help_panel=panel,
    )(_trajectory_command("explore"))

    @app.command("push-pairs", epilog=_EXAMPLES["pairs"], rich_help_panel=panel)
    @user_errors
    def push_pairs(
        path: DataPathArg,
        repo_id: RepoIdOpt,
        config_name: ConfigNameOpt = None,
        split: SplitOpt = None,
        revision: RevisionOpt = None,
        private: PrivateOpt = False,
        commit_message: CommitMessageOpt = None,
        env: EnvOpt = None,
        license: LicenseOpt = "apache-2.0",
        ties: Annotated[
            Optional[int],
            typer.Option("--ties", min=0, help="Tasks dropped as ties while building the pairs (for the card)."),
        ] = None,
    ) -> None:
        """Publish contrastive trajectory pairs (DPO data) as a Hub dataset.
        Default split: iter_K when every pair has iteration K, else train."""
        _push("pairs", path, repo_id, config_name, split, revision, private, commit_message, env, license, ties)
