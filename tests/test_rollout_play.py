"""The one rollout path (etokit.rollout.play) and its policy, as `etokit explore`, `etokit eval` and
the run's stages see it: the output in planned order however the processes split the jobs, and
an episode whose environment failed recorded nowhere, returned to the caller, played again by a
re-run."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from etokit.cli import app
from etokit.data import read_jsonl
from etokit.errors import EtokitError
from etokit.rollout import play as play_module
from etokit.rollout.jobs import Job, job_of
from etokit.rollout.play import describe_failure, play
from tests.factories import CounterEnv, ScriptedGenerator, counter_script as _script

runner = CliRunner()


class FailingEnv(CounterEnv):
    """CounterEnv whose simulator dies at the reset of the tasks in ``broken``."""

    broken: set[str] = set()

    def reset(self, task_id, max_steps=None):
        if task_id in self.broken:
            raise RuntimeError("simulator died")
        return super().reset(task_id, max_steps)


class TwoProcesses:
    """Two ranks as threads: accelerate's own split of the jobs, a barrier for
    wait_for_everyone and an all-gather for gather_object."""

    def __init__(self):
        self.barrier, self.slots = threading.Barrier(2), [None, None]

    def state(self, rank):
        from accelerate import PartialState

        me = SimpleNamespace(num_processes=2, process_index=rank)
        return SimpleNamespace(
            num_processes=2,
            process_index=rank,
            is_main_process=rank == 0,
            wait_for_everyone=self.barrier.wait,
            split_between_processes=lambda items, apply_padding=False: PartialState.split_between_processes(
                me, items, apply_padding
            ),
        )

    def gather_object(self, items):
        rank = threading.current_thread().rank
        self.slots[rank] = list(items)
        self.barrier.wait()
        gathered = [t for slot in self.slots for t in slot]
        self.barrier.wait()  # every rank has read the slots before the next gather writes them
        return gathered


def on_two_ranks(monkeypatch, play_on_rank):
    """``play_on_rank(state)`` on two simulated processes (threads sharing a barrier and
    gather_object); returns both ranks' results, after both ended without error."""
    import accelerate.utils

    ranks = TwoProcesses()
    monkeypatch.setattr(accelerate.utils, "gather_object", ranks.gather_object)
    results, errors = [None, None], []

    def rank(r):
        threading.current_thread().rank = r
        try:
            results[r] = play_on_rank(ranks.state(r))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
            ranks.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_two_processes_write_the_planned_order_and_failed_episodes_nowhere(tmp_path, monkeypatch):
    monkeypatch.setattr(play_module, "open_envs", lambda name, n, options=None: [FailingEnv() for _ in range(n)])
    FailingEnv.broken = {"t8", "t2"}  # one on each rank: rank 0 plays t9..t5, rank 1 t4..t0
    planned = [Job(f"t{i}") for i in reversed(range(10))]  # not the split's order: the plan's
    out = tmp_path / "explore.jsonl"
    results = on_two_ranks(
        monkeypatch,
        lambda state: play(
            "textworld-express",
            "train",
            lambda env: planned,
            ScriptedGenerator(_script, icl=False, env_retries=1),
            batch_size=2,
            out=out,
            state=state,
        ),
    )
    main = results[0]
    rows = read_jsonl(out, "trajectory")
    ok = [j for j in planned if j.task_id not in FailingEnv.broken]
    assert [job_of(t) for t in rows] == ok  # the plan's order, neither completion nor rank order
    assert [job_of(t) for t in main.episodes] == ok and main.skipped == 0
    assert not list(tmp_path.glob(".explore.jsonl.rank*"))  # parts merged and removed
    # Failed on either rank: returned (the other rank's too, gathered), in planned order, written nowhere.
    assert [describe_failure(t) for t in main.failed] == [
        "t8: RuntimeError: simulator died",
        "t2: RuntimeError: simulator died",
    ]
    assert [describe_failure(t) for t in results[1].failed] == [describe_failure(t) for t in main.failed]
    assert main.failed[0].extra["env_retries"] == 1  # replayed once before it was given up
    assert [job_of(t) for t in main.played] == planned

    # A re-run plays the failed episodes only, and the file is in planned order again.
    FailingEnv.broken = set()
    again = play(
        "textworld-express", "train", lambda env: planned, ScriptedGenerator(_script, icl=False), batch_size=3, out=out
    )
    assert again.skipped == 8 and [job_of(t) for t in again.episodes] == [Job("t8"), Job("t2")] and not again.failed
    assert [job_of(t) for t in read_jsonl(out, "trajectory")] == planned


