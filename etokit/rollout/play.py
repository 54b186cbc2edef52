"""Playing splits with a policy: the one rollout path of `etokit explore`, `etokit eval` and the
run's explore and eval stages (etokit.run). ``play_splits`` opens the environments, plans each
split's jobs, skips those already recorded, shares the rest among the processes, plays them
(etokit.rollout.episodes), records each episode as it ends and returns what happened; ``play`` is
``play_splits`` with one split. Its policy, the same for every caller:

- One pool: the jobs of every split are played in one queue (split after split, each in planned
  order), so the episodes of several splits share the batches (the run evaluates test-seen and
  test-unseen together: on CPU a forward of 32 rows costs little more than one of 16). Each split
  keeps its own output file, result and order, as if played alone; a job is known by its split
  and (task, sample, step-wise prefix), as two splits may share task ids.
- Environments: ``batch_size`` of them (one per batch slot), opened here with ``env_options`` and
  closed when play returns or raises.
- Resume: with an output file ``out`` for a split, a job of that split whose episode is already in
  ``out`` (same task, sample and step-wise prefix) is not played again. Each new episode is
  appended to its split's file as it ends, one fsynced line: a crash loses at most the episodes in
  flight.
- Sharding: under ``accelerate launch`` / ``torchrun`` each process plays a contiguous block of
  the jobs left (of every split, pooled; accelerate's split_between_processes, no padding). With
  ``out`` a process appends to its own part file next to it; the main process merges the parts into
  ``out`` and removes them (parts left by an interrupted run are merged at the next start).
  Without ``out`` the episodes are gathered in memory.
- Order: the planned order. When play returns, each split's ``out`` holds first the records that
  were there and are not in this plan (as they were), then this plan's episodes in planned order,
  whatever the completion order, the number of processes or where a crash split the work
  (rewritten atomically). Each result lists the episodes in the same order.
- Environment errors: an episode whose environment failed after ``ExploreConfig.env_retries``
  replays, or whose step-wise expert prefix cannot be replayed, ends as an error record
  (``extra["error"]``). It is written nowhere: a re-run plays it again. It comes back in its
  split's ``PlayResult.failed`` (every process's, in planned order) and play does not raise for
  it; the caller decides. `etokit explore` and `etokit eval` print each and count them (eval's
  report keeps the task with its error: out of the averages, not comparable); the run fails the
  stage naming the first, after the other episodes are recorded, so a resume plays only the failed.
- Progress: reported to a PlayProgress (RichProgress: one bar on the main process for the pool).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from etokit.data.schema import Trajectory
from etokit.envs.base import Env
from etokit.errors import EtokitError
from etokit.faults import faultpoint
from etokit.rollout.episodes import run_episodes
from etokit.rollout.generator import Generator
from etokit.rollout.jobs import Job, experts_of_tasks, job_of, merge_shards, shard

# Envs whose simulator is a JVM run in subprocess workers: a crash or hang there must not take
# the model down with it. The others step in-process (microseconds to milliseconds a step).
SUBPROCESS_ENVS = ("scienceworld", "alfworld")


def open_envs(
    name: str, n: int, options: dict[str, Any] | None = None, step_timeout: float = 60.0, isolate: bool | None = None
) -> list[Env]:
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


@dataclass
class PlayResult:
    """What ``play`` did with one split. ``episodes`` is complete on the main process only (the
    others return before the main one has merged their parts); ``failed`` on every process."""

    planned: list[Job]
    skipped: int  # planned jobs already in ``out`` before this call
    episodes: list[Trajectory] = field(default_factory=list)  # recorded by this call, planned order
    failed: list[Trajectory] = field(default_factory=list)  # error records, written nowhere, planned order

    @property
    def played(self) -> list[Trajectory]:
        """Everything this call played, recorded or failed, in planned order."""
        return merge_shards(self.planned, [self.episodes, self.failed])


def describe_failure(t: Trajectory) -> str:
    """``task (from step N): error`` of an error record."""
    step = job_of(t).prefix_steps
    return f"{t.task_id if step is None else f'{t.task_id} (from step {step + 1})'}: {t.extra['error']}"


class PlayProgress:
    """What ``play`` reports as it goes (on the main process); this one shows nothing."""

    def start(self, description: str, total: int) -> None:
        pass

    def step(self, live: int) -> None:  # after each batched step: the episodes in flight
        pass

    def episode(self, t: Trajectory) -> None:  # an episode ended (recorded or failed)
        pass

    def stop(self) -> None:
        pass


class RichProgress(PlayProgress):
    """A rich progress bar: episodes done of the total, episodes in flight, average reward of the
    recorded ones (failed episodes have none)."""

    def __init__(self, console, what: str, *, transient: bool = False):
        self.console, self.what, self.transient = console, what, transient
        self._progress = self._bar = None
        self._rewards: list[float] = []

    def start(self, description: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (
            TextColumn(f"[bold]{self.what}[/] {{task.description}}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("live {task.fields[live]}  avg reward {task.fields[avg]:.3f}"),
        )
        self._progress = Progress(*columns, console=self.console, transient=self.transient)
        self._progress.start()
        self._bar = self._progress.add_task(description, total=total, live=0, avg=0.0)

    def step(self, live: int) -> None:
        if self._progress is not None:
            self._progress.update(self._bar, live=live)

    def episode(self, t: Trajectory) -> None:
        if "error" not in t.extra:
            self._rewards.append(t.reward)
        if self._progress is not None:
            avg = sum(self._rewards) / len(self._rewards) if self._rewards else 0.0
            self._progress.update(self._bar, advance=1, avg=avg)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def play(
    env: str,
    split: str,
    plan: Callable[[Env], Sequence[Job]],
    generator: Generator,
    *,
    out: Path | None = None,
    **options: Any,
) -> PlayResult:
    """Play the jobs ``plan`` returns (given an open environment of ``env``: its task ids, its
    step limit) of one ``split``, recorded in ``out``: play_splits with one split (``options``
    are its keyword options)."""
    return play_splits(env, {split: out}, lambda first, _: plan(first), generator, **options)[split]


def play_splits(
    env: str,
    outs: Mapping[str, Path | None],
    plan: Callable[[Env, str], Sequence[Job]],
    generator: Generator,
    *,
    batch_size: int,
    env_options: dict[str, Any] | None = None,
    experts: Mapping[str, Trajectory] | None = None,
    model_name: str | None = None,
    model_revision: str | None = None,
    state=None,
    progress: PlayProgress | None = None,
) -> dict[str, PlayResult]:
    """Play the jobs ``plan(first, split)`` returns for each split of ``outs`` (given an open
    environment of ``env``: its task ids, its step limit) in one pool of ``batch_size`` episodes
    with ``generator``, each split recorded in its own file ``outs[split]`` (None: in memory),
    under the policy of this module. ``experts``: the expert trajectories step-wise jobs replay
    (see etokit.rollout.jobs.index_experts). ``state``: accelerate's process state (None: one
    process). Returns each split's PlayResult."""
    from etokit.data import JsonlAppender, read_jsonl

    files = [out for out in outs.values() if out is not None]
    if len(set(files)) < len(files):
        raise ValueError(f"play_splits: two splits share an output file ({', '.join(map(str, files))})")
    progress = progress or PlayProgress()
    n, rank, main = (1, 0, True) if state is None else (state.num_processes, state.process_index, state.is_main_process)
    parts = {s: [_part_file(out, r) for r in range(n)] for s, out in outs.items() if out is not None and n > 1}
    if main:
        for s, out in outs.items():
            if out is None:
                continue
            if parts:  # the other processes read it next: drop a torn last line left by a crash first
                JsonlAppender(out, "trajectory").close()
            _merge_parts(out, None)  # left over by an interrupted multi-process run
    if n > 1:
        state.wait_for_everyone()
    envs, appenders = open_envs(env, batch_size, env_options), {}
    try:
        planned = {s: list(plan(envs[0], s)) for s in outs}
        todo: dict[str, list[Job]] = {}
        for s, out in outs.items():
            recorded = []
            if out is not None:
                # One process appends to ``out`` itself (opening it drops a torn last line), several to their parts.
                appenders[s] = JsonlAppender(parts[s][rank] if parts else out, "trajectory")
                recorded = read_jsonl(out, "trajectory") if parts else appenders[s].existing
            done = {job_of(t) for t in recorded}
            todo[s] = [job for job in planned[s] if job not in done]
        # One queue for every split, split after split: a job is known by (split, job), as two
        # splits may share task ids.
        pooled = [(s, job) for s in outs for job in todo[s]]
        mine = shard(pooled, state) if state is not None else pooled
        if experts is not None:  # keyed by the environment's task ids
            experts = experts_of_tasks(experts, list(dict.fromkeys(job.task_id for _, job in mine)))
        episodes: dict[str, list[Trajectory]] = {s: [] for s in outs}
        failed: list[Trajectory] = []
        if main:
            progress.start(f"{env}/{'+'.join(outs)}", len(mine))
        try:
            for t in run_episodes(
                generator,
                envs,
                [job for _, job in mine],
                split=[s for s, _ in mine],
                model_name=model_name,
                model_revision=model_revision,
                on_step=progress.step,
                experts=experts,
            ):
                if "error" in t.extra:
                    failed.append(t)
                else:
                    if t.split in appenders:
                        appenders[t.split].append(t)
                        faultpoint("play.appended")
                    episodes[t.split].append(t)
                progress.episode(t)
        finally:
            progress.stop()
    finally:
        for appender in appenders.values():
            appender.close()
        close_envs(envs)
    if n > 1:
        from accelerate.utils import gather_object

        failed = gather_object(failed)
        if any(out is None for out in outs.values()):
            gathered = gather_object([t for s, out in outs.items() if out is None for t in episodes[s]])
            episodes.update({s: [t for t in gathered if t.split == s] for s, out in outs.items() if out is None})
        state.wait_for_everyone()  # every part file is complete
    results = {
        s: PlayResult(
            planned[s],
            len(planned[s]) - len(todo[s]),
            failed=merge_shards(planned[s], [[t for t in failed if t.split == s]]),
        )
        for s in outs
    }
    if not main:
        return results
    for s, out in outs.items():
        if out is None:
            results[s].episodes = merge_shards(planned[s], [episodes[s]])
        elif s in parts:
            _merge_parts(out, parts[s])
    faultpoint("play.before-sort")
    for s, out in outs.items():
        if out is not None:
            results[s].episodes = _in_planned_order(out, planned[s], set(todo[s]))
    return results


