"""build_pairs: the official construct_preference.py rule, self-play pairs, and `etokit build-pairs`."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from etokit.cli import app
from etokit.data import DataError, Pair, pair_to_eto, read_jsonl
from etokit.data.eto_format import ROLE_TO_FROM
from etokit.pairs import build_pairs, self_play_pairs, trajectory_pairs
from tests.factories import trajectory, write_jsonl

runner = CliRunner()


def _explored(task_id, reward, n_steps, *, env="webshop", trailing_obs=False, seed=1, **kw):
    t = trajectory(task_id, reward, n_steps, env=env, source="explore", seed=seed, **kw)
    if trailing_obs:
        t.messages.append({"role": "user", "content": "Observation: the episode ended."})
    return t


def _by_task(pairs):
    return {p.task_id: p for p in pairs}


def test_win_tie_lose_follow_the_reward_comparison():
    experts = [trajectory(i, 0.5, 3, env="webshop") for i in ("a", "b", "c")]
    explored = [_explored("a", 0.2, 2), _explored("b", 0.5, 4), _explored("c", 0.9, 5)]
    pairs, stats = trajectory_pairs(experts, explored, iteration=2)
    assert (stats.win, stats.tie, stats.lose, stats.missing_expert, stats.pairs) == (1, 1, 1, 0, 2)
    by = _by_task(pairs)
    assert set(by) == {"a", "c"}
    lose, win = by["a"], by["c"]
    assert lose.outcome == "lose" and lose.chosen == experts[0].messages[3:]
    assert lose.rejected == explored[0].messages[3:]
    assert lose.prompt == experts[0].messages[:3] and (lose.chosen_reward, lose.rejected_reward) == (0.5, 0.2)
    assert win.outcome == "win" and win.chosen == explored[2].messages[3:] and win.rejected == experts[2].messages[3:]
    assert win.prompt == explored[2].messages[:3] and (win.chosen_reward, win.rejected_reward) == (0.9, 0.5)
    for p in pairs:
        assert p.mode == "trajectory" and p.iteration == 2
        assert p.chosen[-1]["role"] == p.rejected[-1]["role"] == "assistant"


@pytest.mark.parametrize("env,cut", [("webshop", True), ("scienceworld", True), ("alfworld", False),
                                     ("textworld-express", False)])
def test_losing_agent_is_cut_to_expert_length_plus_5_rounds_on_webshop_and_scienceworld_only(env, cut):
    expert = trajectory("t", 1.0, 2, env=env)  # 3 turns after the prompt
    agent = _explored("t", 0.0, 12, env=env)  # 23 turns after the prompt
    (pair,), _ = trajectory_pairs([expert], [agent])
    assert len(pair.chosen) == 3
    full = agent.messages[3:]
    assert pair.rejected == (full[: 3 + 10] if cut else full)
    assert pair.rejected[-1]["role"] == "assistant"
    # A winning agent is never cut: the expert is the rejected side.
    (win,), _ = trajectory_pairs([trajectory("t", 0.0, 2, env=env)], [_explored("t", 1.0, 12, env=env)])
    assert len(win.chosen) == 23


def test_trailing_observation_is_dropped():
    expert = trajectory("t", 1.0, 3, env="alfworld")
    expert.messages.append({"role": "user", "content": "Observation: done."})
    agent = _explored("t", 0.0, 4, env="alfworld", trailing_obs=True)
    (pair,), _ = trajectory_pairs([expert], [agent])
    assert pair.chosen == expert.messages[3:-1] and pair.rejected == agent.messages[3:-1]


def test_tasks_without_expert_are_counted_and_skipped():
    explored = [_explored("a", 0.0, 2), _explored("zz", 0.0, 2)]
    pairs, stats = trajectory_pairs([trajectory("a", 1.0, env="webshop")], explored)
    assert [p.task_id for p in pairs] == ["a"] and stats.missing_expert == 1


def test_alfworld_matches_on_the_game_not_the_id():
    expert = trajectory("17", 1.0, 2, env="alfworld",
                        extra={"game_file": "json_2.1.1/train/pick_x/trial_T1/game.tw-pddl"})
    agent = _explored("pick_x/trial_T1", 0.0, 3, env="alfworld",
                      extra={"game_file": "/data/games/pick_x/trial_T1/game.tw-pddl"})
    other = _explored("17", 0.0, 3, env="alfworld", extra={"game_file": "/data/games/pick_y/trial_T9/game.tw-pddl"})
    pairs, stats = trajectory_pairs([expert], [agent, other])
    assert [p.rejected for p in pairs] == [agent.messages[3:]] and stats.missing_expert == 1


def test_alfworld_experts_without_game_file_match_on_the_task_turn():
    """The Hub copy of the paper's data drops game_file: an expert is then matched to the explored
    episode that starts with the same task turn (the room and the goal), never to another game's."""
    expert = trajectory("17", 1.0, 2, env="alfworld")
    expert.messages[2]["content"] = "You are in a room.\nYour task is to:  put a mug in the sink."
    agent = _explored("json/train/pick_x/trial_T1", 0.0, 3, env="alfworld",
                      extra={"game_file": "/data/pick_x/trial_T1/game.tw-pddl"})
    agent.messages[2]["content"] = "You are in a room.\nYour task is to: put a mug in the sink."  # spacing aside
    other = _explored("json/train/pick_y/trial_T9", 0.0, 3, env="alfworld",
                      extra={"game_file": "/data/pick_y/trial_T9/game.tw-pddl"})
    pairs, stats = trajectory_pairs([expert], [agent, other])
    assert [p.rejected for p in pairs] == [agent.messages[3:]] and stats.missing_expert == 1
    twin = trajectory("18", 1.0, 3, env="alfworld")
    twin.messages[2]["content"] = expert.messages[2]["content"]
    with pytest.raises(DataError, match="'17' and '18' have no game_file and the same task turn"):
        trajectory_pairs([expert, twin], [agent])


