"""Contrastive trajectory pairs: ETO's second stage (official ``construct_preference.py``).

Trajectory mode compares each explored trajectory's reward with the expert's on the same task:

- agent < expert: chosen = expert, rejected = agent ("lose");
- agent > expert: chosen = agent, rejected = expert ("win");
- equal: no pair ("tie").

The prompt is the chosen trajectory's instruction, "OK" and task turn (its first three messages);
chosen and rejected are the turns after it, each ending on an agent turn. On WebShop and
ScienceWorld a losing agent trajectory is cut to the expert's length + 5 rounds, so DPO does not
push down a long tail of turns the expert never had to take.

Self-play mode needs no expert: for each task, the agent's best sample is chosen and its worst
rejected (the same cut applies); tasks whose samples all score the same are ties.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Iterable

from etokit.data.schema import Message, Pair, Trajectory
from etokit.data.validate import DataError

# construct_preference.py cuts the rejected side on these tasks only (ALFWorld keeps it whole).
TRUNCATED_ENVS = ("webshop", "scienceworld")
EXTRA_ROUNDS = 5  # a round = one agent turn + its observation
PROMPT_LEN = 3  # instruction, "OK", task turn


@dataclass
class PairStats:
    win: int = 0
    tie: int = 0
    lose: int = 0
    missing_expert: int = 0
    # Pairs that cannot train DPO: a side with no agent turn, or chosen == rejected.
    unusable: int = 0
    pairs: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def task_key(t: Trajectory) -> str:
    """What identifies "the same task" for a comparison. ALFWorld ids are not stable across the
    official data and a local game set, so (as the official code) it keys on the game: the
    ``trial_...`` folder of ``extra["game_file"]`` when present."""
    game_file = t.extra.get("game_file")
    if not game_file:
        return t.task_id
    trials = [p for p in PurePosixPath(str(game_file).replace("\\", "/")).parts if p.startswith("trial_")]
    return trials[-1] if trials else str(game_file)


def _split(t: Trajectory, what: str) -> tuple[list[Message], list[Message]]:
    """(prompt, turns after it) with any trailing observation dropped."""
    msgs = t.messages
    if len(msgs) < PROMPT_LEN or [m["role"] for m in msgs[:PROMPT_LEN]] != ["user", "assistant", "user"]:
        raise DataError(f"{what} trajectory does not start with instruction (user), \"OK\" (assistant) and the task "
                        "(user), the layout of the agent protocol", where=f"task {t.task_id!r}", field="messages")
    turns = _drop_trailing_observations(msgs[PROMPT_LEN:])
    return [dict(m) for m in msgs[:PROMPT_LEN]], [dict(m) for m in turns]


def _drop_trailing_observations(turns: list[Message]) -> list[Message]:
    turns = list(turns)
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()
    return turns


def _cut(env: str, rejected: list[Message], chosen: list[Message]) -> list[Message]:
    if env not in TRUNCATED_ENVS:
        return rejected
    return _drop_trailing_observations(rejected[: len(chosen) + 2 * EXTRA_ROUNDS])


def _pair(chosen_t: Trajectory, rejected_t: Trajectory, *, outcome: str | None, mode: str, iteration: int | None,
          stats: PairStats, cut_rejected: bool) -> Pair | None:
    prompt, chosen = _split(chosen_t, "chosen")
    _, rejected = _split(rejected_t, "rejected")
    if cut_rejected:
        rejected = _cut(chosen_t.env, rejected, chosen)
    if not chosen or not rejected or chosen == rejected:
        stats.unusable += 1
        return None
    extra = {"chosen_source": chosen_t.source, "rejected_source": rejected_t.source}
    for side, t in (("chosen", chosen_t), ("rejected", rejected_t)):
        if t.seed is not None:
            extra[f"{side}_seed"] = t.seed
        if t.model_revision:
            extra[f"{side}_model_revision"] = t.model_revision
    stats.pairs += 1
    return Pair(task_id=chosen_t.task_id, env=chosen_t.env, prompt=prompt, chosen=chosen, rejected=rejected,
                chosen_reward=chosen_t.reward, rejected_reward=rejected_t.reward, outcome=outcome, mode=mode,
                iteration=iteration, extra=extra)


def trajectory_pairs(experts: Iterable[Trajectory], explored: Iterable[Trajectory], *,
                     iteration: int | None = None) -> tuple[list[Pair], PairStats]:
    """ETO's trajectory-wise pairs: each explored trajectory against the expert of its task.

    Several explored samples of one task each give their own comparison (the official code has
    one sample per task, where this is the same rule).
    """
    by_key: dict[str, Trajectory] = {}
    for t in experts:
        by_key.setdefault(task_key(t), t)
    stats, pairs = PairStats(), []
    for agent in explored:
        expert = by_key.get(task_key(agent))
        if expert is None:
            stats.missing_expert += 1
            continue
        if expert.env != agent.env:
            raise DataError(f"the expert is from env {expert.env!r} but the explored trajectory from {agent.env!r}",
                            where=f"task {agent.task_id!r}", field="env")
        if agent.reward < expert.reward:
            stats.lose += 1
            pair = _pair(expert, agent, outcome="lose", mode="trajectory", iteration=iteration, stats=stats,
                         cut_rejected=True)
        elif agent.reward > expert.reward:
            stats.win += 1
            pair = _pair(agent, expert, outcome="win", mode="trajectory", iteration=iteration, stats=stats,
                         cut_rejected=False)
        else:
            stats.tie += 1
            continue
        if pair is not None:
            pairs.append(pair)
    return pairs, stats


def self_play_pairs(explored: Iterable[Trajectory], *, iteration: int | None = None) -> tuple[list[Pair], PairStats]:
    """Pairs from the agent's own samples: per task, best reward chosen, worst rejected. The first
    sample wins among equals, so the result does not depend on anything but the file's order."""
    groups: dict[str, list[Trajectory]] = {}
    for t in explored:
        groups.setdefault(task_key(t), []).append(t)
    stats, pairs = PairStats(), []
    for samples in groups.values():
        best = max(samples, key=lambda t: t.reward)
        worst = min(samples, key=lambda t: t.reward)
        if best.reward == worst.reward:
            stats.tie += 1
            continue
        pair = _pair(best, worst, outcome=None, mode="self-play", iteration=iteration, stats=stats, cut_rejected=True)
        if pair is not None:
            pairs.append(pair)
    return pairs, stats


def build_pairs(explored: Iterable[Trajectory], experts: Iterable[Trajectory] | None = None, *,
                mode: str = "trajectory", iteration: int | None = None) -> tuple[list[Pair], PairStats]:
    """Pairs for DPO from explored trajectories (and, in trajectory mode, the experts)."""
    if mode == "trajectory":
        if experts is None:
            raise DataError("trajectory mode compares against expert trajectories: pass the experts")
        return trajectory_pairs(experts, explored, iteration=iteration)
    if mode == "self-play":
        return self_play_pairs(explored, iteration=iteration)
    raise DataError(f"unknown pair mode {mode!r}, expected trajectory or self-play")
