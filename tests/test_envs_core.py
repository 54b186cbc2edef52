"""Registry, subprocess workers (crash, hang, restart, clean close) and the worker pool."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from etokit.envs import ENV_CLASSES, Env, EnvWorker, EnvWorkerError, Reset, Step, WorkerPool, available, make
from etokit.errors import EtokitError


class ScriptedEnv:
    """A pure-Python env whose actions misbehave on demand: "hang" sleeps, "crash" kills the
    process, "boom" raises. Loaded in worker processes as ``test_envs_core:ScriptedEnv``."""

    name = "scripted"
    max_steps = 3

    def __init__(self, max_steps: int = 3):
        self.max_steps = max_steps
        self.steps = 0

    @classmethod
    def check(cls):
        return True, "always"

    def task_ids(self, split):
        return [f"{split}-{i}" for i in range(4)]

    def reset(self, task_id, max_steps=None):
        if not task_id.startswith(("train-", "test-")):
            raise EtokitError(f"scripted: unknown task id {task_id!r}")
        self.steps = 0
        return Reset(task_id=task_id, instruction=f"do {task_id}", observation="start", info={"pid": os.getpid()})

    def step(self, action):
        if action == "hang":
            time.sleep(3600)
        if action == "crash":
            os._exit(3)
        if action == "boom":
            raise ValueError("boom")
        self.steps += 1
        return Step(
            observation=f"did {action}", reward=min(1.0, self.steps / self.max_steps), done=self.steps >= self.max_steps
        )

    def expert(self, task_id):
        return ["a"] * self.max_steps

    def close(self):
        pass


SCRIPTED = f"{__name__}:ScriptedEnv"


def test_make_unknown_name_lists_valid_names():
    with pytest.raises(EtokitError) as e:
        make("nethack")
    for name in ENV_CLASSES:
        assert name in str(e.value)


def test_make_bad_option_is_a_user_error():
    with pytest.raises(EtokitError, match="bad options"):
        make(SCRIPTED, colour="red")


def test_available_reports_every_registered_env():
    status = available()
    assert set(status) == set(ENV_CLASSES)
    for ok, detail in status.values():
        assert isinstance(ok, bool) and isinstance(detail, str) and detail
    assert status["textworld-express"][0]  # installed in the dev env


def test_make_returns_an_env_with_the_protocol():
    env = make(SCRIPTED, max_steps=2)
    assert isinstance(env, Env) and env.max_steps == 2
    assert env.reset("train-1").instruction == "do train-1"


def _children_of(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_worker_runs_the_env_in_another_process_and_closes_it():
    worker = EnvWorker(SCRIPTED, {"max_steps": 2})
    pid = worker.pid
    assert pid != os.getpid() and psutil.pid_exists(pid)
    reset = worker.reset("train-0")
    assert reset.info["pid"] == pid and worker.task_ids("train")[0] == "train-0"
    assert worker.step("x") == Step(observation="did x", reward=0.5, done=False)
    assert worker.step("y").done and worker.max_steps == 2
    worker.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_worker_user_errors_cross_the_pipe_and_keep_the_process():
    with EnvWorker(SCRIPTED) as worker:
        pid = worker.pid
        with pytest.raises(EtokitError, match="unknown task id 'nope'"):
            worker.reset("nope")
        assert worker.pid == pid and worker.restarts == 0


def test_worker_crash_is_an_error_then_a_fresh_process():
    with EnvWorker(SCRIPTED) as worker:
        first = worker.pid
        worker.reset("train-0")
        with pytest.raises(EnvWorkerError, match="died"):
            worker.step("crash")
        # The next call starts a new process; the episode must be reset, the env is fresh.
        assert worker.reset("train-1").info["pid"] != first
        assert worker.restarts == 1 and worker.step("x").reward == pytest.approx(1 / 3)


def test_worker_unexpected_exception_restarts_the_worker():
    with EnvWorker(SCRIPTED) as worker:
        first = worker.pid
        worker.reset("train-0")
        with pytest.raises(EnvWorkerError, match="ValueError: boom"):
            worker.step("boom")
        assert worker.reset("train-0").info["pid"] != first


def test_worker_hang_past_timeout_is_killed_and_reported():
    with EnvWorker(SCRIPTED, step_timeout=1.0) as worker:
        first = worker.pid
        worker.reset("train-0")
        start = time.monotonic()
        with pytest.raises(EnvWorkerError, match="no answer after 1s"):
            worker.step("hang")
        assert time.monotonic() - start < 15
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
        assert worker.reset("train-2").task_id == "train-2" and worker.restarts == 1


def test_pool_reports_errors_per_item_and_finishes_the_rest():
    def play(worker, task_id):
        worker.reset(task_id)
        return worker.step("crash" if task_id == "train-2" else "x").observation

    with WorkerPool(SCRIPTED, {}, n=2) as pool:
        pids = [w.pid for w in pool.workers]
        outcomes = {o.item: o for o in pool.map(play, ["train-0", "train-1", "train-2", "train-3"])}
    assert set(outcomes) == {"train-0", "train-1", "train-2", "train-3"}
    assert "died" in outcomes["train-2"].error and outcomes["train-2"].value is None
    assert all(outcomes[t].value == "did x" and outcomes[t].error is None for t in ("train-0", "train-1", "train-3"))
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_worker_start_failure_is_reported():
    with pytest.raises(EtokitError, match="bad options"):
        EnvWorker(SCRIPTED, {"colour": "red"})
