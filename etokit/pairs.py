"""Contrastive trajectory pairs: ETO's second stage (official ``construct_preference.py``).

Trajectory mode compares each explored trajectory's score with the expert's on the same task:

- agent < expert: chosen = expert, rejected = agent ("lose");
- agent > expert: chosen = agent, rejected = expert ("win");
- equal: no pair ("tie").

The scores are the official ones (``PairRule.rewards="official"``): construct_preference.py never
reads a ScienceWorld or ALFWorld expert's reward, it counts every such expert as 1.0, and it scores
an ALFWorld agent 1.0 when its reward is non-zero, else 0.0; WebShop (and environments the official
code does not know) compare the stored rewards. ``rewards="stored"`` compares stored rewards
everywhere (a deviation: a ScienceWorld expert stored at 0.8 then loses to an agent at 0.9).

The prompt is the chosen trajectory's instruction, "OK" and task turn (its first three messages);
chosen and rejected are the turns after it. The agent's trailing observation is dropped; an expert
that ends on an observation drops the whole pair, as the official code (it never trims the expert,
and keeps only pairs whose sides both end on an agent turn); ``expert_observation="trim"`` cuts
that observation and keeps the pair instead (a deviation). On WebShop and ScienceWorld a losing
agent trajectory is cut to the expert's length + 5 rounds, so DPO does not push down a long tail of
turns the expert never had to take.

Two differences with construct_preference.py remain on purpose, whatever the rule: a pair whose
chosen and rejected turns are identical (an agent that replayed the expert but was scored
differently) is counted ``unusable`` and dropped (it carries no DPO gradient and fails
validation), and several explored samples of one task each give a comparison (the official code
keeps the last sample of a task id; with one sample per task the results are the same). Like the
official code, the last expert of a task wins when an expert file repeats a task.

A pair made under a deviating rule records it in ``extra["pair_rule"]`` (only the settings that
differ from the official ones), which the dataset card reports.

Step mode (paper App. B) uses step-wise episodes (``etokit explore --step-wise-expert``): the
expert's first t-1 steps were teacher-forced, the agent played from step t. Each episode's final
reward is compared with the expert's by the same rule; the prompt also holds the shared prefix
(the expert's steps 1..t-1 and their observations) and chosen/rejected are the two continuations
from step t. Mixture mode is the union of trajectory and step pairs. Each mode only reads its own
kind of episode (ordinary or step-wise: ``extra["step_wise"]``), so one file can hold both.

Self-play mode needs no expert: for each task, the agent's best sample is chosen and its worst
rejected (the same cut applies); tasks whose samples all score the same are ties.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import PurePosixPath
from typing import Iterable

from etokit.data.schema import Message, Pair, Trajectory
from etokit.data.validate import DataError

# construct_preference.py cuts the rejected side on these tasks only (ALFWorld keeps it whole).
TRUNCATED_ENVS = ("webshop", "scienceworld")
EXTRA_ROUNDS = 5  # a round = one agent turn + its observation
PROMPT_LEN = 3  # instruction, "OK", task turn


PAIR_MODES = ("trajectory", "step", "mixture", "self-play")
# construct_preference.py never reads these experts' rewards: it counts each as a success (1.0).
EXPERTS_SCORED_ONE = ("scienceworld", "alfworld")
# ... and scores an ALFWorld agent `1.0 if reward else 0.0` (a win is all that counts there).
BINARY_AGENT_ENVS = ("alfworld",)
REWARD_RULES = ("official", "stored")
EXPERT_OBSERVATION_RULES = ("drop-pair", "trim")


@dataclass(frozen=True)
class PairRule:
    """How explored trajectories are compared with experts. The defaults are construct_preference.py;
    each other value is a documented deviation, recorded on the pairs it makes.

    rewards: "official" scores experts and agents as the official code (ScienceWorld/ALFWorld experts
        1.0, ALFWorld agents 0/1); "stored" compares the rewards the files store.
    expert_observation: "drop-pair" drops a pair whose expert side ends on an observation (the
        official code keeps the expert untrimmed and drops pairs not ending on an agent turn);
        "trim" cuts that observation and keeps the pair.
    """

    rewards: str = "official"
    expert_observation: str = "drop-pair"

    def __post_init__(self) -> None:
        for name, allowed in (("rewards", REWARD_RULES), ("expert_observation", EXPERT_OBSERVATION_RULES)):
            if getattr(self, name) not in allowed:
                raise DataError(
                    f"unknown pair rule {name}={getattr(self, name)!r}, expected one of {', '.join(allowed)}"
                )

    def deviations(self) -> dict[str, str]:
        """The settings that differ from the official code (empty for the official rule)."""
        official = PairRule()
        return {k: v for k, v in asdict(self).items() if v != getattr(official, k)}

    def expert_score(self, t: Trajectory) -> float:
        return 1.0 if self.rewards == "official" and t.env in EXPERTS_SCORED_ONE else t.reward

    def agent_score(self, t: Trajectory) -> float:
        if self.rewards == "official" and t.env in BINARY_AGENT_ENVS:
            return 1.0 if t.reward else 0.0
        return t.reward


OFFICIAL_RULE = PairRule()


@dataclass
class PairStats:
    win: int = 0
    tie: int = 0
    lose: int = 0
    missing_expert: int = 0
    # Pairs that cannot train DPO: a side with no agent turn, or chosen == rejected.
    unusable: int = 0
    pairs: int = 0
    # Mixture mode: the counts of each mode ("trajectory", "step"); the fields above are their sums.
    by_mode: dict[str, "PairStats"] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out: dict = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "by_mode"}
        if self.by_mode:
            out["by_mode"] = {mode: stats.to_dict() for mode, stats in self.by_mode.items()}
        return out

    @classmethod
    def total(cls, by_mode: dict[str, "PairStats"]) -> "PairStats":
        counts = {f.name: sum(getattr(s, f.name) for s in by_mode.values()) for f in fields(cls) if f.name != "by_mode"}
        return cls(**counts, by_mode=dict(by_mode))


def is_step_wise(t: Trajectory) -> bool:
    """An episode played from a teacher-forced expert prefix (``etokit explore --step-wise-expert``)."""
    return isinstance(t.extra.get("step_wise"), dict)


def task_key(t: Trajectory) -> str:
    """What identifies "the same task" for a comparison. ALFWorld ids are not stable across the
    official data and a local game set, so (as the official code) it keys on the game: the
    ``trial_...`` folder of ``extra["game_file"]`` when present."""
    game_file = t.extra.get("game_file")
    if not game_file:
        return t.task_id
    trials = [p for p in PurePosixPath(str(game_file).replace("\\", "/")).parts if p.startswith("trial_")]
    return trials[-1] if trials else str(game_file)


def _split(
    t: Trajectory, what: str, prefix_steps: int = 0, *, trim: bool = True
) -> tuple[list[Message], list[Message]]:
    """(prompt, turns after it), a trailing observation dropped when ``trim``. A step-wise prompt
    also holds the ``prefix_steps`` teacher-forced steps (agent turn + observation each)."""
    msgs = t.messages
    if len(msgs) < PROMPT_LEN or [m["role"] for m in msgs[:PROMPT_LEN]] != ["user", "assistant", "user"]:
        raise DataError(
            f'{what} trajectory does not start with instruction (user), "OK" (assistant) and the task '
            "(user), the layout of the agent protocol",
            where=f"task {t.task_id!r}",
            field="messages",
        )
    end = PROMPT_LEN + 2 * prefix_steps
    if [m["role"] for m in msgs[PROMPT_LEN:end]] != ["assistant", "user"] * prefix_steps:
        raise DataError(
            f"{what} trajectory has no {prefix_steps}-step prefix of agent turns and observations after the task",
            where=f"task {t.task_id!r}",
            field="messages",
        )
    turns = _drop_trailing_observations(msgs[end:]) if trim else list(msgs[end:])
    return [dict(m) for m in msgs[:end]], [dict(m) for m in turns]


def _drop_trailing_observations(turns: list[Message]) -> list[Message]:
    turns = list(turns)
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()
    return turns


def _cut(env: str, rejected: list[Message], chosen: list[Message]) -> list[Message]:
    if env not in TRUNCATED_ENVS:
        return rejected
    return _drop_trailing_observations(rejected[: len(chosen) + 2 * EXTRA_ROUNDS])


def _pair(
    chosen_t: Trajectory,
    rejected_t: Trajectory,
    *,
    outcome: str | None,
    mode: str,
    iteration: int | None,
    stats: PairStats,
    cut_rejected: bool,
    prefix_steps: int | None = None,
    rule: PairRule | None = None,
    rewards: tuple[float, float] | None = None,
) -> Pair | None:
    """A pair, or None (counted unusable) when a side is empty or does not end on an agent turn, or
    both sides are the same. With a ``rule`` (expert-based modes), the expert side ("lose": chosen,
    "win": rejected) keeps a trailing observation unless the rule trims it; ``rewards`` are the
    (chosen, rejected) scores that were compared."""
    expert_side = {"lose": "chosen", "win": "rejected"}.get(outcome or "") if rule is not None else None
    trim_expert = rule is None or rule.expert_observation == "trim"
    prompt, chosen = _split(chosen_t, "chosen", prefix_steps or 0, trim=expert_side != "chosen" or trim_expert)
    _, rejected = _split(rejected_t, "rejected", prefix_steps or 0, trim=expert_side != "rejected" or trim_expert)
    if cut_rejected:
        rejected = _cut(chosen_t.env, rejected, chosen)
    ends_on_agent = all(side and side[-1]["role"] == "assistant" for side in (chosen, rejected))
    if not ends_on_agent or chosen == rejected:
        stats.unusable += 1
        return None
    extra: dict = {"chosen_source": chosen_t.source, "rejected_source": rejected_t.source}
    if prefix_steps is not None:
        extra["prefix_steps"] = prefix_steps
    if rule is not None and rule.deviations():
        extra["pair_rule"] = rule.deviations()
    chosen_reward, rejected_reward = rewards if rewards is not None else (chosen_t.reward, rejected_t.reward)
    for side, t, score in (("chosen", chosen_t, chosen_reward), ("rejected", rejected_t, rejected_reward)):
        if score != t.reward:  # the official score differs from what the file stores: keep both
            extra[f"{side}_stored_reward"] = t.reward
    for side, t in (("chosen", chosen_t), ("rejected", rejected_t)):
        if t.seed is not None:
            extra[f"{side}_seed"] = t.seed
        if t.model_revision:
            extra[f"{side}_model_revision"] = t.model_revision
    stats.pairs += 1
    return Pair(
        task_id=chosen_t.task_id,
        env=chosen_t.env,
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        chosen_reward=chosen_reward,
        rejected_reward=rejected_reward,
        outcome=outcome,
        mode=mode,
        iteration=iteration,
        extra=extra,
    )


def trajectory_pairs(
    experts: Iterable[Trajectory],
    explored: Iterable[Trajectory],
    *,
    iteration: int | None = None,
    rule: PairRule = OFFICIAL_RULE,
) -> tuple[list[Pair], PairStats]:
    """ETO's trajectory-wise pairs: each explored trajectory against the expert of its task.

    Several explored samples of one task each give their own comparison (the official code has
    one sample per task, where this is the same rule). Step-wise episodes are left to step_pairs.
    """
    by_key = _by_key(experts)
    stats, pairs = PairStats(), []
    for agent in explored:
        if is_step_wise(agent):
            continue
        expert = _expert_of(agent, by_key, stats)
        if expert is not None:
            _compare(expert, agent, mode="trajectory", iteration=iteration, stats=stats, pairs=pairs, rule=rule)
    return pairs, stats


def step_pairs(
    experts: Iterable[Trajectory],
    explored: Iterable[Trajectory],
    *,
    iteration: int | None = None,
    rule: PairRule = OFFICIAL_RULE,
) -> tuple[list[Pair], PairStats]:
    """Step-wise pairs (paper App. B): each step-wise episode's final reward against the expert's on
    its task, by the trajectory rule. The prompt is the usual prompt plus the teacher-forced expert
    prefix (steps 1..t-1), chosen/rejected the expert's and the agent's turns from step t on.
    Ordinary episodes are left to trajectory_pairs."""
    by_key = _by_key(experts)
    stats, pairs = PairStats(), []
    for agent in explored:
        if not is_step_wise(agent):
            continue
        expert = _expert_of(agent, by_key, stats)
        if expert is None:
            continue
        prefix_steps = agent.extra["step_wise"].get("prefix_steps")
        where = f"task {agent.task_id!r}, step-wise episode"
        if not isinstance(prefix_steps, int) or isinstance(prefix_steps, bool) or prefix_steps < 0:
            raise DataError(
                f"expected a non-negative integer, got {prefix_steps!r}",
                where=where,
                field="extra.step_wise.prefix_steps",
            )
        end = PROMPT_LEN + 2 * prefix_steps
        # Both sides must continue the same state: the agent's prefix is the expert's own turns.
        if len(expert.messages) <= end or agent.messages[PROMPT_LEN:end] != expert.messages[PROMPT_LEN:end]:
            raise DataError(
                f"its {prefix_steps}-step prefix is not the first {prefix_steps} steps of this expert "
                "(explored with another expert file?)",
                where=where,
                field="messages",
            )
        _compare(
            expert,
            agent,
            mode="step",
            iteration=iteration,
            stats=stats,
            pairs=pairs,
            prefix_steps=prefix_steps,
            rule=rule,
        )
    return pairs, stats


def mixture_pairs(
    experts: Iterable[Trajectory],
    explored: Iterable[Trajectory],
    *,
    iteration: int | None = None,
    rule: PairRule = OFFICIAL_RULE,
) -> tuple[list[Pair], PairStats]:
    """The union of trajectory pairs (ordinary episodes) and step pairs (step-wise episodes); the
    stats hold each mode's counts under ``by_mode`` and their sums."""
    experts, explored = list(experts), list(explored)
    trajectory, trajectory_stats = trajectory_pairs(experts, explored, iteration=iteration, rule=rule)
    step, step_stats = step_pairs(experts, explored, iteration=iteration, rule=rule)
    return trajectory + step, PairStats.total({"trajectory": trajectory_stats, "step": step_stats})