def test_records_outside_the_plan_keep_their_place_first(tmp_path, monkeypatch):
    monkeypatch.setattr(play_module, "open_envs", lambda name, n, options=None: [CounterEnv() for _ in range(n)])
    out = tmp_path / "both.jsonl"
    gen = ScriptedGenerator(_script, icl=False)
    play("textworld-express", "train", lambda env: [Job("t3"), Job("t1")], gen, batch_size=2, out=out)
    result = play(
        "textworld-express", "train", lambda env: [Job("t2"), Job("t1", 1), Job("t0")], gen, batch_size=2, out=out
    )
    assert [job_of(t) for t in read_jsonl(out, "trajectory")] == [
        Job("t3"),
        Job("t1"),
        Job("t2"),
        Job("t1", 1),
        Job("t0"),
    ]
    assert result.skipped == 0 and len(result.episodes) == 3


# ------------------------------------------------- the same environment error in explore, eval, the run


BAD = "201"  # a WebShop train task; the test split's "3"


def _failing_at(monkeypatch, bad: str):
    """The real environments, except that the simulator dies at the reset of task ``bad``."""
    real = play_module.open_envs

    class Dying:
        def __init__(self, env):
            self.env = env

        def __getattr__(self, name):
            return getattr(self.env, name)

        def reset(self, task_id, *args, **kwargs):
            if task_id == bad:
                raise RuntimeError("simulator died")
            return self.env.reset(task_id, *args, **kwargs)

    monkeypatch.setattr(
        play_module, "open_envs", lambda name, n, options=None: [Dying(e) for e in real(name, n, options)]
    )


_FAST = ["--env", "webshop", "--no-icl", "--max-steps", "2", "--max-new-tokens", "8", "--batch-size", "2"]


