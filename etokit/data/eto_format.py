"""The official ETO data formats (github.com/Yifan-Song793/ETO), to and from etokit records.

- SFT rows (Hub dataset ``agent-eto/eto-sft-trajectory``): ``id`` (int for WebShop, str
  elsewhere), ``conversations: [{from: human|gpt, value}]``, WebShop adds ``reward`` and its own
  ``source``, ALFWorld adds ``game_file``.
- Preference rows (construct_preference.py): ``id``, ``prompt``, ``chosen``, ``rejected``, each a
  from/value turn list.

Imports keep whatever etokit has no column for in ``extra`` so that exporting an imported row
gives back the same row: the id's original type, the key order, the row's own ``source`` (which
would collide with etokit's ``source`` column) and whether a ``reward`` key existed at all.
"""

from __future__ import annotations

import re
from typing import Any

from etokit.data.schema import Pair, Trajectory
from etokit.data.validate import DataError, Loc, check_turn_keys, validate_pair, validate_trajectory

FROM_TO_ROLE = {"human": "user", "gpt": "assistant"}
ROLE_TO_FROM = {v: k for k, v in FROM_TO_ROLE.items()}

# ScienceWorld and ALFWorld expert rows carry no reward; the official construct_preference.py
# scores every expert trajectory 1.0 there. WebShop's experts are human demonstrations, not all
# perfect: the official code reads each row's stored reward, so a WebShop row without one (the Hub
# copy of agent-eto/eto-sft-trajectory declares only id and conversations) is not given a reward
# silently: the caller states one (``expert_reward``, the CLI's --expert-reward), and the record
# says so in ``extra["expert_reward_stated"]`` for the cards.
EXPERT_REWARD = 1.0
ENVS_WITH_EXPERT_REWARD_RULE = ("scienceworld", "sciworld", "alfworld")


def missing_reward_error(loc: Loc, env: str) -> DataError:
    return loc.error(
        f"an official {env} expert row without a reward: the pair rule compares each agent episode with the "
        "expert's reward, and only ScienceWorld and ALFWorld experts are scored 1.0 by the official code. "
        "Pass --expert-reward R (expert_reward in a run config) to state one, recorded in the dataset and model "
        "cards, or use the official local file (data/webshop_sft.json keeps each row's reward)",
        "reward",
    )


# ETO names a ScienceWorld task "<task number>_<variation>" (eval_agent/data/sciworld/taskname2id.json),
# etokit's environment "<simulator task name>_<variation>". Imports use etokit's id, so imported expert
# rows pair with etokit's exploration; the original id is kept for export, and rows etokit made
# (its expert, its exploration) export under the official id, so the official scripts read them.
SCIWORLD_TASK_NAMES = {
    0: "boil",
    1: "change-the-state-of-matter-of",
    2: "freeze",
    3: "melt",
    4: "measure-melting-point-known-substance",
    6: "use-thermometer",
    7: "power-component",
    8: "power-component-renewable-vs-nonrenewable-energy",
    9: "test-conductivity",
    10: "test-conductivity-of-unknown-substances",
    11: "find-animal",
    12: "find-living-thing",
    13: "find-non-living-thing",
    14: "find-plant",
    15: "grow-fruit",
    16: "grow-plant",
    17: "chemistry-mix",
    18: "chemistry-mix-paint-secondary-color",
    19: "chemistry-mix-paint-tertiary-color",
    20: "lifespan-longest-lived",
    21: "lifespan-longest-lived-then-shortest-lived",
    22: "lifespan-shortest-lived",
    23: "identify-life-stages-1",
    24: "identify-life-stages-2",
    25: "inclined-plane-determine-angle",
    26: "inclined-plane-friction-named-surfaces",
    27: "inclined-plane-friction-unnamed-surfaces",
    28: "mendellian-genetics-known-plant",
    29: "mendellian-genetics-unknown-plant",
}
SCIWORLD_TASK_NUMBERS = {name: number for number, name in SCIWORLD_TASK_NAMES.items()}

SFT_REQUIRED = ("id", "conversations")
PAIR_REQUIRED = ("id", "prompt", "chosen", "rejected")


def trajectory_from_eto(
    row: dict[str, Any],
    *,
    env: str,
    split: str = "train",
    where: str | Loc = "ETO row",
    expert_reward: float | None = None,
) -> Trajectory:
    """An official SFT row as a validated expert Trajectory (human -> user, gpt -> assistant).

    A row without a reward gets the official rule's 1.0 in ScienceWorld and ALFWorld; elsewhere
    ``expert_reward`` must state one (see ENVS_WITH_EXPERT_REWARD_RULE)."""
    loc = _eto_loc(where)
    _require(row, SFT_REQUIRED, loc)
    record_id = _check_id(row["id"], loc)
    messages = turns_to_messages(row["conversations"], "conversations", loc)
    reward = row.get("reward")
    stated = reward is None and env not in ENVS_WITH_EXPERT_REWARD_RULE
    if reward is None:
        if stated and expert_reward is None:
            raise missing_reward_error(loc, env)
        reward = expert_reward if stated else EXPERT_REWARD
    elif isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise loc.error(f"expected a number in [0, 1], got {reward!r}", "reward")
    extra: dict[str, Any] = {"eto_id": record_id, "eto_keys": list(row)}
    if stated:
        extra["expert_reward_stated"] = reward
    # A null reward (a Parquet column shared with rows that have one) is kept as null on export.
    others = {
        k: v
        for k, v in row.items()
        if k not in ("id", "conversations", "game_file") and not (k == "reward" and v is not None)
    }
    if "game_file" in row:
        extra["game_file"] = row["game_file"]
    if others:
        extra["eto_fields"] = others
    t = Trajectory(
        task_id=task_id_from_eto(record_id, env),
        env=env,
        split=split,
        messages=messages,
        reward=float(reward),
        source="expert",
        extra=extra,
    )
    validate_trajectory(t, where=loc)
    return t


