"""`etokit report`: an ETO run as one self-contained HTML page (plots and a pair viewer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from etokit.cli._errors import user_errors
from etokit.cli._options import check_output

_EXAMPLES = """
[bold]Examples[/bold]

  $ etokit report runs/twx --out report.html             [dim]# a local run folder (etokit run --run-dir)[/dim]
  $ etokit report me/twx-agent --out twx.html             [dim]# a Hub model repo made by etokit run[/dim]
  $ etokit report .demo/run --out demo.html --overwrite
"""


@user_errors
def report(
    source: Annotated[
        str,
        typer.Argument(
            metavar="RUN_DIR_OR_REPO",
            show_default=False,
            help="A run folder (with manifest.json) or a Hub model repo NAMESPACE/NAME pushed by `etokit run`.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path("report.html"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
) -> None:
    """Write an ETO run's report: reward and success per stage (95% intervals over tasks), pairs
    won / tied / lost per iteration and mode, BC and DPO training curves, per-task change from BC,
    and a viewer of the contrastive pairs (chosen and rejected side by side, filters, search).
    One HTML file with everything inline: it opens from disk, with no network."""
    from etokit.cli._console import console
    from etokit.report import build_report

    check_output(out, suffixes=(".html", ".htm"), overwrite=overwrite)
    path = build_report(source, out)
    console.print(f"[green]✓[/] report of {source}: {path} ({path.stat().st_size / 1e6:.1f} MB)")


def register(app: typer.Typer) -> None:
    app.command("report", epilog=_EXAMPLES, rich_help_panel="ETO")(report)
