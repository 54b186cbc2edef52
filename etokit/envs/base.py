"""The one environment protocol every ETO environment implements.

An environment is a set of tasks per split; an episode is ``reset(task_id)`` then ``step(action)``
until ``done``. Rewards are in [0, 1] with each environment's paper definition (ScienceWorld:
max score over the episode; ALFWorld: won; WebShop: the attribute/option/price x type match).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

SPLITS = ("train", "test-seen", "test-unseen")


@dataclass
class Reset:
    """What the agent sees at the start of an episode."""

    task_id: str
    instruction: str  # the task turn: "Your task is to ..." / the WebShop goal
    observation: str  # the first observation (may be empty when the instruction says it all)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    observation: str
    reward: float  # the episode's reward so far, in [0, 1] (paper definition)
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    name: str  # registry id: "webshop", "scienceworld", "alfworld", "textworld-express"
    max_steps: int

    def task_ids(self, split: str) -> list[str]: ...

    # max_steps: this episode's step limit; None is the agent's (``self.max_steps``). The scripted
    # expert passes its gold path's length, as its path may be longer than the agent's limit.
    def reset(self, task_id: str, max_steps: int | None = None) -> Reset: ...

    def step(self, action: str) -> Step: ...

    def expert(self, task_id: str) -> list[str] | None: ...

    def close(self) -> None: ...