def _task_text_key(t: Trajectory) -> str | None:
    """ALFWorld's task turn (the room and the goal), whitespace-normalised: what identifies the game of
    an expert row that lost its ``game_file`` (the Hub copy of the paper's data keeps only id and
    conversations); an explored episode of the same game starts with the same turn."""
    if len(t.messages) < PROMPT_LEN:
        return None
    return "task-turn:" + " ".join(t.messages[PROMPT_LEN - 1]["content"].split())


def _by_key(experts: Iterable[Trajectory]) -> dict[str, Trajectory]:
    # The last expert of a task wins, as in the official code's dict (a repeated task id overwrites).
    by_key: dict[str, Trajectory] = {}
    for t in experts:
        by_key[task_key(t)] = t
        if t.env == "alfworld" and not t.extra.get("game_file") and (text := _task_text_key(t)) is not None:
            other = by_key.get(text)
            if other is not None and task_key(other) != task_key(t):
                raise DataError(
                    f"ALFWorld experts {other.task_id!r} and {t.task_id!r} have no game_file and the same "
                    "task turn, so which game each was played in is unknown; use rows that keep "
                    "game_file (the official local alfworld_sft.json)",
                    where=f"task {t.task_id!r}",
                    field="game_file",
                )
            by_key[text] = t
    return by_key


