"""The episode loop: the agent plays jobs in environments and every episode ends as a trajectory
(ETO's exploration phase; evaluation runs the same loop on the test splits; etokit.rollout.play
wraps it with the output files, the processes and the error policy).

Many episodes advance together. Each step renders every live episode's conversation with the
tokenizer's chat template, left-pads them into one batch, and makes ONE ``model.generate`` call
for the whole batch; the replies are parsed and sent to each episode's environment. An episode
that ends frees its slot for the next task in the queue (continuous batching at the episode
level), so the batch stays full until the queue runs dry. The jobs may belong to several splits
(each job's split is recorded in its trajectory): the run evaluates test-seen and test-unseen in
one queue, so both splits' episodes share the batches.

Conversations follow the agent protocol: instruction, "OK", the 1-shot example (prompt only,
never recorded), the task turn, then Thought/Action replies and observations. A reply without an
``Action:`` line gets INVALID_FORMAT_OBS and still counts as a step; the environment's
``max_steps`` ends the episode. A recorded trajectory ends on the agent's last reply.

Step-wise episodes (paper App. B) start from a teacher-forced expert prefix: the environment is
reset, the expert's first t-1 actions are replayed in it, the conversation holds the expert's
turns and observations of those steps, and the agent plays on from step t. The environment must
say what the expert saw: a replayed step whose observation differs from the expert's, or that
ends the episode, is recorded as an error (the prefix would not be the state the agent is in).
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from etokit.agent.protocol import INVALID_FORMAT_OBS, build_prompt, format_observation, parse_action
from etokit.data.schema import Message, Trajectory
from etokit.envs.base import Env
from etokit.errors import EtokitError
from etokit.faults import faultpoint
from etokit.pairs import PROMPT_LEN
from etokit.rollout.generator import ExploreConfig, Generator
from etokit.rollout.jobs import Job, expert_steps

# A model can reply with nothing at all (an end-of-turn token first). Trajectory files reject
# empty turns, so such a reply is recorded as this text; ``extra["empty_replies"]`` lists the
# step numbers (0-based) where that happened, so the turn can be told apart from real text.
EMPTY_REPLY = "(empty reply)"


class PrefixError(Exception):
    """The expert prefix of a step-wise episode cannot be replayed (the expert's action has no
    ``Action:`` line, the environment ends the episode or shows another observation). The same
    replay fails the same way, so unlike an environment failure it is not retried."""


@dataclass
class _Episode:
    job: Job
    split: str  # recorded in the trajectory
    env: Env
    prompt_len: int  # messages before the agent's first reply (1-shot example included)
    icl_len: int  # of which the 1-shot example
    messages: list[Message]
    max_steps: int
    reward: float = 0.0
    steps: int = 0
    invalid: int = 0
    empty: list[int] = field(default_factory=list)
    done: bool = False
    stop: str | None = None  # why an episode ended other than by the env: "context", "error"
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0  # 0 = first try; n = n-th replay after an environment failure
    prefix_steps: int = 0  # expert steps replayed before the agent's first reply (step-wise)


# ------------------------------------------------------------------------------------ engine


def run_episodes(
    generator: Generator,
    envs: Sequence[Env],
    jobs: Sequence[Job],
    *,
    split: str | Sequence[str],
    model_name: str | None = None,
    model_revision: str | None = None,
    on_step: Callable[[int], None] | None = None,
    experts: Mapping[str, Trajectory] | None = None,
) -> Iterator[Trajectory]:
    """Play ``jobs`` with up to ``len(envs)`` episodes in flight; yield each Trajectory as it ends
    (completion order). ``split``: the split every job is recorded under, or one per job (jobs of
    several splits in one queue). ``on_step(n)`` is called after each batched step with the live
    count. Step-wise jobs replay the prefix of ``experts[task_id]`` (see index_experts)."""
    splits = [split] * len(jobs) if isinstance(split, str) else list(split)
    if len(splits) != len(jobs):
        raise ValueError(f"run_episodes: {len(splits)} splits for {len(jobs)} jobs")
    config = generator.config
    if config.temperature > 0:
        import torch

        torch.manual_seed(config.seed)
        random.seed(config.seed)
    from etokit.envs.worker import EnvWorker

    queue: deque[tuple[Job, str, int]] = deque((job, s, 0) for job, s in zip(jobs, splits))  # (job, split, attempt)
    slots: list[_Episode | None] = [None] * len(envs)
    threaded = any(isinstance(env, EnvWorker) for env in envs)  # workers step in parallel
    with ThreadPoolExecutor(len(envs)) if threaded else _Inline() as pool:
        while queue or any(slots):
            for i, env in enumerate(envs):
                while slots[i] is None and queue:
                    job, job_split, attempt = queue.popleft()
                    try:
                        slots[i] = _start(env, job, job_split, config, attempt, experts)
                    except EtokitError:
                        raise
                    except PrefixError as e:
                        yield _failed_reset(env, job, job_split, model_name, model_revision, config, e, stop="prefix")
                    except Exception as e:  # the env failed at reset: the same as failing at a step
                        if attempt < config.env_retries:
                            queue.appendleft((job, job_split, attempt + 1))
                        else:
                            yield _failed_reset(env, job, job_split, model_name, model_revision, config, e)
            live = [ep for ep in slots if ep is not None]
            if not live:
                continue
            encoded = [generator.encode(ep.messages) for ep in live]
            for ep, ids in zip(live, encoded):
                if not generator.fits(ids):
                    if not ep.steps:
                        raise EtokitError(
                            f"task {ep.job.task_id!r}: the prompt alone is {len(ids)} tokens; with max_new_tokens "
                            f"{generator.config.max_new_tokens} it exceeds the model's context of "
                            f"{generator.max_context} tokens"
                        )
                    ep.done, ep.stop = True, "context"
                    if ep.steps == ep.prefix_steps:  # a step-wise episode whose prefix leaves no room to act
                        ep.stop, ep.error = (
                            "prefix",
                            (
                                f"the prompt and the {ep.prefix_steps}-step expert prefix "
                                f"are {len(ids)} tokens: no room for a reply within the "
                                f"model's context of {generator.max_context} tokens"
                            ),
                        )
            active = [(ep, ids) for ep, ids in zip(live, encoded) if not ep.done]
            if active:
                replies = generator.generate(
                    [ids for _, ids in active],
                    keys=[id(ep) for ep, _ in active],
                    seeds=[step_seed(config.seed + ep.job.sample, ep.job, ep.steps) for ep, _ in active],
                )
                faultpoint("explore.mid-batch")  # crash tests: replies generated, not yet sent to the envs
                list(pool.map(lambda a: _act(a[0], a[1]), [(ep, r) for (ep, _), r in zip(active, replies)]))
            if on_step is not None:
                on_step(len(active))
            for i, ep in enumerate(slots):
                if ep is not None and ep.done:
                    slots[i] = None
                    if ep.stop == "error" and ep.attempt < config.env_retries:
                        queue.appendleft((ep.job, ep.split, ep.attempt + 1))  # replayed next, from its reset
                        continue
                    yield _trajectory(ep, model_name, model_revision, config)


def step_seed(seed: int, job: Job, step: int) -> int:
    """The seed of one reply's sampling: the episode's recorded ``seed`` (run seed + sample index),
    its task, sample, step-wise prefix and the step number. It names the reply, not its place in a
    batch, so an episode samples the same replies whatever shares its batch, however many processes
    play the run and wherever a resume restarts it; a recorded row holds all of it."""
    key = f"{seed}/{job.task_id}/{job.sample}/{job.prefix_steps}/{step}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


def _last_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


class _Inline:
    """The ThreadPoolExecutor interface, run in the calling thread (in-process envs)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @staticmethod
    def map(fn, items):
        return map(fn, items)


