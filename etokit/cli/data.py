"""`etokit validate`, `etokit import-eto`, `etokit export-eto`: check and convert trajectory/pair files."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from etokit.cli._console import console
from rich.markup import escape
from rich.table import Table

from etokit.cli._errors import user_errors
from etokit.cli._options import HUB_SOURCE_HELP, DataPathArg, EnvOpt, ExpertRewardOpt, check_output


class Kind(str, Enum):
    trajectory = "trajectory"
    pair = "pair"


KindOpt = Annotated[
    Optional[Kind], typer.Option("--kind", help="Fail unless the file holds this kind of record.", show_default=False)
]
ImportSplitOpt = Annotated[str, typer.Option("--split", help="Split recorded on imported official SFT rows.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of a table.")]

_EXAMPLES = {
    "validate": (
        "etokit validate expert.jsonl",
        "etokit validate webshop_sft.json --env webshop",
        "etokit validate pairs.parquet --kind pair --json",
    ),
    "import-eto": (
        "etokit import-eto webshop_sft.json --env webshop --out expert.jsonl",
        "etokit import-eto agent-eto/eto-sft-trajectory:scienceworld --out sciworld.jsonl",
        "etokit import-eto agent-eto/eto-sft-trajectory:webshop --expert-reward 1.0 --out webshop.jsonl",
        "etokit import-eto alfworld_sft.json --out alfworld.jsonl",
        "etokit import-eto webshop_pm.json --env webshop --out pairs.jsonl --overwrite",
    ),
    "export-eto": (
        "etokit export-eto expert.jsonl --out webshop_sft.json",
        "etokit export-eto pairs.jsonl --out webshop_pm.json",
    ),
}


def _epilog(command: str) -> str:
    return "[bold]Examples[/bold]\n\n" + "\n".join(f"  $ {line}" for line in _EXAMPLES[command])


def validate(
    path: DataPathArg,
    kind: KindOpt = None,
    env: EnvOpt = None,
    split: ImportSplitOpt = "train",
    as_json: JsonOpt = False,
) -> None:
    """Check every row of a trajectory or pair file and summarise it.

    Reads etokit files and the official ETO formats (auto-detected). The first problem is reported with its row and field, and the command exits with code 2.
    """
    from etokit.data import load_records, pair_stats, trajectory_stats

    records = load_records(path, kind.value if kind else None, env=env, split=split)
    stats = trajectory_stats(records.records) if records.kind == "trajectory" else pair_stats(records.records)
    if as_json:
        typer.echo(
            json.dumps({"path": str(path), "format": records.format, "kind": records.kind, "stats": stats}, indent=2)
        )
        return
    console.print(
        f"[green]✓[/] {escape(str(path))}: format [bold]{records.format}[/], {_count(len(records), records.kind)}"
    )
    console.print(_stats_table(stats))


def import_eto(
    source: Annotated[str, typer.Argument(help=f"Official ETO data: {HUB_SOURCE_HELP}.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="etokit JSONL file to write.", show_default=False)],
    env: EnvOpt = None,
    split: ImportSplitOpt = "train",
    expert_reward: ExpertRewardOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Convert an official ETO file (SFT trajectories or preference pairs) to etokit JSONL.

    Nothing is lost: the original id type, the row's own fields and key order are kept in each record's `extra`, so `etokit export-eto` gives back the same rows.
    """
    from etokit.data import write_jsonl
    from etokit.data.sources import load_source

    _check_out(out, Path(source), (".jsonl",), overwrite)
    records = load_source(
        source, env=env, split=split, formats=("eto-sft", "eto-pairs"), expert_reward=expert_reward, option="SOURCE"
    )
    write_jsonl(out, records)
    typer.echo(
        f"Imported {_count(len(records), records.kind)} ({records.format}, env {records.records[0].env}) to {out}"
    )


def export_eto(
    path: DataPathArg,
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="File to write: .json (a list, as the official code writes) or .jsonl.", show_default=False
        ),
    ],
    overwrite: OverwriteOpt = False,
) -> None:
    """Convert an etokit trajectory or pair file to the official ETO format (from/value turns)."""
    from etokit.data import load_records, to_eto_rows, write_json
    from etokit.data.io import atomic_write

    _check_out(out, path, (".json", ".jsonl"), overwrite)
    records = load_records(path, formats=("etokit-trajectory", "etokit-pair"))
    rows = to_eto_rows(records)
    if out.suffix == ".json":
        write_json(out, rows)
    else:
        with atomic_write(out) as f:
            for row in rows:
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    typer.echo(f"Exported {_count(len(rows), records.kind)} to {out}")


def _check_out(out: Path, src: Path, suffixes: tuple[str, ...], overwrite: bool) -> None:
    check_output(out, inputs=(src,), suffixes=suffixes, overwrite=overwrite)


def _count(n: int, kind: str) -> str:
    return f"{n} {kind}" if n == 1 else f"{n} {'trajectories' if kind == 'trajectory' else 'pairs'}"


def _stats_table(stats: dict) -> Table:
    table = Table(show_header=True, header_style="bold")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        if key == "reward_histogram":
            edges, counts = value["edges"], value["counts"]
            for lo, hi, n in zip(edges, edges[1:], counts):
                table.add_row(f"reward in [{lo:.1f}, {hi:.1f}{']' if hi == 1.0 else ')'}", str(n))
        elif isinstance(value, dict):
            for name, n in value.items():
                table.add_row(f"{key}: {name}", str(n))
        else:
            table.add_row(key, _fmt(value))
    return table


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def register(app: typer.Typer) -> None:
    for name, func in (("validate", validate), ("import-eto", import_eto), ("export-eto", export_eto)):
        app.command(name, epilog=_epilog(name), rich_help_panel="Data files")(user_errors(func))