def _expert_of(agent: Trajectory, by_key: dict[str, Trajectory], stats: PairStats) -> Trajectory | None:
    expert = by_key.get(task_key(agent))
    if expert is None and agent.env == "alfworld" and (text := _task_text_key(agent)) is not None:
        expert = by_key.get(text)
    if expert is None:
        stats.missing_expert += 1
    elif expert.env != agent.env:
        raise DataError(
            f"the expert is from env {expert.env!r} but the explored trajectory from {agent.env!r}",
            where=f"task {agent.task_id!r}",
            field="env",
        )
    return expert


def _compare(
    expert: Trajectory,
    agent: Trajectory,
    *,
    mode: str,
    iteration: int | None,
    stats: PairStats,
    pairs: list[Pair],
    prefix_steps: int | None = None,
    rule: PairRule = OFFICIAL_RULE,
) -> None:
    """The official rule: agent < expert -> lose (expert chosen, agent cut), > -> win, = -> tie,
    on the rule's scores."""
    expert_score, agent_score = rule.expert_score(expert), rule.agent_score(agent)
    if agent_score < expert_score:
        stats.lose += 1
        pair = _pair(
            expert,
            agent,
            outcome="lose",
            mode=mode,
            iteration=iteration,
            stats=stats,
            cut_rejected=True,
            prefix_steps=prefix_steps,
            rule=rule,
            rewards=(expert_score, agent_score),
        )
    elif agent_score > expert_score:
        stats.win += 1
        pair = _pair(
            agent,
            expert,
            outcome="win",
            mode=mode,
            iteration=iteration,
            stats=stats,
            cut_rejected=False,
            prefix_steps=prefix_steps,
            rule=rule,
            rewards=(agent_score, expert_score),
        )
    else:
        stats.tie += 1
        return
    if pair is not None:
        pairs.append(pair)


