"""Exploration: the agent plays tasks in an environment and every episode is recorded (ETO's
exploration phase; evaluation runs the same engine on the test splits).

Many episodes advance together. Each step renders every live episode's conversation with the
tokenizer's chat template, left-pads them into one batch, and makes ONE ``model.generate`` call
for the whole batch; the replies are parsed and sent to each episode's environment. An episode
that ends frees its slot for the next task in the queue (continuous batching at the episode
level), so the batch stays full until the queue runs dry.

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
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping, Sequence

from etokit.agent.protocol import INVALID_FORMAT_OBS, STOP_STRINGS, build_prompt, format_observation, parse_action
from etokit.data.schema import Message, Trajectory
from etokit.envs.base import Env
from etokit.errors import EtokitError
from etokit.faults import faultpoint
from etokit.kv_reuse import KVReuseDecoder, kv_reuse_unsupported
from etokit.pairs import PROMPT_LEN

# A model can reply with nothing at all (an end-of-turn token first). Trajectory files reject
# empty turns, so such a reply is recorded as this text; ``extra["empty_replies"]`` lists the
# step numbers (0-based) where that happened, so the turn can be told apart from real text.
EMPTY_REPLY = "(empty reply)"

# Envs whose simulator is a JVM run in subprocess workers: a crash or hang there must not take
# the model down with it. The others step in-process (microseconds to milliseconds a step).
SUBPROCESS_ENVS = ("scienceworld", "alfworld")


@dataclass
class ExploreConfig:
    """How the agent decodes and how many episodes share a batch."""

    batch_size: int = 16
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (the paper's exploration and evaluation)
    top_p: float = 1.0
    icl: bool = True  # the 1-shot example in the prompt
    seed: int = 0
    max_steps: int | None = None  # None = the environment's own limit
    # An episode whose environment fails (a worker or JVM that died, a step past the timeout) is
    # played again from its reset this many times before it is recorded as an error.
    env_retries: int = 1
    # Keep each episode's KV cache between steps and prefill only what is new (etokit/kv_reuse.py);
    # False re-encodes the whole conversation with model.generate at every step.
    kv_reuse: bool = True
    # With kv_reuse: the KV cache preallocated and written in place (etokit/slot_cache.py); False grows
    # transformers' DynamicCache by concatenation at every token (the engine before, kept as the reference).
    kv_in_place: bool = True
    # The instruction turn (the prompt's first user message): None is etokit's own for the
    # environment (etokit/agent/prompts/); a policy cloned on other expert data (the paper's
    # published trajectories) is explored with that data's instruction, the one it was trained on.
    instruction: str | None = None


@dataclass(frozen=True)
class Job:
    """One episode to play: a task, which sample of it (Best-of-N / self-play) and, for a
    step-wise episode, how many of the expert's steps are replayed before the agent plays."""

    task_id: str
    sample: int = 0
    # None: an ordinary episode. t-1 >= 0: step-wise from step t (0 differs from None: a step-wise
    # episode from step 1 plays like an ordinary one but belongs to the step-wise pairs).
    prefix_steps: int | None = None


class PrefixError(Exception):
    """The expert prefix of a step-wise episode cannot be replayed (the expert's action has no
    ``Action:`` line, the environment ends the episode or shows another observation). The same
    replay fails the same way, so unlike an environment failure it is not retried."""


@dataclass
class _Episode:
    job: Job
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


def model_revision(model: str, revision: str | None) -> str:
    """What exactly was loaded: the commit sha for a Hub model; for a local folder "local:" and a
    fingerprint of its config and weight files (name, size, first and last MiB: cheap on 14 GB
    checkpoints, and any retraining changes it)."""
    path = Path(model)
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(path.iterdir()):
            if f.is_file() and f.suffix in (".json", ".safetensors"):
                size = f.stat().st_size
                digest.update(f"{f.name}:{size}:".encode())
                with open(f, "rb") as fh:
                    digest.update(fh.read(1 << 20))
                    if size > 1 << 21:
                        fh.seek(-(1 << 20), 2)
                        digest.update(fh.read())
        return f"local:{digest.hexdigest()[:16]}"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return HfApi().model_info(model, revision=revision).sha
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise EtokitError(f"--model {model}{'@' + revision if revision else ''}: not a local folder and not found "
                          f"on the Hub ({str(e).splitlines()[0]})") from None


