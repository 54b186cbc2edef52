"""The episodes a rollout plays: jobs (task, sample, step-wise prefix), their plan, each process's
share of them and the merge of the shares, and the expert trajectories step-wise jobs replay."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence, TypeVar

from etokit.agent.protocol import parse_action
from etokit.data.schema import Trajectory
from etokit.pairs import PROMPT_LEN

T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """One episode to play: a task, which sample of it (Best-of-N / self-play) and, for a
    step-wise episode, how many of the expert's steps are replayed before the agent plays."""

    task_id: str
    sample: int = 0
    # None: an ordinary episode. t-1 >= 0: step-wise from step t (0 differs from None: a step-wise
    # episode from step 1 plays like an ordinary one but belongs to the step-wise pairs).
    prefix_steps: int | None = None


def shard(jobs: Sequence[T], state) -> list[T]:
    """This process's share of ``jobs`` (Jobs, or (split, Job) pairs) under ``accelerate launch``
    (contiguous blocks, as ``split_between_processes``; padding would replay the last job, so none
    is asked for)."""
    with state.split_between_processes(list(jobs), apply_padding=False) as mine:
        return list(mine)


def merge_shards(jobs: Sequence[Job], shards: Sequence[Sequence[Trajectory]]) -> list[Trajectory]:
    """The ranks' trajectories as one list in ``jobs`` order, each job once (a job a rank played
    twice, e.g. after a padded split or a retried rank, keeps its first record)."""
    by_job: dict[Job, Trajectory] = {}
    for trajectories in shards:
        for t in trajectories:
            by_job.setdefault(job_of(t), t)
    return [by_job[j] for j in jobs if j in by_job]


def job_of(t: Trajectory) -> Job:
    step_wise = t.extra.get("step_wise")
    prefix = int(step_wise["prefix_steps"]) if isinstance(step_wise, dict) else None
    return Job(t.task_id, int(t.extra.get("sample", 0)), prefix)


def plan_jobs(task_ids: Sequence[str], samples_per_task: int, done: set[Job] | frozenset = frozenset()) -> list[Job]:
    """Every (task, sample) not already recorded in ``done``."""
    return [job for t in task_ids for s in range(samples_per_task) if (job := Job(t, s)) not in done]


def expert_steps(expert: Trajectory) -> int:
    """N, the expert's agent steps: its assistant turns after the prompt."""
    return sum(m["role"] == "assistant" for m in expert.messages[PROMPT_LEN:])


def index_experts(experts: Sequence[Trajectory], *, path: str | Path | None = None) -> dict[str, Trajectory]:
    """The expert of each task id (the first row of a task wins, as in the pairs), checked for
    step-wise replay: the protocol's prompt, then agent turns that each carry an ``Action:`` line.
    Errors name the file, row and message."""
    from etokit.data.validate import DataError

    by_task: dict[str, Trajectory] = {}
    for row, t in enumerate(experts):

        def error(problem: str, field: str = "messages") -> DataError:
            return DataError(
                problem,
                path=path,
                row=row,
                record_id=t.task_id,
                field=field,
                where=None if path is not None else f"expert of task {t.task_id!r}",
            )

        if [m["role"] for m in t.messages[:PROMPT_LEN]] != ["user", "assistant", "user"]:
            raise error('expected the instruction (user), "OK" (assistant) and the task (user) first')
        if not expert_steps(t):
            raise error("no agent turn after the task: nothing to replay")
        for j, m in enumerate(t.messages[PROMPT_LEN:], PROMPT_LEN):
            if m["role"] == "assistant" and parse_action(m["content"]) is None:
                raise error("an expert turn without an Action: line cannot be replayed", f"messages[{j}].content")
        if t.env == "alfworld" and not t.extra.get("game_file") and t.extra.get("eto_id") is not None:
            raise error(
                "an official ALFWorld expert row without game_file: the game its steps were played in is "
                "unknown (the Hub copy of the paper's data drops game_file; the official local "
                "alfworld_sft.json keeps it)",
                "game_file",
            )
        by_task.setdefault(t.task_id, t)
    return by_task


def experts_of_tasks(experts: Mapping[str, Trajectory], task_ids: Sequence[str]) -> dict[str, Trajectory]:
    """The expert of each environment task that has one, keyed by the environment's task id. An
    official ALFWorld row is keyed by its own id, not the game's: it is matched on the game's
    ``trial_...`` folder, as the pairs are (etokit.pairs.task_key)."""
    from etokit.pairs import task_key

    by_game = {task_key(t): t for t in experts.values() if t.extra.get("game_file")}
    found = {}
    for task_id in task_ids:
        expert = experts.get(task_id) or by_game.get(PurePosixPath(task_id).name)
        if expert is not None:
            found[task_id] = expert
    return found


def plan_step_jobs(
    experts: Mapping[str, Trajectory],
    steps_per_task: int | None,
    *,
    seed: int,
    samples_per_task: int = 1,
    done: set[Job] | frozenset = frozenset(),
    max_steps: int | None = None,
) -> list[Job]:
    """Step-wise jobs: per task, ``steps_per_task`` distinct steps t in [1, N] (all of them when
    None or >= N), each played from the expert's first t-1 steps; minus those in ``done``. With an
    episode limit of ``max_steps`` only t <= max_steps leave the agent a step to play. Each
    task's steps are the first K of a shuffle seeded by (seed, task id): they do not depend on
    which other tasks are played (--limit, sharding), and a larger K extends a smaller one (a
    re-run with more steps per task adds to what is recorded)."""
    jobs = []
    for task_id, expert in experts.items():
        steps = list(range(1, expert_steps(expert) + 1))
        if steps_per_task is not None and steps_per_task < len(steps):
            random.Random(f"{seed}/{task_id}").shuffle(steps)
        # The limit filters the shuffled order, so it changes no draw that fits within it.
        steps = sorted([t for t in steps if max_steps is None or t <= max_steps][:steps_per_task])
        jobs += [job for t in steps for s in range(samples_per_task) if (job := Job(task_id, s, t - 1)) not in done]
    return jobs
