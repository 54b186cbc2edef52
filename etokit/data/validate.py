"""Checks that a Trajectory or Pair is usable for BC and DPO, with errors that point at the row.

The rules follow what training relies on: the loss masks assistant turns (so roles must be
known and alternate), DPO scores chosen/rejected continuations of a prompt that ends on an
observation, and rewards are compared on the paper's 0-1 scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etokit.data.schema import MODES, OUTCOMES, ROLES, SOURCES, Pair, Trajectory
from etokit.errors import EtokitError


class DataError(EtokitError):
    """A file or record that etokit cannot use. ``str(e)`` reads
    ``<file>, row 3 (id 'x'), field 'messages[2].role': expected ..., got ...``."""

    def __init__(
        self,
        problem: str,
        *,
        path: str | Path | None = None,
        row: int | None = None,
        record_id: Any = None,
        field: str | None = None,
        where: str | None = None,
    ):
        self.problem = problem
        self.path = Path(path) if path is not None else None
        self.row = row
        self.record_id = record_id
        self.field = field
        self.where = where
        super().__init__(self._compose())

    def _compose(self) -> str:
        parts = []
        if self.where:
            parts.append(self.where)
        else:
            if self.path is not None:
                parts.append(str(self.path))
            if self.row is not None:
                parts.append(f"row {self.row}" + (f" (id {self.record_id!r})" if self.record_id is not None else ""))
        if self.field:
            parts.append(f"field '{self.field}'")
        return (", ".join(parts) + ": " if parts else "") + self.problem


@dataclass(frozen=True)
class Loc:
    """Where a record came from; turned into DataError's path/row/id."""

    path: Path | None = None
    row: int | None = None
    record_id: Any = None
    text: str | None = None  # a caller's free-form location ("pair for task 12")
    # Official rows call the message list "conversations" and roles human/gpt; errors use their words.
    eto: bool = False

    def error(self, problem: str, field: str | None = None) -> DataError:
        return DataError(problem, path=self.path, row=self.row, record_id=self.record_id, field=field, where=self.text)


def _loc(where: str | Loc) -> Loc:
    return where if isinstance(where, Loc) else Loc(text=where)


def validate_trajectory(t: Trajectory, *, where: str | Loc = "trajectory") -> None:
    """Raise DataError for the first problem in ``t``; return None when it is usable."""
    loc = _loc(where)
    _check_id_env(t.task_id, t.env, loc)
    if not isinstance(t.split, str) or not t.split:
        raise loc.error(f"expected a non-empty string, got {t.split!r}", "split")
    field = "conversations" if loc.eto else "messages"
    _check_messages(t.messages, field, loc)
    _check_order(t.messages, field, loc, first="user", allow_system=True)
    if not any(m["role"] == "assistant" for m in t.messages):
        raise loc.error(f"a trajectory needs at least one turn of role {_role('assistant', loc)}, got none", field)
    _check_reward(t.reward, "reward", loc, optional=False)
    if not isinstance(t.success, bool):
        raise loc.error(f"expected true/false, got {t.success!r}", "success")
    if not _is_int(t.num_steps) or t.num_steps < 0:
        raise loc.error(f"expected a non-negative integer, got {t.num_steps!r}", "num_steps")
    if t.source not in SOURCES:
        raise loc.error(f"expected one of {', '.join(SOURCES)}, got {t.source!r}", "source")
    for name in ("model", "model_revision"):
        value = getattr(t, name)
        if value is not None and not isinstance(value, str):
            raise loc.error(f"expected a string or null, got {value!r}", name)
    if t.seed is not None and not _is_int(t.seed):
        raise loc.error(f"expected an integer or null, got {t.seed!r}", "seed")
    _check_extra(t.extra, loc)


def validate_pair(p: Pair, *, where: str | Loc = "pair") -> None:
    """Raise DataError for the first problem in ``p``; return None when it is usable for DPO."""
    loc = _loc(where)
    _check_id_env(p.task_id, p.env, loc)
    _check_messages(p.prompt, "prompt", loc)
    _check_order(p.prompt, "prompt", loc, first="user", allow_system=True)
    if p.prompt[-1]["role"] != "user":
        raise loc.error(
            f"the prompt must end on a turn of role {_role('user', loc)} (the task), "
            f"got {_role(p.prompt[-1]['role'], loc)} last",
            "prompt",
        )
    for side in ("chosen", "rejected"):
        msgs = getattr(p, side)
        _check_messages(msgs, side, loc)
        _check_order(msgs, side, loc, first="assistant", allow_system=False)
        if msgs[-1]["role"] != "assistant":
            raise loc.error(
                f"{side} must end on a turn of role {_role('assistant', loc)} (drop the trailing "
                f"observation), got {_role(msgs[-1]['role'], loc)} last",
                side,
            )
    if _plain(p.chosen) == _plain(p.rejected):
        raise loc.error("chosen is identical to rejected; a pair needs two different continuations", "chosen")
    _check_reward(p.chosen_reward, "chosen_reward", loc, optional=True)
    _check_reward(p.rejected_reward, "rejected_reward", loc, optional=True)
    if p.outcome is not None and p.outcome not in OUTCOMES:
        raise loc.error(f"expected one of {', '.join(OUTCOMES)} or null, got {p.outcome!r}", "outcome")
    if p.mode not in MODES:
        raise loc.error(f"expected one of {', '.join(MODES)}, got {p.mode!r}", "mode")
    if p.iteration is not None and (not _is_int(p.iteration) or p.iteration < 0):
        raise loc.error(f"expected a non-negative integer or null, got {p.iteration!r}", "iteration")
    _check_extra(p.extra, loc)