def _start(
    env: Env,
    job: Job,
    split: str,
    config: ExploreConfig,
    attempt: int = 0,
    experts: Mapping[str, Trajectory] | None = None,
) -> _Episode:
    expert = None
    if job.prefix_steps is not None:
        expert = (experts or {}).get(job.task_id)
        if expert is None:
            raise EtokitError(f"task {job.task_id!r}: a step-wise job needs the task's expert trajectory")
    reset = env.reset(job.task_id)
    messages = build_prompt(env.name, reset, icl=config.icl, instruction=config.instruction)
    icl_len = len(messages) - 3
    info = {k: v for k, v in reset.info.items() if k == "game_file"}
    ep = _Episode(
        job=job,
        split=split,
        env=env,
        prompt_len=len(messages),
        icl_len=icl_len,
        messages=messages,
        max_steps=config.max_steps or env.max_steps,
        info=info,
        attempt=attempt,
    )
    if expert is not None:
        ep.info["step_wise"] = _step_wise(job, expert_steps(expert))  # recorded in the trajectory's extra
        _replay_prefix(ep, expert, job.prefix_steps or 0)
    return ep


def _replay_prefix(ep: _Episode, expert: Trajectory, prefix_steps: int) -> None:
    """Teacher-force the expert's first ``prefix_steps`` steps: step them in the environment and
    append the expert's own turns, so the agent's step t sees what the expert saw."""
    if prefix_steps >= ep.max_steps:
        raise PrefixError(
            f"a prefix of {prefix_steps} expert steps leaves none of the {ep.max_steps} steps to the agent"
        )
    turns = expert.messages[PROMPT_LEN:]
    if len(turns) < 2 * prefix_steps + 1:
        raise PrefixError(f"the expert has {expert_steps(expert)} steps, fewer than the prefix of {prefix_steps} + 1")
    for i in range(prefix_steps):
        reply, observation = turns[2 * i], turns[2 * i + 1]
        action = parse_action(reply["content"])
        if reply["role"] != "assistant" or observation["role"] != "user" or action is None:
            raise PrefixError(f"expert step {i + 1}: expected an agent turn with an Action: line and its observation")
        result = ep.env.step(action)  # an exception here is an environment failure: retried from the reset
        if result.done:
            raise PrefixError(
                f"the environment ended the episode at expert step {i + 1} of the "
                f"{prefix_steps}-step prefix (reward {result.reward:g})"
            )
        seen = format_observation(result.observation)
        if seen.split() != observation["content"].split():  # whitespace aside, the same text
            raise PrefixError(
                f"after expert step {i + 1} ({action!r}) the environment shows {seen[:80]!r}, the "
                f"expert saw {observation['content'][:80]!r}"
            )
        ep.messages += [dict(reply), dict(observation)]
        ep.reward = result.reward
    ep.steps = ep.prefix_steps = prefix_steps


