"""The ReAct protocol: action parsing, prompt layout with and without the 1-shot example, and
expert trajectories (on a scripted env and on TextWorldExpress)."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from etokit.agent import (
    INVALID_FORMAT_OBS,
    STOP_STRINGS,
    build_prompt,
    expert_thought,
    expert_trajectory,
    format_observation,
    load_icl,
    load_instruction,
    parse_action,
)
from etokit.envs import Reset, Step, make
from etokit.errors import EtokitError

MY_ENVS = ("scienceworld", "textworld-express")


@pytest.mark.parametrize(
    "text, action",
    [
        ("Thought: go.\nAction: go to kitchen", "go to kitchen"),
        ("Thought: go.\naction: go to kitchen  \n", "go to kitchen"),
        ("ACTION:   open fridge\t", "open fridge"),
        ("Thought: t\nAction: take apple.", "take apple"),
        ("Action: click[Buy Now]\nObservation: made up", "click[Buy Now]"),
        ("Thought: answer the prompt\nAction: 0", "0"),
        ("Action: first\nAction: second", "first"),
        ("Action:\nAction: later", "later"),
        ("Thought: I should act.\nMy action is to open the door", None),
        ("Thought: only thinking", None),
        ("Action:   ", None),
        ("", None),
    ],
)
def test_parse_action(text, action):
    assert parse_action(text) == action


def test_invalid_format_observation_has_no_action_and_says_how():
    assert parse_action(INVALID_FORMAT_OBS) is None and "Action:" in INVALID_FORMAT_OBS
    assert format_observation("  You open it.\n") == "Observation: You open it."
    assert STOP_STRINGS == ("\nObservation:", "\nTask:", "\n---")


@pytest.mark.parametrize("env_name", MY_ENVS)
def test_build_prompt_layout(env_name):
    reset = Reset(task_id="t", instruction="Your task is to X.", observation="You are in a room.")
    plain = build_prompt(env_name, reset, icl=False)
    assert [m["role"] for m in plain] == ["user", "assistant", "user"]
    assert plain[0]["content"] == load_instruction(env_name) and "Action:" in plain[0]["content"]
    assert plain[1]["content"] == "OK"
    assert plain[2]["content"] == "Your task is to X.\nYou are in a room."

    shot = build_prompt(env_name, reset, icl=True)
    example = load_icl(env_name)
    assert shot == plain[:2] + example + plain[2:]
    roles = [m["role"] for m in shot]
    assert all(a != b for a, b in zip(roles, roles[1:]))  # strictly alternating, ends on the task turn


def test_task_turn_without_observation_is_the_instruction_alone():
    reset = Reset(task_id="t", instruction="Your task is to boil water.", observation="")
    assert build_prompt("scienceworld", reset, icl=False)[-1]["content"] == "Your task is to boil water."


@pytest.mark.parametrize("env_name", MY_ENVS)
def test_icl_example_is_a_parsable_expert_episode(env_name):
    example = load_icl(env_name)
    assert example[0]["role"] == "user" and example[-1]["role"] == "assistant"
    for message in example[1:]:
        if message["role"] == "assistant":
            assert message["content"].startswith("Thought: ") and parse_action(message["content"])
        else:
            assert message["content"].startswith("Observation: ")


def test_missing_prompt_files_are_a_user_error():
    with pytest.raises(EtokitError, match="prompts/nethack/instruction.txt"):
        load_instruction("nethack")


def test_expert_thoughts():
    assert expert_thought("scienceworld", "2") == "The request was ambiguous; option 2 is the one I meant."
    assert "kitchen" in expert_thought("scienceworld", "go to kitchen")
    assert "focus" in expert_thought("scienceworld", "focus on dove egg")
    # Env-specific verbs only apply to their env; anything else gets the generic thought.
    assert "recipe" in expert_thought("textworld-express", "dice carrot")
    assert expert_thought("scienceworld", "dice carrot") == "Next, I will dice carrot."


class CountdownEnv:
    """Expert of 4 actions; the task completes on the 3rd (like a gold path ending in "wait1")."""

    name = "textworld-express"
    max_steps = 10

    def expert(self, task_id):
        return ["open fridge", "take carrot", "eat meal", "wait1"]

    def reset(self, task_id, max_steps=None):
        self.n = 0
        return Reset(task_id=task_id, instruction="Eat.", observation="A kitchen.")

    def step(self, action):
        self.n += 1
        return Step(observation=f"obs {self.n}", reward=self.n / 3, done=self.n == 3)


def test_expert_trajectory_stops_when_done_and_ends_on_the_agent():
    traj = expert_trajectory(CountdownEnv(), "task-1", "train")
    roles = [m["role"] for m in traj.messages]
    assert roles == ["user", "assistant", "user"] + ["assistant", "user"] * 2 + ["assistant"]
    assert traj.messages[2]["content"] == "Eat.\nA kitchen."
    assert [parse_action(m["content"]) for m in traj.messages[3::2]] == ["open fridge", "take carrot", "eat meal"]
    assert [m["content"] for m in traj.messages[4::2]] == ["Observation: obs 1", "Observation: obs 2"]
    assert traj.reward == 1.0 and traj.success and traj.num_steps == 3 and traj.source == "expert"
    assert traj.split == "train" and traj.env == "textworld-express" and traj.task_id == "task-1"


def test_expert_trajectory_on_textworld_express():
    env = make("textworld-express")
    try:
        actions = env.expert("11")
        traj = expert_trajectory(env, "11", "train")
    finally:
        env.close()
    roles = [m["role"] for m in traj.messages]
    assert all(a != b for a, b in zip(roles, roles[1:])) and roles[-1] == "assistant"
    assert traj.messages[0]["content"] == load_instruction("textworld-express") and traj.messages[1]["content"] == "OK"
    assert [parse_action(m["content"]) for m in traj.messages[3::2]] == actions
    assert traj.reward == 1.0 and traj.success and traj.num_steps == len(actions)
    # Training data never contains the 1-shot example.
    assert load_icl("textworld-express")[0]["content"] not in [m["content"] for m in traj.messages]


def test_prompt_files_ship_as_package_data():
    for env_name in MY_ENVS:
        folder = resources.files("etokit.agent").joinpath("prompts", env_name)
        json.loads(folder.joinpath("icl.json").read_text())
        assert folder.joinpath("instruction.txt").read_text().strip()
