"""`etokit envs list` (which environments run here) and `etokit expert` (expert trajectories: the
behavioral-cloning data of ETO's first stage)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated, Optional

import typer
from etokit.cli._console import console
from rich.table import Table

from etokit.cli._errors import user_errors
from etokit.cli._options import finite_float
from etokit.errors import EtokitError


EnvNameOpt = Annotated[
    str,
    typer.Option(
        "--env", help="Environment: webshop, scienceworld, alfworld or textworld-express.", show_default=False
    ),
]
TaskSplitOpt = Annotated[str, typer.Option("--split", help="Task split: train, test-seen or test-unseen.")]
LimitOpt = Annotated[
    Optional[int], typer.Option("--limit", min=1, help="Only the first N tasks of the split (after --seed's shuffle).")
]
WorkersOpt = Annotated[int, typer.Option("--workers", "-j", min=1, help="Environment processes run in parallel.")]
OutOpt = Annotated[
    Path,
    typer.Option(
        "--out", "-o", help="JSONL file the trajectories are appended to (resumed when it exists).", show_default=False
    ),
]
SeedOpt = Annotated[
    Optional[int],
    typer.Option(
        "--seed",
        help="Shuffle the task order with this seed before --limit (a reproducible "
        "random subset). Default: the split's order.",
    ),
]
StepTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--step-timeout",
        min=1.0,
        callback=finite_float,
        help="Seconds an environment call may take before its worker is killed and the episode reported as an error.",
    ),
]

_LIST_EXAMPLES = """
[bold]Examples[/bold]

  $ etokit envs list
"""

_EXPERT_EXAMPLES = """
[bold]Examples[/bold]

  $ etokit expert --env textworld-express --split train --limit 200 --out expert.jsonl
  $ etokit expert --env scienceworld --split train --workers 2 --out sciworld_expert.jsonl
  $ etokit expert --env textworld-express --split train --limit 500 --out expert.jsonl   [dim]# resumes: skips ids already in the file[/dim]
"""


def envs_list() -> None:
    """Show each environment, whether it can run on this machine, and how to install it if not."""
    from etokit.envs.registry import ENV_CLASSES, available

    table = Table(title="etokit environments")
    table.add_column("environment", style="bold")
    table.add_column("status")
    table.add_column("detail / install")
    status = available()
    for name, (ok, detail) in status.items():
        table.add_row(name, "[green]ok[/]" if ok else "[red]missing[/]", detail)
    console.print(table)
    console.print(f"[dim]{sum(ok for ok, _ in status.values())}/{len(ENV_CLASSES)} available[/]")


@user_errors
def expert(
    env: EnvNameOpt,
    out: OutOpt,
    split: TaskSplitOpt = "train",
    limit: LimitOpt = None,
    workers: WorkersOpt = 1,
    seed: SeedOpt = None,
    step_timeout: StepTimeoutOpt = 60.0,
) -> None:
    """Play the environment's expert (gold actions) on every task of a split through the agent
    protocol and append each successful trajectory to --out. The expert plays its whole gold path,
    even past the agent's step limit. Re-running skips the task ids already in the file; experts that
    fail or error are reported with the reason and not written."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from etokit.agent.protocol import expert_trajectory
    from etokit.data import JsonlAppender
    from etokit.envs.base import SPLITS
    from etokit.envs.registry import env_class
    from etokit.envs.worker import WorkerPool

    if split not in SPLITS:
        raise EtokitError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    ok, detail = env_class(env).check()
    if not ok:
        raise EtokitError(f"--env {env}: not available here ({detail})")

    with JsonlAppender(out, "trajectory") as appender:
        with console.status(f"Starting {workers} {env} worker(s)..."):
            pool = WorkerPool(env, {}, n=workers, step_timeout=step_timeout)
        try:
            task_ids = pool.workers[0].task_ids(split)
            if seed is not None:
                random.Random(seed).shuffle(task_ids)
            task_ids = task_ids[:limit] if limit else task_ids
            todo = [t for t in task_ids if t not in appender.existing_ids]
            skipped = len(task_ids) - len(todo)
            rewards, written, failed, errors = [], 0, [], []
            columns = (
                TextColumn("[bold]expert[/] {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ok {task.fields[ok]}  fail {task.fields[fail]}"),
            )
            with Progress(*columns, console=console, transient=False) as progress:
                bar = progress.add_task(f"{env}/{split}", total=len(todo), ok=0, fail=0)
                for outcome in pool.map(lambda worker, task_id: expert_trajectory(worker, task_id, split), todo):
                    if outcome.error is not None:
                        errors.append((outcome.item, outcome.error.splitlines()[-1]))
                    else:
                        trajectory = outcome.value
                        rewards.append(trajectory.reward)
                        if trajectory.success:
                            appender.append(trajectory)
                            written += 1
                        else:
                            failed.append((outcome.item, _failure_reason(trajectory)))
                    progress.update(bar, advance=1, ok=written, fail=len(failed) + len(errors))
        finally:
            pool.close()
        total = appender.count

    for task_id, why in failed:
        console.print(f"[yellow]expert failed[/] {task_id}: {why}")
    for task_id, why in errors:
        console.print(f"[red]error[/] {task_id}: {why}")
    played = len(rewards)
    avg = sum(rewards) / played if played else 0.0
    rate = written / played if played else 0.0
    console.print(
        f"[green]✓[/] {env}/{split}: {written} written, {skipped} already in {out}, {len(failed)} failed, "
        f"{len(errors)} errors; avg reward {avg:.3f}, success rate {rate:.1%} over {played} played; "
        f"{total} trajectories in {out}"
    )


def _failure_reason(trajectory) -> str:
    """Why an expert did not succeed: its gold path ran out, or the episode ended before it did."""
    planned = trajectory.extra.get("expert_actions", trajectory.num_steps)
    played = f"after {trajectory.num_steps} of {planned} gold actions"
    if trajectory.num_steps < planned:
        return f"reward {trajectory.reward:.2f}: the episode ended {played}"
    return f"reward {trajectory.reward:.2f} {played} (the gold path ended short of the goal)"


def register(app: typer.Typer) -> None:
    envs_app = typer.Typer(
        name="envs",
        help="Environments: what is installed and usable here.",
        no_args_is_help=True,
        rich_markup_mode="rich",
    )
    envs_app.command("list", epilog=_LIST_EXAMPLES)(envs_list)
    app.add_typer(envs_app, name="envs", rich_help_panel="Environments")
    app.command("expert", epilog=_EXPERT_EXAMPLES, rich_help_panel="Environments")(expert)
