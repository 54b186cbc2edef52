"""The ReAct conversation every ETO trajectory follows, for training data and exploration alike.

Layout (the official ETO code's ``conversation`` ICL format)::

    user:      <instruction.txt: the environment, its action grammar, the reply format>
    assistant: OK
    [the 1-shot example's messages: exploration and evaluation only, never training data]
    user:      <task turn: Reset.instruction, plus "\\n" + Reset.observation when non-empty>
    assistant: Thought: ...\\nAction: ...
    user:      Observation: ...
    assistant: ...

A trajectory ends on an assistant turn: the observation after the last action is not recorded
(DPO pairs are cut there anyway).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources

from etokit.data.schema import Message, Trajectory
from etokit.envs.base import Env, Reset
from etokit.errors import EtokitError

# Generation stops here: a model that keeps going writes the environment's next turn itself.
STOP_STRINGS = ("\nObservation:", "\nTask:", "\n---")
INVALID_FORMAT_OBS = 'Invalid format: no action found. End your reply with a line "Action: <your action>".'

_ACTION_LINE = re.compile(r"^[ \t]*action[ \t]*:[ \t]*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)


def parse_action(text: str) -> str | None:
    """The action of a reply: the first ``Action:`` line (any case), trimmed, without a trailing
    period (models end sentences; no action of the four envs ends with one). None if absent or
    empty."""
    for match in _ACTION_LINE.finditer(text):
        action = match.group(1).strip()
        if action.endswith(".") and not action.endswith(".."):
            action = action[:-1].rstrip()
        if action:
            return action
    return None


def format_observation(observation: str) -> str:
    return f"Observation: {observation.strip()}"


def task_turn(reset: Reset) -> str:
    observation = reset.observation.strip()
    return f"{reset.instruction.strip()}\n{observation}" if observation else reset.instruction.strip()


def _prompt_file(env_name: str, filename: str) -> str:
    path = resources.files("etokit.agent").joinpath("prompts", env_name, filename)
    if not path.is_file():
        raise EtokitError(f"no prompt file etokit/agent/prompts/{env_name}/{filename} for environment {env_name!r}")
    return path.read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def load_instruction(env_name: str) -> str:
    return _prompt_file(env_name, "instruction.txt").strip()


@lru_cache(maxsize=None)
def _icl(env_name: str) -> tuple[tuple[str, str], ...]:
    try:
        messages = json.loads(_prompt_file(env_name, "icl.json"))
    except json.JSONDecodeError as e:
        raise EtokitError(f"etokit/agent/prompts/{env_name}/icl.json: invalid JSON ({e})") from e
    roles = [m.get("role") for m in messages]
    if (
        not messages
        or roles[0] != "user"
        or roles[-1] != "assistant"
        or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(roles))
    ):
        raise EtokitError(
            f"etokit/agent/prompts/{env_name}/icl.json: messages must alternate user/assistant, "
            "starting with the task turn and ending on an assistant turn"
        )
    return tuple((m["role"], m["content"]) for m in messages)


def load_icl(env_name: str) -> list[Message]:
    """The 1-shot example: the task turn and the expert's turns, as messages."""
    return [{"role": role, "content": content} for role, content in _icl(env_name)]


def build_prompt(env_name: str, reset: Reset, icl: bool, instruction: str | None = None) -> list[Message]:
    """Messages up to and including the task turn; the agent's first reply comes next.
    ``instruction`` replaces etokit's own instruction turn (see ``instruction_of``)."""
    messages = [
        {"role": "user", "content": instruction or load_instruction(env_name)},
        {"role": "assistant", "content": "OK"},
    ]
    if icl:
        messages += load_icl(env_name)
    messages.append({"role": "user", "content": task_turn(reset)})
    return messages


def instruction_of(experts: list[Trajectory], env_name: str) -> str | None:
    """The instruction turn expert trajectories were written with, when it is not etokit's own for
    ``env_name``: the first user message every one of them shares (the paper's published data
    words its instructions differently). None when they use etokit's, or do not agree."""
    firsts = {t.messages[0]["content"].strip() for t in experts if t.messages and t.messages[0]["role"] == "user"}
    if len(firsts) != 1:
        return None
    (first,) = firsts
    return None if first == load_instruction(env_name) else first


# ---------------------------------------------------------------------------------------------
# Expert thoughts. Gold paths are bare actions; the ReAct format wants a thought before each.
# A short templated thought per verb keeps the agent's format without inventing reasoning.

_Rule = tuple[re.Pattern, str]


def _rules(*pairs: tuple[str, str]) -> list[_Rule]:
    return [(re.compile(pattern + r"$", re.IGNORECASE), thought) for pattern, thought in pairs]


