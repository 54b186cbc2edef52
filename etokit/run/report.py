"""What a run reports: each evaluation's record, the results rows (per split, with intervals and
the paired difference from BC), the console table, the reward chart and the model card's rows,
the one-line stage summaries, and the evaluation panels `etokit compare --run` reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from etokit.errors import EtokitError
from etokit.run.manifest import MANIFEST

EVAL_SPLITS = ("test-seen", "test-unseen")


def result_rows(stages: list[dict[str, Any]], run_dir: Path, upto: str | None = None) -> list[dict[str, Any]]:
    """One row per evaluated policy (BC, iter-1, ...) in order, ending at ``upto``: per split
    the averages with their 95% intervals over tasks, the per-task results and, after BC, the
    paired difference from BC (``vs_bc``, reward x100, on the same tasks)."""
    rows = []
    for stage in stages:
        if not stage["name"].startswith("eval-"):
            continue
        name = stage["name"][len("eval-") :]
        row = {"model": name}
        for split in EVAL_SPLITS:
            out = stage["outputs"][split]
            if "per_task" not in out:  # recorded before per-task results were kept: from its episodes
                from etokit.data import read_jsonl

                out = {**out, **_eval_outputs(read_jsonl(run_dir / out["file"], "trajectory"))}
            row[split] = {
                k: out[k]
                for k in ("avg_reward", "success_rate", "episodes", "avg_reward_ci", "success_rate_ci", "per_task")
            }
            if rows:
                row[split]["vs_bc"] = _vs(rows[0][split]["per_task"], out["per_task"], rows[0]["model"], name, split)
        rows.append(row)
        if name == upto:
            break
    for stage in stages:
        if stage["name"].startswith("pairs-"):
            name = f"iter-{stage['name'][len('pairs-') :]}"
            for row in rows:
                if row["model"] == name:
                    row["pairs"] = stage["outputs"]["stats"]
    return rows


def run_eval_panels(run_dir: Path, name: str) -> dict[str, Any]:
    """The evaluations of policy ``name`` (bc, iter-1, ...) recorded in ``run_dir``'s manifest, as
    comparison panels by split (`etokit compare --run`)."""
    from etokit.data import read_jsonl
    from etokit.evaluate import panel_from_per_task, per_task

    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not path.is_file():
        raise EtokitError(f"{run_dir}: no {MANIFEST} (not an `etokit run` folder)")
    try:
        stages = json.loads(path.read_text())["stages"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise EtokitError(f"{path}: not a run manifest ({e})") from None
    evaluated = {s["name"][len("eval-") :]: s["outputs"] for s in stages if s["name"].startswith("eval-")}
    if name not in evaluated:
        raise EtokitError(f"{run_dir} has no evaluation of {name!r} (evaluated: {', '.join(evaluated) or 'none yet'})")
    panels = {}
    for split in EVAL_SPLITS:
        out = evaluated[name][split]
        rows = out.get("per_task")
        if rows is None:  # recorded before per-task results were kept
            rows = per_task(read_jsonl(run_dir / out["file"], "trajectory"))
        panels[split] = panel_from_per_task(f"{run_dir}:{name}", None, split, rows)
    return panels


def run_diagnostics(run_dir: Path) -> dict[str, Any]:
    """What explains a run's results beyond its rewards, per stage recorded so far: exploration's
    reward and invalid actions, the pairs' win / tie / lose, each DPO's training curve (first and
    last logged step: loss, reward margin and accuracy, chosen / rejected log-probs) and each
    evaluation's invalid-action rate, steps, reply length (words) and repeated actions (a reply
    whose action is the previous one's: the loop a weak agent falls into)."""
    from etokit.agent.protocol import parse_action
    from etokit.data import read_jsonl
    from etokit.train.metric_logging import read_log

    run_dir = Path(run_dir)
    stages = json.loads((run_dir / MANIFEST).read_text())["stages"]
    out: dict[str, Any] = {}
    for stage in stages:
        name, o = stage["name"], stage["outputs"]
        if name.startswith("explore-"):
            out[name] = {k: o[k] for k in ("policy", "episodes", "avg_reward", "invalid_action_rate") if k in o}
        elif name.startswith("pairs-"):
            out[name] = dict(o["stats"])
        elif name.startswith("dpo-"):
            steps = read_log(run_dir / o["model"])
            keys = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")
            out[name] = {"beta": o.get("beta"), "learning_rate": o.get("learning_rate"), "steps": len(steps)}
            for at, row in (("first", steps[:1]), ("last", steps[-1:])):
                out[name][at] = {k: round(row[0][k], 4) for k in keys if row and k in row[0]}
        elif name.startswith("eval-"):
            out[name] = {}
            for split in EVAL_SPLITS:
                episodes = read_jsonl(run_dir / o[split]["file"], "trajectory")
                # The agent's replies: every assistant turn after the first (the "OK" to the instruction).
                replies = [[m["content"] for m in t.messages if m["role"] == "assistant"][1:] for t in episodes]
                repeated = total = 0
                for own in replies:
                    actions = [parse_action(r) for r in own]
                    total += max(len(actions) - 1, 0)
                    repeated += sum(a is not None and a == b for a, b in zip(actions[1:], actions))
                total_replies = sum(map(len, replies))
                out[name][split] = {
                    "avg_reward": o[split]["avg_reward"],
                    "invalid_action_rate": o[split]["invalid_action_rate"],
                    "avg_steps": o[split]["avg_steps"],
                    "reply_words": round(
                        sum(len(r.split()) for own in replies for r in own) / max(total_replies, 1), 2
                    ),
                    "repeated_action_rate": round(repeated / total, 4) if total else 0.0,
                }
    return out