def _step_wise(job: Job, expert_n: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"prefix_steps": job.prefix_steps}
    if expert_n is not None:
        out["expert_steps"] = expert_n
    return out


def _failed_reset(
    env: Env,
    job: Job,
    split: str,
    model_name: str | None,
    revision: str | None,
    config: ExploreConfig,
    e: Exception,
    stop: str = "error",
) -> Trajectory:
    """The error record of an episode whose environment never started it (no turns), or whose
    expert prefix could not be replayed (``stop="prefix"``)."""
    extra: dict[str, Any] = {
        "sample": job.sample,
        "stopped": stop,
        "error": _last_line(e) if stop == "error" else str(e),
    }
    if job.prefix_steps is not None:
        extra["step_wise"] = _step_wise(job)
    if config.env_retries and stop == "error":
        extra["env_retries"] = config.env_retries
    return Trajectory(
        task_id=job.task_id,
        env=env.name,
        split=split,
        messages=[],
        reward=0.0,
        num_steps=0,
        source="explore",
        model=model_name,
        model_revision=revision,
        seed=config.seed + job.sample,
        extra=extra,
    )


def _act(ep: _Episode, reply: str) -> None:
    if reply == "":
        ep.empty.append(ep.steps)
    ep.messages.append({"role": "assistant", "content": reply or EMPTY_REPLY})
    action = parse_action(reply)
    ep.steps += 1
    if action is None:
        ep.invalid += 1
        observation, done = INVALID_FORMAT_OBS, False
    else:
        try:
            result = ep.env.step(action)
        except Exception as e:  # a crashed or hung env worker: report the episode, keep the run going
            ep.done, ep.stop, ep.error = True, "error", _last_line(e)
            return
        ep.reward, done, observation = result.reward, result.done, result.observation
    ep.done = done or ep.steps >= ep.max_steps
    if not ep.done:
        ep.messages.append({"role": "user", "content": format_observation(observation)})


def _trajectory(ep: _Episode, model_name: str | None, revision: str | None, config: ExploreConfig) -> Trajectory:
    # Recorded without the 1-shot example: it is prompt scaffolding, not part of the trajectory.
    messages = ep.messages[:2] + ep.messages[2 + ep.icl_len :]
    extra: dict[str, Any] = {"invalid_actions": ep.invalid, "sample": ep.job.sample, **ep.info}
    if ep.empty:
        extra["empty_replies"] = ep.empty
    if ep.stop:
        extra["stopped"] = ep.stop
    if ep.error:
        extra["error"] = ep.error
    if ep.attempt:
        extra["env_retries"] = ep.attempt  # a replay after the environment failed (the earlier tries are not kept)
    if config.temperature > 0:
        extra.update(temperature=config.temperature, top_p=config.top_p)
    return Trajectory(
        task_id=ep.job.task_id,
        env=ep.env.name,
        split=ep.split,
        messages=messages,
        reward=ep.reward,
        num_steps=ep.steps,
        source="explore",
        model=model_name,
        model_revision=revision,
        seed=config.seed + ep.job.sample,
        extra=extra,
    )
