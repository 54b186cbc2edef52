"""`etokit run`: the whole ETO loop (BC, then explore -> pairs -> DPO iterations), resumable."""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated

import typer

from etokit.cli._errors import user_errors

_EXAMPLES = """
[bold]Examples[/bold]

  $ etokit run --config textworld-express --run-dir runs/twx --push-to me/twx-agent   [dim]# a shipped config[/dim]
  $ etokit run --config my-run.yaml --iterations 1 --dpo-schedule.beta 0.1 --dpo-schedule.learning-rate 1e-6
  $ etokit run --config demo --bc.learning-rate 1e-3 --bc.lora --dpo.batch-size 16   [dim]# the recipes' options[/dim]
  $ etokit run --config webshop --accelerate-config ddp
  $ etokit run --config demo --resume   [dim]# after a crash: continues at the first unfinished stage[/dim]

Shipped configs: alfworld, scienceworld, textworld-express, webshop (the paper's hyperparameters), demo,
demo-smollm2; shipped accelerate configs: ddp, fsdp, deepspeed_zero3, cpu_2proc.
"""


def _options_help() -> str:
    from etokit.run.config import DPO_RUN_SETS, RunConfig
    from etokit.train.config import section_class

    hints = typing.get_type_hints(RunConfig)
    lines = ["[bold]Config keys[/bold] (YAML keys, or flags --key-name VALUE; lists: --key a b c)", ""]
    for f in dataclasses.fields(RunConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        section = section_class(hints[f.name])
        if section is None:
            kind = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
            lines.append(
                f"  --{f.name.replace('_', '-')} ({kind}, default {default!r}) {f.metadata.get('help', '')}".rstrip()
            )
            continue
        # A section: YAML `bc: {learning_rate: 1e-5}`, flags --bc.learning-rate 1e-5 (--bc.no-lora, ...).
        keys = ", ".join(
            f"{k.name.replace('_', '-')} {getattr(default, k.name)!r}"
            for k in dataclasses.fields(section)
            if k.name not in DPO_RUN_SETS or f.name == "dpo_schedule"
        )
        lines.append(f"  --{f.name.replace('_', '-')}.KEY VALUE  {f.metadata.get('help', '')}: {keys}")
    return "\n".join(lines).replace("[", r"\[").replace(r"\[bold]Config keys\[/bold]", "[bold]Config keys[/bold]")


@user_errors
def run(
    ctx: typer.Context,
    config: Annotated[
        typing.Optional[str],
        typer.Option(
            "--config",
            "-c",
            help="YAML file of config keys (below), or the name of a config etokit ships.",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --run-dir from its first unfinished stage (the config must be the same).",
        ),
    ] = False,
) -> None:
    """Run ETO end to end: expert data (played or given) -> behavioral cloning -> evaluation on
    test-seen / test-unseen -> N iterations of exploration, contrastive pairs (vs the expert), DPO
    (reference = the policy that explored) and evaluation. Every dataset and checkpoint goes to the
    Hub (checkpoints as branch + tag `bc`, `iter-1`, ...). Config: defaults < --config YAML < flags.
    The BC and DPO recipes' options are the sections `bc:` / `dpo:` (flags --bc.NAME, --dpo.NAME);
    DPO's beta and learning rate per iteration are `dpo_schedule:`. Each finished stage is recorded in <run-dir>/manifest.json; results go to <run-dir>/results.json,
    plots and a pair viewer to <run-dir>/report.html (rewritten as each checkpoint is pushed)."""
    from etokit.cli._console import print_unwrapped
    from etokit.run import Run, RunConfig, console, results_table
    from etokit.train.config import parse_config

    from etokit.configs import resolve

    argv = (["--config", str(resolve(config))] if config else []) + list(ctx.args)
    cfg = parse_config(RunConfig, argv)
    rows = Run(cfg, resume=resume).run()
    print_unwrapped(results_table(rows), on=console)
    console.print(
        f"[green]✓[/] results in {cfg.run_dir}/results.json; checkpoints at {cfg.push_to} "
        f"({', '.join(r['model'] for r in rows)}); report in {cfg.run_dir}/report.html"
    )


def register(app: typer.Typer) -> None:
    app.command(
        "run",
        epilog=_EXAMPLES + "\n" + _options_help(),
        rich_help_panel="ETO",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(run)