_COMMON = _rules(
    (r"\d+", "The request was ambiguous; option {0} is the one I meant."),
    (r"look around", "I should look around to see what is here."),
    (r"(?:look at|examine|inspect) (.+)", "Let me examine the {1} more closely."),
    (r"look in (.+)", "Let me look inside the {1}."),
    (r"read (.+)", "The {1} should tell me what to do, so I will read it."),
    (r"open door to (.+)", "The way to the {1} is through this door, so I will open it."),
    (r"open (.+)", "I need to open the {1} to see what is inside."),
    (r"close (.+)", "I am done with the {1}, so I will close it."),
    (r"(?:go|teleport) to (.+)", "I should go to the {1} next."),
    (r"(?:go|move) (north|south|east|west)", "I will head {1}."),
    (r"(?:take|pick up) (.+?) from (.+)", "I need the {1}, so I will take it from the {2}."),
    (r"(?:take|pick up) (.+)", "I need the {1}, so I will pick it up."),
    (r"move (.+) to (.+)", "I will move the {1} to the {2}."),
    (r"put (.+?) (?:in|on|into|in/on) (.+)", "I will put the {1} in the {2}."),
    (r"put down (.+)", "I no longer need to hold the {1}; I will put it down."),
    (r"(?:pour|dunk) (.+?) (?:in|into) (.+)", "I will pour the {1} into the {2}."),
    (r"eat (.+)", "Time to eat the {1}."),
    (r"use (.+?) on (.+)", "I will use the {1} on the {2}."),
    (r"use (.+)", "I will use the {1}."),
    (r"inventory", "Let me check what I am carrying."),
)

_BY_ENV: dict[str, list[_Rule]] = {
    "scienceworld": _rules(
        (r"focus on (.+)", "The {1} is what the task is about, so I will focus on it."),
        (r"mix (.+)", "Everything is in the {1}; now I mix it."),
        (r"activate (.+)", "I will turn on the {1}."),
        (r"deactivate (.+)", "I will turn off the {1}."),
        (r"connect (.+?) to (.+)", "I need to connect the {1} to the {2} to complete the circuit."),
        (r"disconnect (.+)", "I will disconnect the {1}."),
        (r"wait\s*\d*", "Nothing to do now but wait for the process to take effect."),
        (r"flush (.+)", "I will flush the {1}."),
    ),
    "textworld-express": _rules(
        (r"(dice|chop|slice) (.+)", "The recipe says to {1} the {2}, and I have a knife."),
        (r"cook (.+?) in (.+)", "The recipe says to cook the {1}, so I will use the {2}."),
        (r"prepare meal", "I have done every step of the recipe, so I can prepare the meal."),
    ),
    "alfworld": _rules(
        (r"(heat|cool|clean) (.+?) with (.+)", "I need to {1} the {2}, so I will use the {3}."),
    ),
    "webshop": _rules(
        (r"search\[(.+)\]", "I should search for {1}."),
        (r"click\[buy now\]", "This item matches the request, so I will buy it."),
        (r"click\[(?:next >|< prev)\]", "None of these fit; I will look at the other results."),
        (r"click\[back to search\]", "This is not what I need; I will go back to the search."),
        (r"click\[(.+)\]", "I will click {1}."),
    ),
}


def expert_thought(env_name: str, action: str) -> str:
    """A short templated thought for an expert action (env-specific verbs first)."""
    action = action.strip()
    for pattern, thought in _BY_ENV.get(env_name, []) + _COMMON:
        match = pattern.match(action)
        if match:
            return thought.format(action, *match.groups())
    return f"Next, I will {action}."


def expert_trajectory(env: Env, task_id: str, split: str) -> Trajectory:
    """Play the env's expert on a task through the protocol (no 1-shot example: training data).

    The trajectory records the reward reached; callers decide what to do with an expert that
    did not succeed (``etokit expert`` reports it and writes nothing).
    """
    actions = env.expert(task_id)
    if not actions:
        raise EtokitError(f"{env.name}: no expert actions for task {task_id!r}")
    # The whole gold path is played: the agent's step limit is the agent's, and a gold path may be
    # longer (ScienceWorld's test-conductivity_412 takes 42 steps under a 30-step limit).
    reset = env.reset(task_id, max_steps=len(actions))
    messages = build_prompt(env.name, reset, icl=False)
    reward, steps = 0.0, 0
    for i, action in enumerate(actions):
        messages.append(
            {"role": "assistant", "content": f"Thought: {expert_thought(env.name, action)}\nAction: {action}"}
        )
        result = env.step(action)
        steps, reward = steps + 1, result.reward
        if result.done or i == len(actions) - 1:
            break
        messages.append({"role": "user", "content": format_observation(result.observation)})
    return Trajectory(
        task_id=task_id,
        env=env.name,
        split=split,
        messages=messages,
        reward=reward,
        num_steps=steps,
        source="expert",
        extra={"expert_actions": len(actions)},
    )