# --- the official rule, transcribed from construct_preference.py (build_preference and
# build_preference_alfworld) onto in-memory rows: explored rows have no 1-shot example, so the
# prediction offset is the instruction part's length, 2.

def _official(task, golden_raw, pred_raw, instruction_part):
    golden_trajs, golden_rewards = {}, {}
    for item in golden_raw:
        idx = str(item["id"])
        golden_trajs[idx] = item["conversations"][2:]
        golden_rewards[idx] = item["reward"] if task == "webshop" else 1.0
    pred_trajs, pred_rewards = {}, {}
    for item in pred_raw:
        idx = str(item["id"])
        pred_rewards[idx] = item["reward"]
        pred_trajs[idx] = item["conversations"][2:]
        if pred_trajs[idx][-1]["from"] == "human":
            pred_trajs[idx].pop()
    pm_data, win, tie, lose = [], 0, 0, 0
    for key in pred_rewards:
        if key not in golden_trajs or key not in pred_trajs or key not in golden_rewards:
            continue
        if pred_rewards[key] < golden_rewards[key]:
            lose += 1
            rejected = pred_trajs[key][:len(golden_trajs[key]) + 5 * 2][1:] if task != "alfworld" \
                else pred_trajs[key][1:]
            pm_data.append({"id": key, "prompt": instruction_part + golden_trajs[key][:1],
                            "chosen": golden_trajs[key][1:], "rejected": rejected})
        elif pred_rewards[key] > golden_rewards[key]:
            win += 1
            pm_data.append({"id": key, "prompt": instruction_part + pred_trajs[key][:1],
                            "chosen": pred_trajs[key][1:], "rejected": golden_trajs[key][1:]})
        else:
            tie += 1
            continue
        if pm_data[-1]["chosen"][-1]["from"] != "gpt" or pm_data[-1]["rejected"][-1]["from"] != "gpt":
            pm_data.pop()
    return pm_data, (win, tie, lose)


def _conv(messages):
    return [{"from": ROLE_TO_FROM[m["role"]], "value": m["content"]} for m in messages]


