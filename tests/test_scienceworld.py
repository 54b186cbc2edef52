"""ScienceWorld through etokit's direct-server adapter: gold replay, ambiguous-request answers,
invalid actions, step limits, the official ETO split index (and the disjoint derived one), and JVM
crashes inside a worker."""

from __future__ import annotations

import collections
import json
import random
from importlib import resources

import psutil
import pytest

from etokit.agent.protocol import expert_trajectory
from etokit.envs import SPLITS, EnvWorker, EnvWorkerError, make
from etokit.envs.scienceworld import (
    MAX_STEPS,
    OFFICIAL_SIZES,
    OFFICIAL_TRAIN_TEST_SEEN_OVERLAP,
    load_splits,
    parse_task_id,
    simulator_task_name,
)
from etokit.errors import EtokitError


@pytest.fixture(scope="module")
def env():
    env = make("scienceworld")
    yield env
    env.close()


def _replay(env, task_id, upto=None):
    actions = env.expert(task_id)[:upto]
    reset = env.reset(task_id)
    steps = []
    for action in actions:
        steps.append(env.step(action))
        if steps[-1].done:  # gold paths may end with a "wait1" after the task is complete
            break
    return reset, actions, steps


@pytest.mark.parametrize("task_id", ["find-animal_0", "lifespan-longest-lived_1", "power-component_0"])
def test_gold_path_reaches_full_reward(env, task_id):
    reset, actions, steps = _replay(env, task_id)
    assert reset.instruction.startswith("Your task is to") and reset.observation == ""
    assert env.max_steps == MAX_STEPS[parse_task_id(task_id)[0]] >= len(actions)
    assert steps[-1].reward == 1.0 and steps[-1].done
    assert not any(s.done for s in steps[:-1])
    rewards = [s.reward for s in steps]
    assert rewards == sorted(rewards)  # the max-so-far score never decreases


def test_expert_plays_its_whole_gold_path_past_the_agent_step_limit(env):
    # find-animal_54's gold path takes 16 steps; the agent's limit for find-animal is 15.
    traj = expert_trajectory(env, "find-animal_54", "train")
    assert env.max_steps == MAX_STEPS["find-animal"] == 15
    assert traj.success and traj.reward == 1.0 and traj.num_steps > 15
    # The agent's own episode of the same task still ends at its limit.
    gold = env.expert("find-animal_54")
    env.reset("find-animal_54")
    steps = [env.step(a) for a in gold[:15]]
    assert [s.done for s in steps] == [False] * 14 + [True] and steps[-1].reward < 1.0
    with pytest.raises(EtokitError, match="after the episode ended"):
        env.step("look around")


def test_ambiguous_request_answered_by_a_bare_number(env):
    # grow-plant_0's gold path answers an "ambiguous request" prompt with "0" (its 11th action).
    actions = env.expert("grow-plant_0")
    i = actions.index("0")
    _, _, steps = _replay(env, "grow-plant_0", upto=i + 2)
    assert "ambiguous request" in steps[i - 1].observation.lower()
    assert "No known action" not in steps[i].observation and "seed" in steps[i].observation
    assert "You focus on" in steps[i + 1].observation and steps[i + 1].reward > 0


def test_invalid_action_feedback_and_step_limit(env):
    env.reset("lifespan-longest-lived_1")
    limit = env.max_steps
    assert limit == 10
    steps = [env.step("juggle the dove") for _ in range(limit)]
    assert all("No known action matches that input" in s.observation for s in steps)
    assert [s.done for s in steps] == [False] * (limit - 1) + [True]
    assert steps[-1].reward == 0.0 and steps[-1].info["steps"] == limit
    with pytest.raises(EtokitError, match="after the episode ended"):
        env.step("look around")


def _variations(env, task):
    env._server.load(task, 0, "easy", False)
    s = env._server
    return {
        "train": set(s.getVariationsTrain()),
        "dev": set(s.getVariationsDev()),
        "test": set(s.getVariationsTest()),
        "max": int(s.getTaskMaxVariations(task)),
    }


