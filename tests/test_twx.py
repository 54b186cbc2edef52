"""TextWorldExpress: splits, gold-path replay, invalid actions, the step limit, the reward."""

from __future__ import annotations

import pytest

from etokit.envs import SPLITS, make
from etokit.errors import EtokitError


@pytest.fixture(scope="module")
def env():
    env = make("textworld-express")
    yield env
    env.close()


def test_splits_are_the_simulator_seed_folds(env):
    ids = {split: env.task_ids(split) for split in SPLITS}
    assert [len(ids[s]) for s in SPLITS] == [1000, 1000, 1000]
    assert not set(ids["train"]) & set(ids["test-seen"]) and not set(ids["test-seen"]) & set(ids["test-unseen"])
    with pytest.raises(EtokitError, match="unknown split"):
        env.task_ids("dev")


@pytest.mark.parametrize("split", SPLITS)
def test_gold_path_reaches_full_reward(env, split):
    for task_id in env.task_ids(split)[:3]:
        actions = env.expert(task_id)
        assert 5 <= len(actions) <= 20
        reset = env.reset(task_id)
        assert "cook" in reset.instruction.lower() and "kitchen" in reset.observation
        rewards = []
        for i, action in enumerate(actions):
            step = env.step(action)
            rewards.append(step.reward)
            assert step.done == (i == len(actions) - 1), (task_id, action, step)
        assert rewards[-1] == 1.0 and rewards == sorted(rewards) and 0.0 <= rewards[0] < 1.0


def test_invalid_action_gets_feedback_and_counts_as_a_step(env):
    env.reset("0")
    step = env.step("juggle the stove")
    assert "not sure what you mean" in step.observation and not step.done and step.reward == 0.0
    assert step.info["steps"] == 1


def test_step_limit_ends_the_episode():
    env = make("textworld-express", max_steps=3)
    try:
        env.reset("1")
        assert [env.step("look around").done for _ in range(3)] == [False, False, True]
        with pytest.raises(EtokitError, match="after the episode ended"):
            env.step("look around")
    finally:
        env.close()


def test_wrong_recipe_step_fails_the_game(env):
    # Cutting an ingredient the wrong way makes the game unwinnable: it ends, with partial reward.
    gold = env.expert("4")
    cut = next(i for i, a in enumerate(gold) if a.split()[0] in ("dice", "chop", "slice"))
    env.reset("4")
    for action in gold[:cut]:
        before = env.step(action)
    verb, ingredient = gold[cut].split(" ", 1)
    step = env.step({"dice": "slice", "chop": "dice", "slice": "chop"}[verb] + " " + ingredient)
    assert step.done and not step.info["won"] and 0.0 < before.reward == step.reward < 1.0


def test_valid_actions_and_unknown_task(env):
    env.reset("3")
    assert "look around" in env.valid_actions() or any(a.startswith("open ") for a in env.valid_actions())
    with pytest.raises(EtokitError, match="unknown task id"):
        env.reset("999999")