def _check_id_env(task_id: Any, env: Any, loc: Loc) -> None:
    if not isinstance(task_id, str) or not task_id:
        raise loc.error(f"expected a non-empty string, got {task_id!r}", "task_id")
    if not isinstance(env, str) or not env:
        raise loc.error(f"expected a non-empty string, got {env!r}", "env")


def _check_messages(msgs: Any, field: str, loc: Loc) -> None:
    if not isinstance(msgs, list):
        raise loc.error(f"expected a list of messages, got {type(msgs).__name__}", field)
    if not msgs:
        raise loc.error("expected at least one message, got an empty list", field)
    for i, m in enumerate(msgs):
        name = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise loc.error(f"expected a message object, got {type(m).__name__}", name)
        if "from" in m or "value" in m:
            raise loc.error(
                "message uses the official ETO keys from/value, expected role/content; "
                "convert official files with `etokit import-eto`",
                name,
            )
        check_turn_keys(m, ("role", "content"), "a message", loc, name)
        if m["role"] not in ROLES:
            raise loc.error(f"unknown role {m['role']!r}, expected one of {', '.join(ROLES)}", f"{name}.role")
        content = m["content"]
        if not isinstance(content, str):
            raise loc.error(f"expected a string, got {type(content).__name__}", f"{name}.{_content_key(loc)}")
        if content == "":
            raise loc.error('empty content: expected non-empty text, got ""', f"{name}.{_content_key(loc)}")


def _check_order(msgs: list, field: str, loc: Loc, *, first: str, allow_system: bool) -> None:
    """Optional leading system turn, then turns alternating from ``first``."""
    start = 1 if allow_system and msgs[0]["role"] == "system" else 0
    other = {"user": "assistant", "assistant": "user"}
    expected = first
    for i in range(start, len(msgs)):
        role = msgs[i]["role"]
        if role != expected:
            why = "a system turn is only allowed first" if role == "system" else "turns must alternate"
            raise loc.error(
                f"expected role {_role(expected, loc)}, got {_role(role, loc)} ({why})",
                f"{field}[{i}].{_role_key(loc)}",
            )
        expected = other[expected]
    if start == len(msgs):
        raise loc.error("only a system turn; expected user/assistant turns after it", field)


def _check_reward(value: Any, field: str, loc: Loc, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise loc.error(f"expected a number in [0, 1], got {value!r}", field)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise loc.error(f"expected a number in [0, 1], got {value!r}", field)


def _check_extra(extra: Any, loc: Loc) -> None:
    if not isinstance(extra, dict):
        raise loc.error(f"expected an object (or a JSON string of one), got {type(extra).__name__}", "extra")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _plain(msgs: list[dict]) -> list[tuple]:
    return [(m["role"], m["content"]) for m in msgs]


_ETO_ROLE = {"user": "human", "assistant": "gpt"}


def _role(role: str, loc: Loc) -> str:
    return f"{_ETO_ROLE[role]!r}" if loc.eto and role in _ETO_ROLE else repr(role)


def _role_key(loc: Loc) -> str:
    return "from" if loc.eto else "role"


def _content_key(loc: Loc) -> str:
    return "value" if loc.eto else "content"


def check_turn_keys(turn: dict, keys: tuple[str, str], what: str, loc: Loc, name: str) -> None:
    """A turn has exactly `keys` (role/content for etokit, from/value for official ETO files)."""
    missing = [k for k in keys if k not in turn]
    if missing:
        raise loc.error(f"missing required key(s) {', '.join(repr(k) for k in missing)}", name)
    unexpected = set(turn) - set(keys)
    if unexpected:
        raise loc.error(
            f"unexpected key(s) {', '.join(sorted(map(repr, unexpected)))}; {what} has only {keys[0]} and {keys[1]}",
            name,
        )
