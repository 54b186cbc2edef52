"""Evaluation metrics: episodes played by the exploration engine on a test split (greedy, 1-shot
prompt; `etokit eval`), summarized with the paper's metric (average final reward x 100) and the
numbers that explain it, each mean with its 95% bootstrap interval over tasks.

An evaluation is also kept task by task (``per_task``) on a named panel (env, split, task ids),
so that two evaluations of the same panel can be compared task for task (``compare_panels``, a
paired bootstrap: `etokit compare`, and `etokit run`'s iterations against BC)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from etokit.data.schema import Trajectory
from etokit.errors import EtokitError
from etokit.stats import Interval, PairedDiff, mean_ci, paired_diff

EVAL_FORMAT = "etokit-eval"  # the "format" key of an `etokit eval --out` file
EVAL_FORMAT_VERSION = 1


@dataclass
class EvalResult:
    episodes: int
    avg_reward: float  # mean final reward x 100 (the paper's tables)
    success_rate: float  # fraction of episodes with reward 1
    avg_steps: float
    invalid_action_rate: float  # replies without a parsable action / all replies
    errors: int  # episodes whose environment failed (not in the averages)
    # 95% percentile-bootstrap intervals over the episodes, i.e. the tasks of an evaluation (one
    # episode each); None without scored episodes. The reward one in x100 units as avg_reward, the
    # success one as a fraction as success_rate.
    avg_reward_ci: Interval | None = None
    success_rate_ci: Interval | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(trajectories: Iterable[Trajectory], *, seed: int = 0) -> EvalResult:
    trajectories = list(trajectories)
    scored = [t for t in trajectories if "error" not in t.extra]
    n = len(scored)
    steps = sum(t.num_steps for t in scored)
    invalid = sum(int(t.extra.get("invalid_actions", 0)) for t in scored)
    # The agent's replies: a step-wise episode's replayed expert steps are not the agent's.
    replies = steps - sum(int((t.extra.get("step_wise") or {}).get("prefix_steps", 0)) for t in scored)
    return EvalResult(
        episodes=n,
        avg_reward=100 * sum(t.reward for t in scored) / n if n else 0.0,
        success_rate=sum(bool(t.success) for t in scored) / n if n else 0.0,
        avg_steps=steps / n if n else 0.0,
        invalid_action_rate=invalid / replies if replies else 0.0,
        errors=len(trajectories) - n,
        avg_reward_ci=mean_ci([t.reward for t in scored], seed=seed).scaled(100) if n else None,
        success_rate_ci=mean_ci([float(bool(t.success)) for t in scored], seed=seed) if n else None,
    )


def per_task(trajectories: Iterable[Trajectory]) -> list[dict[str, Any]]:
    """One record per episode, in order: what a comparison on the same panel pairs up (an episode
    whose environment failed keeps its task, with the error, and has no reward to pair)."""
    rows = []
    for t in trajectories:
        row: dict[str, Any] = {
            "task_id": t.task_id,
            "reward": t.reward,
            "success": bool(t.success),
            "steps": t.num_steps,
            "seed": t.seed,
        }
        if "error" in t.extra:
            row["error"] = str(t.extra["error"])
        rows.append(row)
    return rows


def format_ci(ci: Mapping[str, Any] | Interval | None, value: float, digits: int = 1, percent: bool = False) -> str:
    """``12.5 [8.1, 17.0]`` from an interval (or its dict in a results file); the bare value when
    there is none (results written before intervals were recorded)."""
    if ci is None:
        return f"{value:.{digits}%}" if percent else f"{value:.{digits}f}"
    if not isinstance(ci, Interval):
        ci = Interval(ci["mean"], ci["lo"], ci["hi"], ci["n"], ci.get("confidence", 0.95))
    if percent:
        return f"{ci.mean:.{digits}%} [{ci.lo:.{digits}%}, {ci.hi:.{digits}%}]"
    return ci.format(digits)


# ---------------------------------------------------------------------------- results files


def panel(env: str, split: str, task_ids: list[str]) -> dict[str, Any]:
    """A task panel and its name: ``env/split:N:DIGEST``, equal for two evaluations exactly when
    they asked for the same tasks in the same order (re-run it with `etokit eval --task-ids`)."""
    import hashlib

    digest = hashlib.sha256("\n".join([env, split, *task_ids]).encode()).hexdigest()[:12]
    return {"id": f"{env}/{split}:{len(task_ids)}:{digest}", "env": env, "split": split, "task_ids": list(task_ids)}


def eval_report(
    trajectories: list[Trajectory],
    *,
    env: str,
    split: str,
    model: str,
    model_revision: str | None,
    task_ids: list[str],
    result: EvalResult | None = None,
) -> dict[str, Any]:
    """The JSON of `etokit eval --out`: the summary (top-level keys as before, plus intervals),
    the panel that was asked for (env, split, task ids: re-run it with --task-ids) and the
    per-task results."""
    result = result or summarize(trajectories)
    return {
        "format": EVAL_FORMAT,
        "format_version": EVAL_FORMAT_VERSION,
        "model": model,
        "model_revision": model_revision,
        "env": env,
        "split": split,
        **result.to_dict(),
        "rewards": {t.task_id: t.reward for t in trajectories},  # older readers' view
        "panel": panel(env, split, task_ids),
        "per_task": per_task(trajectories),
    }


def load_panel(path: Path) -> dict[str, Any]:
    """The task panel (env, split, task ids) recorded in an `etokit eval --out` file."""
    data = _read_json(path)
    recorded = data.get("panel") if isinstance(data, dict) else None
    if not isinstance(recorded, dict):
        raise EtokitError(f"{path}: no panel (written by `etokit eval --out` before panels were recorded?)")
    for key in ("env", "split"):
        if not isinstance(recorded.get(key), str):
            raise EtokitError(f"{path}: panel.{key} must be a string, got {recorded.get(key)!r}")
    ids = recorded.get("task_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(t, str) for t in ids):
        raise EtokitError(f"{path}: panel.task_ids must be a non-empty list of task id strings")
    return recorded


def _read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise EtokitError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EtokitError(f"{path} is not valid JSON ({e})") from None


@dataclass
class Panel:
    """One evaluation on one split, as a comparison needs it: rewards by task (x1, as recorded)."""

    name: str  # how messages call it: a file, or RUN_DIR stage
    env: str | None
    split: str
    rewards: dict[str, float]
    errors: tuple[str, ...] = ()  # tasks whose environment failed: not comparable


def panel_from_per_task(name: str, env: str | None, split: str, rows: list[dict[str, Any]]) -> Panel:
    rewards, errors = {}, []
    for i, row in enumerate(rows):
        where = f"{name}: per_task[{i}]"
        if not isinstance(row, dict) or not isinstance(row.get("task_id"), str):
            raise EtokitError(f"{where}: expected an object with a string task_id")
        if row["task_id"] in rewards or row["task_id"] in errors:
            raise EtokitError(f"{where}: task {row['task_id']} appears twice (one episode per task is compared)")
        if "error" in row:
            errors.append(row["task_id"])
            continue
        reward = row.get("reward")
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise EtokitError(f"{where} (task {row['task_id']}): reward must be a number, got {reward!r}")
        rewards[row["task_id"]] = float(reward)
    return Panel(name, env, split, rewards, tuple(errors))


def load_eval_results(path: Path) -> Panel:
    """An `etokit eval --out` file as a Panel (files written before per-task results were kept
    still have their ``rewards`` by task)."""
    data = _read_json(path)
    if not isinstance(data, dict) or "split" not in data or not ("per_task" in data or "rewards" in data):
        raise EtokitError(f"{path}: not an `etokit eval --out` results file (no split and per_task)")
    if "per_task" in data:
        if not isinstance(data["per_task"], list):
            raise EtokitError(f"{path}: per_task must be a list")
        return panel_from_per_task(str(path), data.get("env"), data["split"], data["per_task"])
    rows = [{"task_id": t, "reward": r} for t, r in data["rewards"].items()]
    return panel_from_per_task(str(path), data.get("env"), data["split"], rows)


@dataclass
class Comparison:
    """B against A on one split: each mean with its interval and the paired difference (all x100)."""

    split: str
    a: Interval
    b: Interval
    diff: PairedDiff

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "a": self.a.to_dict(), "b": self.b.to_dict(), **self.diff.to_dict()}


def compare_panels(
    a: Panel, b: Panel, *, allow_mismatch: bool = False, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> Comparison:
    """Average reward x100 of B minus A, task for task. Different envs or splits, or different
    tasks (unless ``allow_mismatch``), raise PanelMismatchError (exit code 2) naming them."""
    from etokit.stats import PanelMismatchError

    if a.split != b.split or (a.env and b.env and a.env != b.env):
        raise PanelMismatchError(
            f"{a.name} is {a.env}/{a.split} and {b.name} is {b.env}/{b.split}: a paired "
            "comparison needs the same env and split"
        )
    for p in (a, b):
        if p.errors and not allow_mismatch:
            raise PanelMismatchError(
                f"{p.name}: the environment failed on {len(p.errors)} task(s) "
                f"({', '.join(p.errors[:5])}), which cannot be compared; pass "
                "--allow-mismatch to compare the other tasks"
            )
    scale = lambda rewards: {t: 100 * r for t, r in rewards.items()}  # noqa: E731 - the paper's x100
    diff = paired_diff(
        scale(a.rewards),
        scale(b.rewards),
        confidence=confidence,
        n_boot=n_boot,
        seed=seed,
        allow_mismatch=allow_mismatch,
        names=(a.name, b.name),
    )
    common = [t for t in a.rewards if t in b.rewards]
    ci = lambda p: mean_ci(
        [100 * p.rewards[t] for t in common],
        confidence=confidence,  # noqa: E731
        n_boot=n_boot,
        seed=seed,
    )
    return Comparison(a.split, ci(a), ci(b), diff)