def test_explore_prints_the_failed_episode_and_writes_the_others(policy, tmp_path, monkeypatch):
    _failing_at(monkeypatch, BAD)
    out = tmp_path / "explore.jsonl"
    result = runner.invoke(
        app, ["explore", "--model", str(policy.path), *_FAST, "--task-ids", f"202,{BAD},200", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"error {BAD}: RuntimeError: simulator died" in text and "2 episodes written, 0 already in" in text
    assert "1 errors" in text
    assert [t.task_id for t in read_jsonl(out, "trajectory")] == ["202", "200"]


def test_eval_prints_the_failed_episode_and_keeps_its_task_in_the_report(policy, tmp_path, monkeypatch):
    _failing_at(monkeypatch, "3")
    report, episodes = tmp_path / "eval.json", tmp_path / "eval.jsonl"
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(policy.path),
            *_FAST,
            "--split",
            "test-seen",
            "--task-ids",
            "4,3,2",
            "--out",
            str(report),
            "--trajectories",
            str(episodes),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "error 3: RuntimeError: simulator died" in " ".join(result.output.split())
    assert [t.task_id for t in read_jsonl(episodes, "trajectory")] == ["4", "2"]  # a trajectory file: no error rows
    written = json.loads(report.read_text())
    assert written["errors"] == 1 and written["episodes"] == 2 and written["panel"]["task_ids"] == ["4", "3", "2"]
    assert [r["task_id"] for r in written["per_task"]] == ["4", "3", "2"]
    assert written["per_task"][1]["error"] == "RuntimeError: simulator died"


def test_the_run_fails_the_stage_after_recording_the_other_episodes(policy, tmp_path, monkeypatch):
    from etokit.run import Run, RunConfig

    _failing_at(monkeypatch, BAD)
    # A real config: a key the stage reads is there with its default.
    cfg = RunConfig(
        run_dir=str(tmp_path),
        push_to="me/run",
        env="webshop",
        explore_batch_size=2,
        max_new_tokens=8,
        icl=False,
        max_steps=2,
    )
    manifest = {"bc": {"model": str(policy.path)}, "expert": {}}
    fake = SimpleNamespace(cfg=cfg, dir=tmp_path, manifest=manifest, _instruction=lambda: None)
    out = tmp_path / "explore_iter1.jsonl"
    with pytest.raises(
        EtokitError, match=f"webshop task {BAD}: the environment failed \\(RuntimeError: simulator died\\)"
    ):
        Run._play(fake, "bc", {"train": out}, 3, "explore-1")
    tasks = [t.task_id for t in read_jsonl(out, "trajectory")]
    assert BAD not in tasks and len(tasks) == 2  # the others are recorded: a resume plays only the failed one


# ------------------------------------------------------------- several splits in one pool of episodes

# CounterEnv's test splits share their task ids (t0..t9): a job is known by its split and its job.
SEEN, UNSEEN = "test-seen", "test-unseen"
POOL_PLAN = {SEEN: [Job("t3"), Job("t1"), Job("t0"), Job("t2")], UNSEEN: [Job("t5"), Job("t4"), Job("t2"), Job("t7")]}


def _rows(path):
    return [t.to_row() for t in read_jsonl(path, "trajectory")]


class Recording(play_module.PlayProgress):
    """The (split, job) of every episode that ended, in completion order; raises after ``crash_after`` of them."""

    def __init__(self, crash_after=None):
        self.ended, self.crash_after = [], crash_after

    def episode(self, t):
        self.ended.append((t.split, job_of(t)))
        if len(self.ended) == self.crash_after:
            raise KeyboardInterrupt("killed")


def test_two_splits_in_one_pool_record_each_split_as_if_played_alone(policy, tmp_path, monkeypatch):
    """Greedy episodes of a tiny Llama: test-seen and test-unseen share the batches (8 rows a
    forward, not 4 and 4 one split after the other) and each split's file and result are those
    of the split played alone, its own tasks recorded under its own name."""
    from etokit.rollout.generator import ExploreConfig, Generator
    from etokit.rollout.play import play_splits

    monkeypatch.setattr(play_module, "open_envs", lambda name, n, options=None: [CounterEnv() for _ in range(n)])
    rows = []

    def generator():
        gen = Generator(policy.model, policy.tokenizer, ExploreConfig(icl=False, max_new_tokens=8, max_steps=2))
        real = gen.generate
        gen.generate = lambda batch, **kw: rows.append(len(batch)) or real(batch, **kw)
        return gen

    alone = {}
    for split, jobs in POOL_PLAN.items():
        out = tmp_path / "alone" / f"{split}.jsonl"
        alone[split] = play("textworld-express", split, lambda env, jobs=jobs: jobs, generator(), batch_size=4, out=out)
    assert max(rows) == 4
    rows.clear()
    outs = {split: tmp_path / "pool" / f"{split}.jsonl" for split in POOL_PLAN}
    progress = Recording()
    pooled = play_splits(
        "textworld-express", outs, lambda env, split: POOL_PLAN[split], generator(), batch_size=8, progress=progress
    )
    assert max(rows) == 8  # both splits' episodes in one forward
    assert {split for split, _ in progress.ended} == {SEEN, UNSEEN} and len(progress.ended) == 8
    for split, out in outs.items():
        expected = _rows(tmp_path / "alone" / f"{split}.jsonl")
        assert [r["split"] for r in expected] == [split] * 4
        assert _rows(out) == expected
        assert [t.to_row() for t in pooled[split].episodes] == [t.to_row() for t in alone[split].episodes] == expected
        assert pooled[split].planned == POOL_PLAN[split] and pooled[split].skipped == 0 and not pooled[split].failed
    # The shared task t2 was played once per split, with that split's name.
    assert [r["split"] for r in _rows(outs[SEEN]) + _rows(outs[UNSEEN]) if r["task_id"] == "t2"] == [SEEN, UNSEEN]


def test_a_resume_plays_only_the_missing_episodes_of_each_split(tmp_path, monkeypatch):
    from etokit.rollout.play import play_splits

    monkeypatch.setattr(play_module, "open_envs", lambda name, n, options=None: [CounterEnv() for _ in range(n)])
    gen = ScriptedGenerator(_script, icl=False)

    def pool(folder, progress=None):
        outs = {split: tmp_path / folder / f"{split}.jsonl" for split in POOL_PLAN}
        return outs, play_splits(
            "textworld-express", outs, lambda env, split: POOL_PLAN[split], gen, batch_size=3, progress=progress
        )

    reference, _ = pool("reference")

    # A crash in the middle of the pool: a resume plays the episodes neither file holds, and ends
    # with the files of an uninterrupted pool.
    with pytest.raises(KeyboardInterrupt):
        pool("crashed", Recording(crash_after=3))
    crashed = {split: tmp_path / "crashed" / f"{split}.jsonl" for split in POOL_PLAN}
    recorded = {
        (split, job_of(t)) for split, out in crashed.items() if out.exists() for t in read_jsonl(out, "trajectory")
    }
    assert len(recorded) == 3
    progress = Recording()
    outs, results = pool("crashed", progress)
    assert sorted(progress.ended, key=str) == sorted(
        {(s, j) for s, jobs in POOL_PLAN.items() for j in jobs} - recorded, key=str
    )
    for split in POOL_PLAN:
        assert _rows(outs[split]) == _rows(reference[split])

    # test-seen complete, test-unseen with two episodes and a torn line: only test-unseen's
    # missing episodes are played, the shared task t2 among them.
    partial = {split: tmp_path / "partial" / f"{split}.jsonl" for split in POOL_PLAN}
    partial[SEEN].parent.mkdir()
    partial[SEEN].write_bytes(reference[SEEN].read_bytes())
    lines = reference[UNSEEN].read_bytes().splitlines(keepends=True)
    partial[UNSEEN].write_bytes(b"".join(lines[:2]) + lines[2][:40])
    progress = Recording()
    outs, results = pool("partial", progress)
    assert progress.ended == [(UNSEEN, Job("t2")), (UNSEEN, Job("t7"))]
    assert (results[SEEN].skipped, results[SEEN].episodes) == (4, [])
    assert results[UNSEEN].skipped == 2 and [job_of(t) for t in results[UNSEEN].episodes] == [Job("t2"), Job("t7")]
    for split in POOL_PLAN:
        assert _rows(outs[split]) == _rows(reference[split])


def test_two_processes_share_a_pool_of_two_splits(tmp_path, monkeypatch):
    """Two ranks, one pool of 3 + 6 jobs: rank 0 plays test-seen's 3 and test-unseen's first 2,
    rank 1 the other 4. Each split's parts are merged into its file in planned order; the
    environment dies on t1, a task of both splits played on either rank: each split's result has
    its own failed episode, on both ranks."""
    from etokit.rollout.play import play_splits

    monkeypatch.setattr(play_module, "open_envs", lambda name, n, options=None: [FailingEnv() for _ in range(n)])
    plan = {SEEN: [Job("t2"), Job("t1"), Job("t0")], UNSEEN: [Job(f"t{i}") for i in (5, 4, 3, 2, 1, 0)]}
    FailingEnv.broken = {"t1"}
    outs = {split: tmp_path / f"{split}.jsonl" for split in plan}
    results = on_two_ranks(
        monkeypatch,
        lambda state: play_splits(
            "textworld-express",
            outs,
            lambda env, split: plan[split],
            ScriptedGenerator(_script, icl=False, env_retries=0),
            batch_size=2,
            state=state,
        ),
    )
    main = results[0]
    for split, jobs in plan.items():
        ok = [j for j in jobs if j.task_id != "t1"]
        assert [(t.split, job_of(t)) for t in read_jsonl(outs[split], "trajectory")] == [(split, j) for j in ok]
        assert [job_of(t) for t in main[split].episodes] == ok and main[split].skipped == 0
        assert [(t.split, describe_failure(t)) for t in main[split].failed] == [
            (split, "t1: RuntimeError: simulator died")
        ]
        assert [describe_failure(t) for t in results[1][split].failed] == ["t1: RuntimeError: simulator died"]
        assert [job_of(t) for t in main[split].played] == jobs
    assert not [p for p in tmp_path.iterdir() if ".rank" in p.name]  # parts merged and removed
