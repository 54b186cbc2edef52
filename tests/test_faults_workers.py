"""Env workers under faults, on real TextWorldExpress run in subprocess workers (one JVM each):
the JVM of a worker killed mid-episode, the worker process itself SIGKILLed mid-episode (a fault
point), a step that hangs past the step timeout (a fault point that sleeps). Each time the episode
is replayed from its reset, exploration completes, every episode equals the one of an undisturbed
run, and no process is left behind: no zombie child, no JVM outliving its worker."""

from __future__ import annotations

import time

import psutil
import pytest

from etokit.envs import Reset, Step
from etokit.rollout.episodes import run_episodes
from etokit.rollout.generator import ExploreConfig
from etokit.rollout.jobs import Job
from etokit.rollout.play import close_envs, open_envs

pytestmark = pytest.mark.faults

ENV = "textworld-express"
ACTIONS = ["look around", "inventory", "take cookbook", "read cookbook", "open fridge"]
TASKS = 4  # 2 workers, so every kill lands while the other worker has an episode in flight too


class Scripted:
    """Stands in for Generator: the n-th reply of an episode is "Action: ACTIONS[n]". The
    observations differ per task, so the trajectories do too."""

    def __init__(self, **config):
        self.config = ExploreConfig(icl=False, max_steps=4, **config)

    def encode(self, messages):
        return list(messages)

    def fits(self, ids):
        return True

    def generate(self, batch, keys=None, seeds=None):
        return [
            f"Thought: step.\nAction: {ACTIONS[sum(m['role'] == 'assistant' for m in ms[3:]) % len(ACTIONS)]}"
            for ms in batch
        ]


def _play(envs, on_step=None):
    jobs = [Job(t) for t in envs[0].task_ids("train")[:TASKS]]
    out = {t.task_id: t for t in run_episodes(Scripted(), envs, jobs, split="train", on_step=on_step)}
    assert sorted(out) == sorted(j.task_id for j in jobs)  # exploration completed: every episode once
    return out


@pytest.fixture(scope="module")
def undisturbed():
    envs = open_envs(ENV, 2, isolate=True)
    try:
        return {k: {**t.to_row(), "extra": t.extra} for k, t in _play(envs).items()}
    finally:
        close_envs(envs)


def _jvms(envs) -> set[int]:
    found = set()
    for env in envs:
        if env.pid is not None:
            try:
                found |= {p.pid for p in psutil.Process(env.pid).children(recursive=True) if p.name() == "java"}
            except psutil.NoSuchProcess:
                pass
    return found


def assert_no_leftovers(before: set[int], jvms: set[int]) -> None:
    """No child of this process but those there before (and multiprocessing's resource tracker),
    none a zombie; every JVM the workers ran is gone, not reparented somewhere."""
    deadline = time.monotonic() + 30
    while True:
        left = []
        for p in psutil.Process().children(recursive=True):
            try:
                if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline()):
                    left.append(f"{p.pid} {p.status()} {p.name()}")
            except psutil.NoSuchProcess:
                continue
        alive_jvms = [
            pid for pid in jvms if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ]
        if not (left or alive_jvms) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"child processes left behind: {left}"
    assert not alive_jvms, f"JVMs outlived their workers: {alive_jvms}"


def _same_but_replayed(got, undisturbed) -> list[str]:
    """The task ids whose episode was replayed; every episode equals the undisturbed one."""
    replayed = []
    for task_id, t in got.items():
        assert "error" not in t.extra, t.extra
        row = {**t.to_row(), "extra": {k: v for k, v in t.extra.items() if k != "env_retries"}}
        assert row == undisturbed[task_id], task_id
        if t.extra.get("env_retries"):
            assert t.extra["env_retries"] == 1
            replayed.append(task_id)
    return replayed


def test_jvm_killed_mid_episode(undisturbed):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    envs = open_envs(ENV, 2, isolate=True)
    jvms = _jvms(envs)
    steps, killed = [], []

    def kill_jvm(live):
        jvms.update(_jvms(envs))
        steps.append(live)
        if len(steps) == 2:  # both first episodes are 2 steps into their 4
            (jvm,) = [p for p in psutil.Process(envs[0].pid).children() if p.name() == "java"]
            jvm.kill()
            killed.append(jvm.pid)

    try:
        got = _play(envs, on_step=kill_jvm)
        restarts = [w.restarts for w in envs]
    finally:
        close_envs(envs)
    assert killed and restarts == [1, 0]
    assert len(_same_but_replayed(got, undisturbed)) == 1  # the episode in flight on the dead JVM
    assert_no_leftovers(before, jvms)


@pytest.mark.parametrize("point", ["worker.step:3", "worker.step:2=hang"])
def test_worker_killed_or_hung_mid_episode(undisturbed, point, monkeypatch, tmp_path):
    """The fault point fires in whichever worker first reaches it (the once-file stops the
    restarted worker from firing again); a hang is cut by the step timeout."""
    once = tmp_path / "fired"
    monkeypatch.setenv("ETOKIT_FAULTPOINT", point)  # read by the spawned workers at import
    monkeypatch.setenv("ETOKIT_FAULTPOINT_ONCE", str(once))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    envs = open_envs(ENV, 2, isolate=True, step_timeout=5.0)
    jvms = _jvms(envs)
    victims = set()
    try:
        got = _play(envs, on_step=lambda live: jvms.update(_jvms(envs)))
        restarts = sum(w.restarts for w in envs)
        victims = {int(once.read_text().split()[1])} if once.exists() else set()
    finally:
        close_envs(envs)
    assert once.exists() and restarts == 1
    assert len(_same_but_replayed(got, undisturbed)) == 1
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in victims)
    assert_no_leftovers(before, jvms)


# ------------------------------------------------------------- replay or error, in-process envs


class Flaky:
    """Fails at its second step (or, with ``at_reset``, at reset) ``failures`` times in all (a
    worker that died), then works."""

    name = "textworld-express"
    max_steps = 3

    def __init__(self, failures: int, at_reset: bool = False):
        self.failures, self.at_reset, self.n = failures, at_reset, 0

    def task_ids(self, split):
        return [f"t{i}" for i in range(3)]

    def reset(self, task_id):
        self.n = 0
        if self.at_reset and self.failures:
            self.failures -= 1
            raise RuntimeError("worker died")
        return Reset(task_id=task_id, instruction=f"Your task is {task_id}.", observation="A room.")

    def step(self, action):
        self.n += 1
        if self.n == 2 and self.failures and not self.at_reset:
            self.failures -= 1
            raise RuntimeError("worker died")
        return Step(observation=f"did {action} ({self.n})", reward=self.n / 3, done=self.n == 3)

    def close(self):
        pass


@pytest.mark.parametrize("failures, retries, errors", [(1, 1, 0), (2, 1, 1), (1, 0, 1)])
@pytest.mark.parametrize("at_reset", [False, True])
def test_failed_episode_is_replayed_then_recorded_as_an_error(failures, retries, errors, at_reset):
    gen = Scripted(env_retries=retries)
    out = list(run_episodes(gen, [Flaky(failures, at_reset)], [Job("t0"), Job("t1")], split="train"))
    assert sorted(t.task_id for t in out) == ["t0", "t1"]  # every episode ends, once
    failed = [t for t in out if "error" in t.extra]
    assert len(failed) == errors
    for t in failed:
        assert t.extra["error"] == "RuntimeError: worker died" and t.extra.get("env_retries", 0) == retries
    for t in out:
        if "error" not in t.extra:
            assert t.reward == 1.0 and t.num_steps == 3