def trajectory_to_eto(t: Trajectory) -> dict[str, Any]:
    """The official SFT row for ``t``; the exact inverse of trajectory_from_eto on imported rows."""
    conversations = messages_to_turns(t.messages, "messages", t.task_id)
    fields = t.extra.get("eto_fields", {})
    values = {"id": _export_id(t), "conversations": conversations, "reward": fields.get("reward", t.reward)}
    if "game_file" in t.extra:
        values["game_file"] = t.extra["game_file"]
    values.update({k: v for k, v in fields.items() if k != "reward"})
    # Rows that were not imported (explored trajectories) always carry their reward.
    keys = t.extra.get("eto_keys") or list(values)
    return {k: values[k] for k in keys}


def pair_from_eto(row: dict[str, Any], *, env: str, where: str | Loc = "ETO row") -> Pair:
    """An official preference row as a validated Pair; that format has no rewards or outcome."""
    loc = _eto_loc(where)
    _require(row, PAIR_REQUIRED, loc)
    record_id = _check_id(row["id"], loc)
    sides = {side: turns_to_messages(row[side], side, loc) for side in ("prompt", "chosen", "rejected")}
    extra: dict[str, Any] = {"eto_id": record_id, "eto_keys": list(row)}
    others = {k: v for k, v in row.items() if k not in PAIR_REQUIRED}
    if others:
        extra["eto_fields"] = others
    p = Pair(task_id=task_id_from_eto(record_id, env), env=env, extra=extra, **sides)
    validate_pair(p, where=loc)
    return p


def pair_to_eto(p: Pair) -> dict[str, Any]:
    """The official preference row for ``p``; the exact inverse of pair_from_eto on imported rows."""
    values = {"id": _export_id(p)}
    for side in ("prompt", "chosen", "rejected"):
        values[side] = messages_to_turns(getattr(p, side), side, p.task_id)
    values.update(p.extra.get("eto_fields", {}))
    keys = p.extra.get("eto_keys") or list(values)
    return {k: values[k] for k in keys}


def turns_to_messages(turns: Any, field: str, loc: Loc) -> list[dict[str, str]]:
    if not isinstance(turns, list):
        raise loc.error(f"expected a list of {{from, value}} turns, got {type(turns).__name__}", field)
    messages = []
    for i, turn in enumerate(turns):
        name = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise loc.error(f"expected a {{from, value}} object, got {type(turn).__name__}", name)
        if "role" in turn or "content" in turn:
            raise loc.error("turn uses role/content; official ETO turns use from/value", name)
        check_turn_keys(turn, ("from", "value"), "an official turn", loc, name)
        if turn["from"] not in FROM_TO_ROLE:
            raise loc.error(f"unknown 'from' {turn['from']!r}, expected human or gpt", f"{name}.from")
        messages.append({"role": FROM_TO_ROLE[turn["from"]], "content": turn["value"]})
    return messages


def messages_to_turns(messages: list[dict[str, str]], field: str, task_id: str) -> list[dict[str, str]]:
    turns = []
    for i, m in enumerate(messages):
        if m["role"] not in ROLE_TO_FROM:
            # The official format has human/gpt turns only; a system prompt has nowhere to go.
            raise DataError(
                f"role {m['role']!r} has no official ETO equivalent (only user and assistant turns)",
                where=f"task {task_id!r}",
                field=f"{field}[{i}].role",
            )
        turns.append({"from": ROLE_TO_FROM[m["role"]], "value": m["content"]})
    return turns


def _eto_loc(where: str | Loc) -> Loc:
    if isinstance(where, Loc):
        return Loc(where.path, where.row, where.record_id, where.text, eto=True)
    return Loc(text=where, eto=True)


def _require(row: Any, required: tuple[str, ...], loc: Loc) -> None:
    if not isinstance(row, dict):
        raise loc.error(f"expected an object, got {type(row).__name__}")
    missing = [k for k in required if k not in row]
    if missing:
        raise loc.error(f"missing required field(s) {', '.join(repr(k) for k in missing)}")


def _check_id(value: Any, loc: Loc) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise loc.error(f"expected an integer or a non-empty string, got {value!r}", "id")
    return value


def task_id_from_eto(eto_id: int | str, env: str) -> str:
    """etokit's task id for an official row id: ScienceWorld's "0_12" is "boil_12"; others unchanged."""
    match = re.fullmatch(r"(\d+)_(\d+)", str(eto_id)) if env == "scienceworld" else None
    if match and int(match[1]) in SCIWORLD_TASK_NAMES:
        return f"{SCIWORLD_TASK_NAMES[int(match[1])]}_{match[2]}"
    return str(eto_id)


def task_id_to_eto(task_id: str, env: str) -> str:
    """The official row id for an etokit task id: ScienceWorld's "boil_12" is "0_12"; others unchanged.
    The inverse of task_id_from_eto."""
    name, _, variation = task_id.rpartition("_")
    if env == "scienceworld" and name in SCIWORLD_TASK_NUMBERS and variation.isdigit():
        return f"{SCIWORLD_TASK_NUMBERS[name]}_{variation}"
    return task_id


def _export_id(record: Trajectory | Pair) -> int | str:
    original = record.extra.get("eto_id")
    # Keep the original id (WebShop's ints, ScienceWorld's numbers), unless the record was re-keyed since import.
    if original is not None and task_id_from_eto(original, record.env) == record.task_id:
        return original
    return task_id_to_eto(record.task_id, record.env)
