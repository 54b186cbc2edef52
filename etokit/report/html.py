"""The run report as one self-contained HTML file: styles, script, figures (inline SVG) and data
(inline JSON) all in the page, so it opens from disk with no network.

The pairs are the large part (10,000 pairs of multi-turn trajectories). Two things keep the page
fast: every distinct message is stored once (a run's prompts are all the same instruction and
1-shot example, and the expert side of a pair repeats across iterations), and the page parses only
the small per-pair index when it opens; the message texts are parsed the first time a pair is
opened, and only one page of the list is ever in the DOM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from etokit.report.plots import Plot, label, make_plots, stage_intervals, task_changes
from etokit.report.source import EVAL_SPLITS, RunData

TEMPLATES = Path(__file__).resolve().parent / "templates"
ROLES = {"system": "s", "user": "u", "assistant": "a"}


def pair_payload(data: RunData) -> tuple[dict[str, Any], list[list[str]]]:
    """(index, messages): the index has one row per pair ``[iteration, mode, outcome, task_id,
    chosen_reward, rejected_reward, prompt, chosen, rejected]`` where the last three are lists of
    ids into ``messages`` (``[role letter, content]``, each distinct message once)."""
    table: dict[tuple[str, str], int] = {}
    messages: list[list[str]] = []

    def ids(msgs) -> list[int]:
        out = []
        for m in msgs:
            key = (ROLES.get(m["role"], m["role"]), m["content"])
            if key not in table:
                table[key] = len(messages)
                messages.append(list(key))
            out.append(table[key])
        return out

    order = sorted(range(len(data.pairs)), key=lambda i: (data.pairs[i].iteration or 0, i))
    rows = []
    for i in order:
        p = data.pairs[i]
        rows.append(
            [
                p.iteration,
                p.mode,
                p.outcome,
                p.task_id,
                p.chosen_reward,
                p.rejected_reward,
                ids(p.prompt),
                ids(p.chosen),
                ids(p.rejected),
            ]
        )
    return {"rows": rows}, messages


def _script_json(value: Any) -> str:
    """JSON safe inside <script>: no '</' can close the element early."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")


def _fmt(point: tuple[float, float | None, float | None]) -> str:
    mean, lo, hi = point
    return f"{mean:.1f}" + (f" <small>[{lo:.1f}, {hi:.1f}]</small>" if lo is not None else "")


def summary_rows(data: RunData) -> list[dict[str, Any]]:
    rows = []
    for stage in data.summary["stages"]:
        row: dict[str, Any] = {"stage": label(stage["model"])}
        for split in EVAL_SPLITS:
            if split in stage:
                iv = stage_intervals(stage, split)
                row[split] = {
                    "reward": _fmt(iv["reward"]),
                    "success": _fmt(iv["success"]),
                    "episodes": stage[split].get("episodes", len(stage[split].get("per_task") or {})),
                }
        p = stage.get("pairs")
        row["pairs"] = f"{p['win']} / {p['tie']} / {p['lose']}" if p else "–"
        rows.append(row)
    return rows


def task_table(data: RunData) -> list[dict[str, Any]]:
    """Per split: the tasks whose reward changed from BC in some iteration, most regressed first."""
    changes = task_changes(data)
    out = []
    for split in EVAL_SPLITS:
        rows = [c for c in changes if c["split"] == split]
        if not rows:
            continue
        bc = next(s for s in data.summary["stages"] if s["model"] == "bc")[split]["per_task"]
        tasks = sorted(
            {t for c in rows for t, d in c["deltas"].items() if d != 0}, key=lambda t: (rows[-1]["deltas"].get(t, 0), t)
        )
        out.append(
            {
                "split": split,
                "models": [label(c["model"]) for c in rows],
                "tasks": [
                    {
                        "task": t,
                        "bc": 100 * bc[t][0],
                        "deltas": [100 * c["deltas"][t] if t in c["deltas"] else None for c in rows],
                    }
                    for t in tasks
                ],
                "summaries": [c["diff"] for c in rows],
            }
        )
    return out


def render_html(data: RunData, plots: list[Plot] | None = None) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    from etokit import __version__

    plots = make_plots(data) if plots is None else plots
    index, messages = pair_payload(data)
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    filters = {
        "iterations": sorted({r[0] for r in index["rows"] if r[0] is not None}),
        "modes": sorted({r[1] for r in index["rows"]}),
        "outcomes": sorted({r[2] for r in index["rows"] if r[2]}),
    }
    summary = data.summary
    return env.get_template("report.html.j2").render(
        title=summary.get("repo") or Path(data.source).name or "etokit run",
        source=data.source,
        env=summary.get("env", ""),
        version=__version__,
        splits=EVAL_SPLITS,
        rows=summary_rows(data),
        plots=[{"title": p.title, "name": p.name, "svg": p.svg()} for p in plots],
        tasks=task_table(data),
        filters=filters,
        pairs=len(index["rows"]),
        style=(TEMPLATES / "report.css").read_text(),
        script=(TEMPLATES / "viewer.js").read_text(),
        index_json=_script_json(index),
        messages_json=_script_json(messages),
    )


def write_report(data: RunData, out: str | Path, plots: list[Plot] | None = None) -> Path:
    """Render and write atomically (a crash leaves the previous report, never half of one)."""
    from etokit.data.io import atomic_write

    out = Path(out)
    html = render_html(data, plots)
    with atomic_write(out) as f:
        f.write(html.encode())
    return out
