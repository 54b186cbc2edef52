"""ALFWorld through the real alfworld/TextWorld games. The ALFRED game download is not reachable
here, so the suite writes small ALFRED-format tasks (traj_data.json + initial_state.pddl), builds
their games with the package's own domain, grammar and hand-coded expert, and plays them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("alfworld")

from etokit.envs.alfworld import AlfWorldEnv  # noqa: E402
from etokit.envs.alfworld_games import Scene, Thing, make_game, write_task  # noqa: E402
from etokit.envs.base import Env  # noqa: E402
from etokit.errors import EtokitError  # noqa: E402

MUG = Thing("Mug", ("cleanable", "heatable", "coolable", "isReceptacleObject"))
SCENE = Scene(
    receptacles=[("CounterTop", False), ("Cabinet", True), ("Shelf", False), ("SinkBasin", False), ("Desk", False)],
    objects=[(MUG, "Cabinet"), (Thing("Book"), "Desk"), (Thing("DeskLamp", ("toggleable",)), "Desk")],
)
TASKS = [
    (
        "train/pick_and_place_simple-Mug-None-Shelf-1/trial_T1",
        "pick_and_place_simple",
        {"obj": "Mug", "recep": "Shelf"},
    ),
    (
        "valid_seen/pick_clean_then_place_in_recep-Mug-None-Shelf-1/trial_T2",
        "pick_clean_then_place_in_recep",
        {"obj": "Mug", "recep": "Shelf"},
    ),
    (
        "valid_unseen/look_at_obj_in_light-Book-None-DeskLamp-1/trial_T3",
        "look_at_obj_in_light",
        {"obj": "Book", "toggle": "DeskLamp"},
    ),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("alfworld")
    for folder, task_type, targets in TASKS:
        game = make_game(write_task(root / folder, task_type, SCENE, **targets))
        assert game["solvable"], folder
    # An unsolvable task (its target object does not exist) is written but must not be listed.
    bad = write_task(
        root / "train/pick_and_place_simple-Apple-None-Shelf-1/trial_T4",
        "pick_and_place_simple",
        SCENE,
        obj="Apple",
        recep="Shelf",
    )
    assert not make_game(bad)["solvable"]
    return root


@pytest.fixture(scope="module")
def env(data_dir):
    env = AlfWorldEnv(data_dir=data_dir)
    yield env
    env.close()


def test_games_in_alfred_format(data_dir):
    folder = data_dir / TASKS[0][0]
    traj = json.loads((folder / "traj_data.json").read_text())
    assert traj["task_type"] == "pick_and_place_simple" and traj["pddl_params"]["object_target"] == "Mug"
    problem = (folder / "initial_state.pddl").read_text()
    assert "(:domain alfred)" in problem and "(objectType ?o MugType)" in problem
    game = json.loads((folder / "game.tw-pddl").read_text())
    assert set(game) >= {"pddl_domain", "grammar", "pddl_problem", "solvable", "walkthrough"}
    assert "UNKNOWN GOAL" not in game["grammar"]


def test_official_split_layout(env):
    assert isinstance(env, Env) and env.max_steps == 40
    assert env.task_ids("train") == [TASKS[0][0]]
    assert env.task_ids("test-seen") == [TASKS[1][0]]
    assert env.task_ids("test-unseen") == [TASKS[2][0]]
    with pytest.raises(EtokitError, match="unknown task id"):
        env.reset("train/nope")


@pytest.mark.parametrize("index", range(len(TASKS)))
def test_expert_replay_wins(env, index):
    task_id = TASKS[index][0]
    reset = env.reset(task_id)
    assert reset.instruction.startswith("You are in the middle of a room.")
    assert "\nYour task is to: " in reset.instruction and reset.observation == ""
    actions = env.expert(task_id)
    assert actions and not any(a.startswith("move ") for a in actions)  # given in ETO's "put X in/on Y" form
    steps = [env.step(a) for a in actions]
    assert steps[-1].reward == 1.0 and steps[-1].done and steps[-1].info["won"]
    assert all(s.reward == 0.0 and not s.done for s in steps[:-1])


def test_invalid_action_and_step_limit(data_dir):
    env = AlfWorldEnv(data_dir=data_dir, max_steps=3)
    try:
        env.reset(TASKS[0][0])
        steps = [env.step(a) for a in ("fly to the moon", "take mug 1 from shelf 1", "look")]
        assert steps[0].observation == "Nothing happens." and not steps[0].info["valid"]
        assert steps[1].observation == "Nothing happens."
        assert [s.done for s in steps] == [False, False, True] and steps[-1].info["truncated"]
        assert steps[-1].reward == 0.0
        with pytest.raises(RuntimeError, match="reset"):
            env.step("look")
    finally:
        env.close()


def test_expert_plays_past_the_agent_step_limit(data_dir, tmp_path):
    # Both expert sources, the stored walkthrough and the hand-coded expert played live (a copy of the
    # game without its walkthrough), give their whole path under an agent limit of 3 steps.
    import shutil

    from etokit.agent.protocol import expert_trajectory

    task_id = TASKS[1][0]
    live = tmp_path / task_id
    shutil.copytree(data_dir / task_id, live)
    game = json.loads((live / "game.tw-pddl").read_text())
    del game["walkthrough"]
    (live / "game.tw-pddl").write_text(json.dumps(game))
    for root in (data_dir, tmp_path):
        env = AlfWorldEnv(data_dir=root, max_steps=3)
        try:
            traj = expert_trajectory(env, task_id, "train")
            assert traj.success and traj.num_steps > env.max_steps == 3, root
        finally:
            env.close()


def test_put_and_move_forms_are_both_accepted(env):
    env.reset(TASKS[0][0])
    for action in ("go to cabinet 1", "open cabinet 1", "take mug 1 from cabinet 1", "go to shelf 1"):
        assert env.step(action).info["valid"], action
    assert "put mug 1 in/on shelf 1" in env.step("look").info["available_actions"]
    last = env.step("put mug 1 in/on shelf 1")
    assert last.reward == 1.0 and last.done


def test_check_and_prompt_files():
    ok, detail = AlfWorldEnv.check()
    assert ok and "alfworld installed" in detail
    root = Path(__file__).parents[1] / "etokit" / "agent" / "prompts" / "alfworld"
    assert "put {obj} in/on {recep}" in (root / "instruction.txt").read_text()
    icl = json.loads((root / "icl.json").read_text())
    assert [m["role"] for m in icl] == ["user", "assistant"] * (len(icl) // 2)
    assert icl[0]["content"].startswith("You are in the middle of a room.") and "Your task is to:" in icl[0]["content"]
    assert all("\nAction: " in m["content"] for m in icl if m["role"] == "assistant")