def split_model_ref(ref: str) -> tuple[str, str | None]:
    """``PATH_OR_REPO[@REV]`` -> (name, revision). A local path containing "@" stays whole."""
    if Path(ref).exists() or "@" not in ref:
        return ref, None
    name, _, revision = ref.rpartition("@")
    if not name or not revision:
        raise EtokitError(f"--model {ref!r}: expected PATH_OR_REPO or REPO@REVISION")
    from etokit.data.names import check_repo_id, check_revision

    return check_repo_id(name, "--model"), check_revision(revision, "--model revision")


def open_envs(name: str, n: int, options: dict[str, Any] | None = None, step_timeout: float = 60.0,
              isolate: bool | None = None) -> list[Env]:
    """``n`` environments, one per batch slot; in subprocess workers with ``isolate`` (default:
    the JVM-heavy envs of SUBPROCESS_ENVS), where a crash or a hang costs one episode."""
    from etokit.envs.registry import env_class, make

    ok, detail = env_class(name).check()
    if not ok:
        raise EtokitError(f"--env {name}: not available here ({detail})")
    if name in SUBPROCESS_ENVS if isolate is None else isolate:
        from etokit.envs.worker import WorkerPool

        return list(WorkerPool(name, options, n=n, step_timeout=step_timeout).workers)
    return [make(name, **(options or {})) for _ in range(n)]


def close_envs(envs: Sequence[Env]) -> None:
    for env in envs:
        env.close()


# --------------------------------------------------------------------------------- generation