def test_official_index_is_the_default_and_keeps_the_official_files(env):
    official = json.loads(resources.files("etokit.envs").joinpath("data", "scienceworld_official.json").read_text())
    assert official["source"]["commit"] == "9cd80875322d255db0c9e20600b22f88450ca0d6"
    splits = load_splits()
    for split in SPLITS:
        # Same pairs in the same order as the official files, only renamed to simulator task names.
        assert splits[split] == [f"{simulator_task_name(t)}_{v}" for t, v in official[split]]
        assert env.task_ids(split) == splits[split]
    assert (
        simulator_task_name("task-10-measure-melting-point-(known-substance)")
        == "measure-melting-point-known-substance"
    )


def test_official_split_sizes_and_how_they_overlap(env):
    splits = load_splits()
    assert (
        {s: len(splits[s]) for s in SPLITS} == OFFICIAL_SIZES == {"train": 1483, "test-seen": 194, "test-unseen": 211}
    )
    for split in SPLITS:
        assert len(set(splits[split])) == len(splits[split])
        assert {parse_task_id(t)[0] for t in splits[split]} == set(MAX_STEPS)  # all 24 task types
    train, seen, unseen = (set(splits[s]) for s in SPLITS)
    # As the module docstring says: test-unseen is apart; train and test-seen share 54 ids.
    assert not (train | seen) & unseen
    assert len(train & seen) == OFFICIAL_TRAIN_TEST_SEEN_OVERLAP == 54


def test_every_official_id_is_a_simulator_variation_of_the_documented_range(env):
    lists = {task: _variations(env, task) for task in MAX_STEPS}  # one load per task type
    where = collections.Counter()
    for split in SPLITS:
        for t in load_splits()[split]:
            task, v = parse_task_id(t)
            assert 0 <= v < lists[task]["max"], t
            where[split, next(r for r in ("train", "dev", "test") if v in lists[task][r])] += 1
    assert where == {
        ("train", "train"): 1126,
        ("train", "dev"): 357,
        ("test-seen", "dev"): 194,
        ("test-unseen", "test"): 211,
    }


def test_sampled_official_ids_reset_in_the_simulator(env):
    rng = random.Random(0)
    for split in SPLITS:  # a few ids (a reset of a large task type takes seconds)
        for task_id in rng.sample(load_splits()[split], 1):
            reset = env.reset(task_id)
            assert reset.task_id == task_id and reset.instruction.startswith("Your task is to")
            assert env.max_steps == MAX_STEPS[parse_task_id(task_id)[0]]
            assert "No known action" not in env.step("look around").observation


def test_test_unseen_is_the_first_ten_test_variations(env):
    # The official rule, checked against the simulator's own test list for one task type.
    expected = [f"melt_{v}" for v in sorted(_variations(env, "melt")["test"])[:10]]
    assert [t for t in env.task_ids("test-unseen") if t.startswith("melt_")] == expected


def test_derived_splits_are_disjoint_with_the_official_sizes_and_test_unseen():
    derived, official = load_splits("derived"), load_splits("official")
    assert {s: len(derived[s]) for s in SPLITS} == OFFICIAL_SIZES
    train, seen, unseen = (set(derived[s]) for s in SPLITS)
    assert not train & seen and not (train | seen) & unseen
    assert unseen == set(official["test-unseen"])


def test_unknown_splits_option_is_a_user_error():
    with pytest.raises(EtokitError, match="unknown splits 'disjoint'; valid: official, derived"):
        make("scienceworld", splits="disjoint")


def test_bad_task_id(env):
    with pytest.raises(EtokitError, match="bad task id"):
        env.reset("boil")


def _javas(pid):
    return [p for p in psutil.Process(pid).children(recursive=True) if "java" in p.name()]


def test_killed_jvm_mid_episode_is_reported_and_the_worker_restarts():
    worker = EnvWorker("scienceworld", step_timeout=30)
    try:
        worker.reset("find-animal_0")
        worker.step("look around")
        (jvm,) = _javas(worker.pid)
        jvm.kill()
        jvm.wait(10)
        with pytest.raises(EnvWorkerError):
            worker.step("look around")
        worker.reset("find-animal_0")
        assert worker.restarts == 1 and len(_javas(worker.pid)) == 1
        assert "No known action" in worker.step("juggle").observation
    finally:
        pid = worker.pid
        javas = _javas(pid)
        worker.close()
    # No process left behind: neither the worker nor its JVM.
    assert javas and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in javas)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
