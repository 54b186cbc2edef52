"""`etokit train bc|dpo`: a training recipe under accelerate's launcher, as `trl dpo` does.

Every flag after the recipe name that is not the launcher's own goes to the recipe unchanged, so
`etokit train dpo --config dpo.yaml --beta 0.5` is `accelerate launch -m etokit.recipes.train_dpo
--config dpo.yaml --beta 0.5`. `etokit train bc --help-recipe` lists the recipe's flags."""

from __future__ import annotations

import os
import subprocess
import sys
from enum import Enum
from typing import Annotated, Optional

import typer

from etokit.cli._errors import user_errors

_EXAMPLES = """
[bold]Examples[/bold]

  $ etokit train bc --model ./tiny --data expert.jsonl --output-dir out/bc
  $ etokit train bc --model HuggingFaceTB/SmolLM2-135M-Instruct --data agent-eto/eto-sft-trajectory \\
      --data-split scienceworld --output-dir out/bc --push-to me/agent --revision bc
  $ etokit train dpo --num-processes 2 --model out/bc --data pairs.jsonl --output-dir out/iter-1
  $ etokit train dpo --accelerate-config ddp --config dpo.yaml   [dim]# a shipped accelerate config, or a file[/dim]
  $ etokit train dpo --help-recipe   [dim]# the recipe's own flags[/dim]
"""


class Recipe(str, Enum):
    bc = "bc"
    dpo = "dpo"


@user_errors
def train(
    ctx: typer.Context,
    recipe: Annotated[
        Recipe, typer.Argument(help="bc (behavioral cloning) or dpo (one ETO iteration's DPO).", show_default=False)
    ],
    num_processes: Annotated[
        Optional[int],
        typer.Option(
            "--num-processes",
            min=1,
            help="Processes to launch (several: data parallel; on a host without GPUs, "
            "gloo ranks). Default: accelerate's default config.",
        ),
    ] = None,
    accelerate_config: Annotated[
        Optional[str],
        typer.Option(
            "--accelerate-config",
            help="accelerate config file, or a config etokit ships: ddp, fsdp, deepspeed_zero3, cpu_2proc.",
        ),
    ] = None,
    help_recipe: Annotated[bool, typer.Option("--help-recipe", help="Print the recipe's flags and exit.")] = False,
) -> None:
    """Launch a training recipe (etokit.recipes.train_bc / train_dpo) with accelerate. Flags other
    than those below go to the recipe (see --help-recipe); exit code is the recipe's."""
    from etokit.recipes.launch import recipe_command

    args = list(ctx.args)
    if help_recipe:
        cmd = recipe_command(recipe.value, ["--help"], launcher=False)
    else:
        cmd = recipe_command(recipe.value, args, accelerate_config=accelerate_config, num_processes=num_processes)
    sys.stdout.flush()
    sys.exit(subprocess.run(cmd, env=os.environ.copy()).returncode)


def register(app: typer.Typer) -> None:
    app.command(
        "train",
        epilog=_EXAMPLES,
        rich_help_panel="ETO",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(train)
