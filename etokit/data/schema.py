"""The two records everything in etokit passes around: a Trajectory and a Pair.

Field names are the on-disk and on-Hub column names (snake_case). Messages follow the HF chat
convention: ``{"role": "system"|"user"|"assistant", "content": str}``; ``user`` carries the
instruction and the environment's observations, ``assistant`` the agent's "Thought/Action" turns.

``extra`` holds format-specific fields that have no column of their own (an ALFWorld
``game_file``, the type of an imported id, ...) so imports round-trip without loss. It is a
dict in Python and a JSON string in Arrow, which keeps the Hub schema stable whatever it holds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

ROLES = ("system", "user", "assistant")
SOURCES = ("expert", "explore", "human")
OUTCOMES = ("win", "lose")
MODES = ("trajectory", "step", "mixture", "self-play")
# The version of this data model. A row may say which version it follows in a `schema_version`
# key (absent means 1, which is all etokit writes today); readers refuse any other version with an
# error naming the row, rather than misreading a file from a newer etokit.
SCHEMA_VERSION = 1

# Column order on disk and on the Hub.
TRAJECTORY_COLUMNS = (
    "task_id",
    "env",
    "split",
    "messages",
    "reward",
    "success",
    "num_steps",
    "source",
    "model",
    "model_revision",
    "seed",
    "extra",
)
PAIR_COLUMNS = (
    "task_id",
    "env",
    "prompt",
    "chosen",
    "rejected",
    "chosen_reward",
    "rejected_reward",
    "outcome",
    "mode",
    "iteration",
    "extra",
)

Message = dict[str, str]


@dataclass
class Trajectory:
    task_id: str
    env: str
    messages: list[Message]
    reward: float
    split: str = "train"
    success: bool | None = None
    num_steps: int | None = None
    source: str = "expert"
    model: str | None = None
    model_revision: str | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Derived defaults: success means full reward (the paper's success rate), steps are
        # the agent's turns after the prompt's "OK".
        if self.success is None:
            self.success = self.reward >= 1.0
        if self.num_steps is None:
            self.num_steps = max(0, sum(m["role"] == "assistant" for m in self.messages) - 1)

    def to_row(self) -> dict[str, Any]:
        return _to_row(self, TRAJECTORY_COLUMNS)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Trajectory":
        return cls(**_decode_extra(row, cls))


@dataclass
class Pair:
    task_id: str
    env: str
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    outcome: str | None = None
    mode: str = "trajectory"
    iteration: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return _to_row(self, PAIR_COLUMNS)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Pair":
        return cls(**_decode_extra(row, cls))


RecordKind = Literal["trajectory", "pair"]


def _to_row(record, columns: tuple[str, ...]) -> dict[str, Any]:
    row = asdict(record)
    row["extra"] = json.dumps(record.extra, sort_keys=True, ensure_ascii=False) if record.extra else None
    return {k: row[k] for k in columns}


def _decode_extra(row: dict[str, Any], cls: type) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    out = {k: v for k, v in row.items() if k in names}
    extra = out.get("extra")
    if isinstance(extra, str):
        out["extra"] = json.loads(extra)
    elif extra is None:
        out["extra"] = {}
    return out


def messages_feature():
    from datasets import List, Value

    return List({"role": Value("string"), "content": Value("string")})


def trajectory_features():
    """Explicit Arrow schema of a trajectory dataset (stable across pushes)."""
    from datasets import Features, Value

    return Features(
        {
            "task_id": Value("string"),
            "env": Value("string"),
            "split": Value("string"),
            "messages": messages_feature(),
            "reward": Value("float64"),
            "success": Value("bool"),
            "num_steps": Value("int32"),
            "source": Value("string"),
            "model": Value("string"),
            "model_revision": Value("string"),
            "seed": Value("int64"),
            "extra": Value("string"),
        }
    )


def pair_features():
    """Explicit Arrow schema of a pair dataset (stable across pushes)."""
    from datasets import Features, Value

    return Features(
        {
            "task_id": Value("string"),
            "env": Value("string"),
            "prompt": messages_feature(),
            "chosen": messages_feature(),
            "rejected": messages_feature(),
            "chosen_reward": Value("float64"),
            "rejected_reward": Value("float64"),
            "outcome": Value("string"),
            "mode": Value("string"),
            "iteration": Value("int32"),
            "extra": Value("string"),
        }
    )