def self_play_pairs(explored: Iterable[Trajectory], *, iteration: int | None = None) -> tuple[list[Pair], PairStats]:
    """Pairs from the agent's own samples: per task, best reward chosen, worst rejected. The first
    sample wins among equals, so the result does not depend on anything but the file's order.
    Step-wise episodes are skipped: episodes from different prefixes are not samples of one state."""
    groups: dict[str, list[Trajectory]] = {}
    for t in explored:
        if not is_step_wise(t):
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


def build_pairs(
    explored: Iterable[Trajectory],
    experts: Iterable[Trajectory] | None = None,
    *,
    mode: str = "trajectory",
    iteration: int | None = None,
    rule: PairRule = OFFICIAL_RULE,
) -> tuple[list[Pair], PairStats]:
    """Pairs for DPO from explored trajectories (and, in trajectory, step and mixture modes, the
    experts, compared by ``rule``; self-play has no expert and compares stored rewards)."""
    by_expert = {"trajectory": trajectory_pairs, "step": step_pairs, "mixture": mixture_pairs}
    if mode in by_expert:
        if experts is None:
            raise DataError(f"{mode} mode compares against expert trajectories: pass the experts")
        return by_expert[mode](experts, explored, iteration=iteration, rule=rule)
    if mode == "self-play":
        return self_play_pairs(explored, iteration=iteration)
    raise DataError(f"unknown pair mode {mode!r}, expected one of {', '.join(PAIR_MODES)}")