class Generator:
    """Batched chat-template generation with stop strings, for one model and tokenizer."""

    def __init__(self, model, tokenizer, config: ExploreConfig):
        import torch
        from transformers import GenerationConfig

        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        sampling = config.temperature > 0
        self.generation_config = GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            do_sample=sampling,
            temperature=config.temperature if sampling else None,
            top_p=config.top_p if sampling else None,
            top_k=None,
            eos_token_id=model.generation_config.eos_token_id,
            pad_token_id=self.pad_id,
            stop_strings=list(STOP_STRINGS),
        )
        self.max_context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        self.device = next(model.parameters()).device
        self._torch = torch
        self.decoder = None
        if config.kv_reuse and kv_reuse_unsupported(model) is None:
            eos = self.generation_config.eos_token_id
            self.decoder = KVReuseDecoder(
                model, pad_id=self.pad_id, eos_ids=[eos] if isinstance(eos, int) else list(eos or []),
                max_new_tokens=config.max_new_tokens, stopped=self._stopped, temperature=config.temperature,
                top_p=config.top_p, seed=config.seed, in_place=config.kv_in_place)

    def _stopped(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return any(s in text for s in STOP_STRINGS)

    def encode(self, messages: list[Message]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template writes its own BOS and role tokens.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def fits(self, ids: list[int]) -> bool:
        return len(ids) + self.config.max_new_tokens <= self.max_context

    def generate(self, batch: list[list[int]], keys: Sequence[Any] | None = None,
                 seeds: Sequence[int] | None = None) -> list[str]:
        """One reply per prompt. ``keys`` name each row's episode, so that its KV cache is kept for
        its next step (see KVReuseDecoder); without keys every prompt is encoded from scratch.
        ``seeds`` seed each row's sampling (KV-reuse engine; model.generate draws from torch's global
        generator, seeded once per run)."""
        if self.decoder is not None and keys is not None:
            out = self.decoder.generate(batch, keys, seeds)
            return [cut_at_stop(t) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        torch = self._torch
        width = max(map(len, batch))
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):  # left padding: every prompt ends where generation starts
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention_mask[i, width - len(ids):] = 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids.to(self.device),
                                      attention_mask=attention_mask.to(self.device),
                                      generation_config=self.generation_config, tokenizer=self.tokenizer)
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        # Generation stops a row at a stop string but keeps the rows around it going (and the
        # stopped row may hold a few tokens past it): cut every reply at its first stop string.
        return [cut_at_stop(t) for t in texts]


def cut_at_stop(text: str) -> str:
    cuts = [i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0]
    return text[:min(cuts)] if cuts else text


# ------------------------------------------------------------------------------------ engine


def run_episodes(generator: Generator, envs: Sequence[Env], jobs: Sequence[Job], *, split: str,
                 model_name: str | None = None, model_revision: str | None = None,
                 on_step: Callable[[int], None] | None = None,
                 experts: Mapping[str, Trajectory] | None = None) -> Iterator[Trajectory]:
    """Play ``jobs`` with up to ``len(envs)`` episodes in flight; yield each Trajectory as it ends
    (completion order). ``on_step(n)`` is called after each batched step with the live count.
    Step-wise jobs replay the prefix of ``experts[task_id]`` (see index_experts)."""
    config = generator.config
    if config.temperature > 0:
        import torch

        torch.manual_seed(config.seed)
        random.seed(config.seed)
    from etokit.envs.worker import EnvWorker

    queue: deque[tuple[Job, int]] = deque((job, 0) for job in jobs)  # (job, attempt)
    slots: list[_Episode | None] = [None] * len(envs)
    threaded = any(isinstance(env, EnvWorker) for env in envs)  # workers step in parallel
    with ThreadPoolExecutor(len(envs)) if threaded else _Inline() as pool:
        while queue or any(slots):
            for i, env in enumerate(envs):
                while slots[i] is None and queue:
                    job, attempt = queue.popleft()
                    try:
                        slots[i] = _start(env, job, config, attempt, experts)
                    except EtokitError:
                        raise
                    except PrefixError as e:
                        yield _failed_reset(env, job, split, model_name, model_revision, config, e, stop="prefix")
                    except Exception as e:  # the env failed at reset: the same as failing at a step
                        if attempt < config.env_retries:
                            queue.appendleft((job, attempt + 1))
                        else:
                            yield _failed_reset(env, job, split, model_name, model_revision, config, e)
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
                            f"{generator.max_context} tokens")
                    ep.done, ep.stop = True, "context"
                    if ep.steps == ep.prefix_steps:  # a step-wise episode whose prefix leaves no room to act
                        ep.stop, ep.error = "prefix", (f"the prompt and the {ep.prefix_steps}-step expert prefix "
                                                       f"are {len(ids)} tokens: no room for a reply within the "
                                                       f"model's context of {generator.max_context} tokens")
            active = [(ep, ids) for ep, ids in zip(live, encoded) if not ep.done]
            if active:
                replies = generator.generate([ids for _, ids in active], keys=[id(ep) for ep, _ in active],
                                             seeds=[step_seed(config.seed + ep.job.sample, ep.job, ep.steps)
                                                    for ep, _ in active])
                faultpoint("explore.mid-batch")  # crash tests: replies generated, not yet sent to the envs
                list(pool.map(lambda a: _act(a[0], a[1]), [(ep, r) for (ep, _), r in zip(active, replies)]))
            if on_step is not None:
                on_step(len(active))
            for i, ep in enumerate(slots):
                if ep is not None and ep.done:
                    slots[i] = None
                    if ep.stop == "error" and ep.attempt < config.env_retries:
                        queue.appendleft((ep.job, ep.attempt + 1))  # replayed next, from its reset
                        continue
                    yield _trajectory(ep, split, model_name, model_revision, config)


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


def _start(env: Env, job: Job, config: ExploreConfig, attempt: int = 0,
           experts: Mapping[str, Trajectory] | None = None) -> _Episode:
    expert = None
    if job.prefix_steps is not None:
        expert = (experts or {}).get(job.task_id)
        if expert is None:
            raise EtokitError(f"task {job.task_id!r}: a step-wise job needs the task's expert trajectory")
    reset = env.reset(job.task_id)
    messages = build_prompt(env.name, reset, icl=config.icl, instruction=config.instruction)
    icl_len = len(messages) - 3
    info = {k: v for k, v in reset.info.items() if k == "game_file"}
    ep = _Episode(job=job, env=env, prompt_len=len(messages), icl_len=icl_len, messages=messages,
                  max_steps=config.max_steps or env.max_steps, info=info, attempt=attempt)
    if expert is not None:
        ep.info["step_wise"] = _step_wise(job, expert_steps(expert))  # recorded in the trajectory's extra
        _replay_prefix(ep, expert, job.prefix_steps or 0)
    return ep


