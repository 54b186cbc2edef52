"""How a training recipe is started: the one command line both `etokit train` and `etokit run` use,
and the entry point the started recipe process runs under."""

from __future__ import annotations

import sys
from typing import Sequence

from etokit.configs import resolve
from etokit.errors import EtokitError
from etokit.recipes import RECIPES


def recipe_command(
    recipe: str,
    args: Sequence[str],
    *,
    accelerate_config: str | None = None,
    num_processes: int | None = None,
    launcher: bool = True,
) -> list[str]:
    """The argv that runs ``recipe`` ("bc" or "dpo") with its flags ``args``.

    With ``launcher`` (the default), accelerate's launcher starts it, as `accelerate launch -m
    etokit.recipes.train_bc` would: with ``accelerate_config`` (a file, or a config etokit ships:
    ``ddp``, ``fsdp``, ``deepspeed_zero3``, ``cpu_2proc``), else with ``num_processes`` (several
    processes are ``--multi_gpu``, which on a host without GPUs means gloo ranks: accelerate's
    ``--cpu`` would silently run one), else with the user's default accelerate config. Without it
    (one process, no config), the recipe runs in a plain interpreter: Accelerator() alone sets one
    process up, and the launcher's own torch import is saved.
    """
    module = RECIPES[recipe]
    if not launcher and accelerate_config is None and num_processes is None:
        return [sys.executable, "-m", module, *args]
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        cmd += ["--config_file", str(resolve(accelerate_config, "accelerate"))]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)] + (["--multi_gpu"] if num_processes > 1 else [])
    return [*cmd, "-m", module, *args]


def run_recipe(main) -> None:
    """A recipe script's entry point: a user error is one ``Error:`` line and its exit code, never
    a traceback."""
    from etokit.train.config import redact

    try:
        main()
    except EtokitError as e:
        print(f"Error: {redact(str(e))}", file=sys.stderr)  # a token typed in the wrong place is not echoed
        sys.exit(e.exit_code)