def _metrics(result) -> dict[str, Any]:
    def rounded(v):  # floats at any depth (the intervals are nested)
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        return round(v, 6) if isinstance(v, float) else v

    return rounded(result.to_dict())


def _eval_outputs(played) -> dict[str, Any]:
    """An evaluation's record: the summary (with intervals) and each task's result. The model is
    the stage's (PUSH_TO@stage, its commit in the push stage), not repeated here: the record must
    not depend on the repo, so that a resumed run's equals an uninterrupted one's."""
    from etokit.evaluate import per_task, summarize

    return {**_metrics(summarize(played)), "per_task": per_task(played)}


def _vs(
    base: list[dict[str, Any]], other: list[dict[str, Any]], base_name: str, name: str, split: str
) -> dict[str, Any]:
    """``name`` against ``base`` task for task (reward x100): the paired-bootstrap difference."""
    from etokit.evaluate import compare_panels, panel_from_per_task

    a = panel_from_per_task(base_name, None, split, base)
    b = panel_from_per_task(name, None, split, other)
    # A run's evaluations share their panel (same config, env errors stop the stage); were one to
    # differ, the record lists the tasks left out rather than ending a finished run.
    return _metrics(compare_panels(a, b, allow_mismatch=True).diff)


def _summary(outputs: dict[str, Any]) -> str:
    if "stats" in outputs:
        s = outputs["stats"]
        return f"pairs {s['pairs']} (win {s['win']} / tie {s['tie']} / lose {s['lose']})"
    if "test-unseen" in outputs:
        from etokit.evaluate import format_ci

        return " ".join(
            f"{split} {format_ci(outputs[split].get('avg_reward_ci'), outputs[split]['avg_reward'])}"
            for split in EVAL_SPLITS
        )
    if "commit" in outputs:
        return f"{outputs['repo']}@{outputs['revision']} {outputs['commit'][:12]}"
    if "data_commit" in outputs:
        return f"{outputs['repo']} {outputs['split']}: {outputs['rows']} rows"
    if "avg_reward" in outputs:
        return f"avg reward {outputs['avg_reward']:.1f}, success {outputs['success_rate']:.0%}"
    return ""


def _reward(entry: dict[str, Any]) -> str:
    from etokit.evaluate import format_ci

    return format_ci(entry.get("avg_reward_ci"), entry["avg_reward"])


def _success(entry: dict[str, Any]) -> str:
    from etokit.evaluate import format_ci

    return format_ci(entry.get("success_rate_ci"), entry["success_rate"], percent=True)


def _vs_bc(entry: dict[str, Any]) -> str:
    """``+3.1 [+0.4, +5.9] 7/2/41``: the paired difference from BC and the tasks up / down / same."""
    d = entry.get("vs_bc")
    if not d:
        return "-"
    return f"{d['mean']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}] {d['up']}/{d['down']}/{d['same']}"


def _card_row(row: dict[str, Any], vs_bc: bool = True) -> dict[str, str]:
    """One row of a model card's eval table; ``vs_bc``: with the columns of the difference from BC
    (a card with iterations; BC's own cell is "-")."""
    out = {"Stage": "BC" if row["model"] == "bc" else row["model"]}
    for split, label in (("test-seen", "seen"), ("test-unseen", "unseen")):
        out[f"{label} reward x100 [95% CI]"] = _reward(row[split])
        out[f"{label} success [95% CI]"] = _success(row[split])
        if vs_bc:
            out[f"{label} vs BC [95% CI] up/down/same"] = _vs_bc(row[split])
    return out


CARD_EVAL_NOTE = (
    "Means over the test tasks (one greedy episode each) with their 95% percentile-bootstrap "
    "interval over tasks (10,000 resamples). *vs BC*: the mean per-task difference in reward x100 "
    "from the BC checkpoint on the same tasks, its 95% paired-bootstrap interval, and how many tasks "
    "went up / down / stayed the same."
)


def reward_chart(rows: list[dict[str, Any]], width: int = 40) -> str:
    """Average reward (x100) per stage as a text bar chart (no plotting dependency), each value
    followed by its 95% interval over tasks."""
    lines = []
    for row in rows:
        label = "BC" if row["model"] == "bc" else row["model"]
        for split in EVAL_SPLITS:
            value = row[split]["avg_reward"]
            bar = "#" * round(width * max(0.0, min(value, 100.0)) / 100)
            ci = row[split].get("avg_reward_ci")
            tail = f" [{ci['lo']:.1f}, {ci['hi']:.1f}]" if ci else ""
            lines.append(f"{label:<8} {split:<12} {bar:<{width}} {value:5.1f}{tail}")
    return "\n".join(lines)


def results_table(rows: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(
        title="ETO results (average reward x100 / success rate, 95% bootstrap intervals over tasks; "
        "vs BC: paired difference, tasks up/down/same)"
    )
    table.add_column("stage", style="bold")
    for split in EVAL_SPLITS:
        table.add_column(f"{split} reward", justify="right")
        table.add_column(f"{split} success", justify="right")
        table.add_column(f"{split} vs BC", justify="right")
    table.add_column("pairs win/tie/lose", justify="right")
    for row in rows:
        p = row.get("pairs")
        table.add_row(
            "BC" if row["model"] == "bc" else row["model"],
            *[v for split in EVAL_SPLITS for v in (_reward(row[split]), _success(row[split]), _vs_bc(row[split]))],
            f"{p['win']}/{p['tie']}/{p['lose']}" if p else "-",
        )
    return table