def _replay_prefix(ep: _Episode, expert: Trajectory, prefix_steps: int) -> None:
    """Teacher-force the expert's first ``prefix_steps`` steps: step them in the environment and
    append the expert's own turns, so the agent's step t sees what the expert saw."""
    if prefix_steps >= ep.max_steps:
        raise PrefixError(f"a prefix of {prefix_steps} expert steps leaves none of the {ep.max_steps} steps to "
                          "the agent")
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
            raise PrefixError(f"the environment ended the episode at expert step {i + 1} of the "
                              f"{prefix_steps}-step prefix (reward {result.reward:g})")
        seen = format_observation(result.observation)
        if seen.split() != observation["content"].split():  # whitespace aside, the same text
            raise PrefixError(f"after expert step {i + 1} ({action!r}) the environment shows {seen[:80]!r}, the "
                              f"expert saw {observation['content'][:80]!r}")
        ep.messages += [dict(reply), dict(observation)]
        ep.reward = result.reward
    ep.steps = ep.prefix_steps = prefix_steps


def _step_wise(job: Job, expert_n: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"prefix_steps": job.prefix_steps}
    if expert_n is not None:
        out["expert_steps"] = expert_n
    return out


def _failed_reset(env: Env, job: Job, split: str, model_name: str | None, revision: str | None,
                  config: ExploreConfig, e: Exception, stop: str = "error") -> Trajectory:
    """The error record of an episode whose environment never started it (no turns), or whose
    expert prefix could not be replayed (``stop="prefix"``)."""
    extra: dict[str, Any] = {"sample": job.sample, "stopped": stop,
                             "error": _last_line(e) if stop == "error" else str(e)}
    if job.prefix_steps is not None:
        extra["step_wise"] = _step_wise(job)
    if config.env_retries and stop == "error":
        extra["env_retries"] = config.env_retries
    return Trajectory(task_id=job.task_id, env=env.name, split=split, messages=[], reward=0.0, num_steps=0,
                      source="explore", model=model_name, model_revision=revision, seed=config.seed + job.sample,
                      extra=extra)


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


def _trajectory(ep: _Episode, split: str, model_name: str | None, revision: str | None,
                config: ExploreConfig) -> Trajectory:
    # Recorded without the 1-shot example: it is prompt scaffolding, not part of the trajectory.
    messages = ep.messages[:2] + ep.messages[2 + ep.icl_len:]
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
    return Trajectory(task_id=ep.job.task_id, env=ep.env.name, split=split, messages=messages, reward=ep.reward,
                      num_steps=ep.steps, source="explore", model=model_name, model_revision=revision,
                      seed=config.seed + ep.job.sample, extra=extra)


# --------------------------------------------------------------------------- multi-process


def shard(jobs: Sequence[Job], state) -> list[Job]:
    """This process's share of ``jobs`` under ``accelerate launch`` (contiguous blocks, as
    ``split_between_processes``; padding would replay the last job, so none is asked for)."""
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


# ----------------------------------------------------------------------------------- step-wise


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
            return DataError(problem, path=path, row=row, record_id=t.task_id, field=field,
                             where=None if path is not None else f"expert of task {t.task_id!r}")

        if [m["role"] for m in t.messages[:PROMPT_LEN]] != ["user", "assistant", "user"]:
            raise error("expected the instruction (user), \"OK\" (assistant) and the task (user) first")
        if not expert_steps(t):
            raise error("no agent turn after the task: nothing to replay")
        for j, m in enumerate(t.messages[PROMPT_LEN:], PROMPT_LEN):
            if m["role"] == "assistant" and parse_action(m["content"]) is None:
                raise error("an expert turn without an Action: line cannot be replayed", f"messages[{j}].content")
        if t.env == "alfworld" and not t.extra.get("game_file") and t.extra.get("eto_id") is not None:
            raise error("an official ALFWorld expert row without game_file: the game its steps were played in is "
                        "unknown (the Hub copy of the paper's data drops game_file; the official local "
                        "alfworld_sft.json keeps it)", "game_file")
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


def plan_step_jobs(experts: Mapping[str, Trajectory], steps_per_task: int | None, *, seed: int,
                   samples_per_task: int = 1, done: set[Job] | frozenset = frozenset(),
                   max_steps: int | None = None) -> list[Job]:
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
        jobs += [job for t in steps for s in range(samples_per_task)
                 if (job := Job(task_id, s, t - 1)) not in done]
    return jobs