def _in_planned_order(out: Path, planned: list[Job], todo: set[Job]) -> list[Trajectory]:
    """Rewrite ``out`` as the module's order says; return the records of the jobs in ``todo``."""
    from etokit.data import read_jsonl, write_jsonl

    records = read_jsonl(out, "trajectory")
    in_plan = set(planned)
    ordered = [t for t in records if job_of(t) not in in_plan] + merge_shards(planned, [records])
    write_jsonl(out, ordered)
    return [t for t in ordered if job_of(t) in todo]


def _part_file(out: Path, rank: int) -> Path:
    return out.with_name(f".{out.name}.rank{rank}.jsonl")


def _merge_parts(out: Path, parts: list[Path] | None) -> None:
    """Append the ranks' part files to ``out`` (each episode once, the first record of a job
    wins) and remove them; ``parts`` None: whichever are there."""
    from etokit.data import JsonlAppender, read_jsonl

    existing = [p for p in (parts or out.parent.glob(f".{out.name}.rank*.jsonl")) if p.exists()]
    if not existing:
        return
    shards = [read_jsonl(p, "trajectory") for p in existing]
    with JsonlAppender(out, "trajectory") as appender:
        done = {job_of(t) for t in appender.existing}
        for t in merge_shards([job_of(t) for s in shards for t in s], shards):
            if job_of(t) not in done:
                appender.append(t)
    for p in existing:
        p.unlink()