@pytest.mark.parametrize("env,task", [("webshop", "webshop"), ("scienceworld", "sciworld"), ("alfworld", "alfworld")])
def test_equal_to_the_official_rule(env, task):
    rng = random.Random(env)
    experts, explored = [], []
    for i in range(60):
        expert_reward = rng.choice([0.5, 0.75, 1.0]) if env == "webshop" else 1.0
        if i % 7 != 3:  # some tasks have no expert
            experts.append(trajectory(str(i), expert_reward, rng.randint(1, 8), env=env))
        explored.append(_explored(str(i), rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]), rng.randint(1, 16), env=env,
                                  trailing_obs=rng.random() < 0.5, seed=rng.randint(0, 99)))
    pairs, stats = trajectory_pairs(experts, explored)
    golden = [{"id": t.task_id, "conversations": _conv(t.messages), "reward": t.reward} for t in experts]
    preds = [{"id": t.task_id, "conversations": _conv(t.messages), "reward": t.reward} for t in explored]
    official, counts = _official(task, golden, preds, _conv(experts[0].messages[:2]))
    assert len(official) > 10
    assert [pair_to_eto(p) for p in pairs] == official
    assert (stats.win, stats.tie, stats.lose) == counts
    assert stats.missing_expert == sum(1 for i in range(60) if i % 7 == 3)


def test_self_play_pairs_best_against_worst_and_drops_ties():
    samples = [_explored("a", r, 3 + k, seed=k) for k, r in enumerate([0.25, 0.75, 0.5])]
    samples += [_explored("b", 0.5, 3, seed=k) for k in range(3)]
    samples += [_explored("c", 1.0, 2, seed=0)]  # a single sample: nothing to compare
    pairs, stats = self_play_pairs(samples, iteration=1)
    assert [p.task_id for p in pairs] == ["a"] and stats.tie == 2 and stats.pairs == 1
    (p,) = pairs
    assert p.mode == "self-play" and p.outcome is None and p.iteration == 1
    assert (p.chosen_reward, p.rejected_reward) == (0.75, 0.25)
    assert p.chosen == samples[1].messages[3:] and p.rejected == samples[0].messages[3:]
    assert (p.extra["chosen_seed"], p.extra["rejected_seed"]) == (1, 0)
    assert build_pairs(samples, mode="self-play", iteration=1)[0] == pairs


# --- CLI -------------------------------------------------------------------------------------


def test_build_pairs_cli_writes_pairs_and_stats(tmp_path):
    expert_file, explore_file, out = tmp_path / "expert.jsonl", tmp_path / "explore.jsonl", tmp_path / "pairs.jsonl"
    write_jsonl(expert_file, [trajectory(i, 1.0, 3) for i in ("1", "2", "3")])
    write_jsonl(explore_file, [_explored("1", 0.0, 4, env="textworld-express"),
                               _explored("2", 1.0, 2, env="textworld-express"),
                               _explored("9", 0.0, 4, env="textworld-express")])
    result = runner.invoke(app, ["build-pairs", "--expert", str(expert_file), "--explore", str(explore_file),
                                    "--out", str(out), "--iteration", "3"])
    assert result.exit_code == 0, result.output
    pairs = read_jsonl(out, "pair")
    assert [(p.task_id, p.outcome, p.iteration, p.mode) for p in pairs] == [("1", "lose", 3, "trajectory")]
    stats = json.loads((tmp_path / "pairs.stats.json").read_text())
    assert stats == {"win": 0, "tie": 1, "lose": 1, "missing_expert": 1, "unusable": 0, "pairs": 1}
    text = " ".join(result.output.split())
    assert "1 pairs written" in text and "--ties 1" in text and "missing expert (skipped) │ 1" in text

    official = tmp_path / "pairs.json"
    result = runner.invoke(app, ["build-pairs", "--expert", str(expert_file), "--explore", str(explore_file),
                                    "--out", str(official)])
    assert result.exit_code == 0, result.output
    assert json.loads(official.read_text()) == [pair_to_eto(Pair(**{**pairs[0].__dict__, "iteration": None}))]


def test_build_pairs_cli_user_errors(tmp_path):
    expert_file = tmp_path / "expert.jsonl"
    write_jsonl(expert_file, [trajectory("1", 1.0)])
    for args, message in [
        (["--expert", str(tmp_path / "nope.jsonl"), "--explore", str(expert_file)], "nope.jsonl"),
        (["--explore", str(expert_file)], "--expert"),
        (["--expert", str(expert_file), "--explore", str(expert_file), "--mode", "best"], "--mode 'best'"),
    ]:
        result = runner.invoke(app, ["build-pairs", *args, "--out", str(tmp_path / "p.jsonl")])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "p.jsonl").exists()
