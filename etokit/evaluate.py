"""Evaluation metrics: episodes played by the exploration engine on a test split (greedy, 1-shot
prompt; `etokit eval`), summarized with the paper's metric (average final reward x 100) and the
numbers that explain it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from etokit.data.schema import Trajectory


@dataclass
class EvalResult:
    episodes: int
    avg_reward: float  # mean final reward x 100 (the paper's tables)
    success_rate: float  # fraction of episodes with reward 1
    avg_steps: float
    invalid_action_rate: float  # replies without a parsable action / all replies
    errors: int  # episodes whose environment failed (not in the averages)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(trajectories: Iterable[Trajectory]) -> EvalResult:
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
    )
