"""build_pairs: the official construct_preference.py rule, self-play pairs, and `etokit build-pairs`."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from etokit.cli import app
from etokit.data import DataError, Pair, pair_to_eto, read_jsonl
from etokit.data.eto_format import ROLE_TO_FROM
from etokit.data.schema import Trajectory
from etokit.pairs import PairRule, build_pairs, self_play_pairs, task_key, trajectory_pairs
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


@pytest.mark.parametrize(
    "env,cut", [("webshop", True), ("scienceworld", True), ("alfworld", False), ("textworld-express", False)]
)
def test_losing_agent_is_cut_to_expert_length_plus_5_rounds_on_webshop_and_scienceworld_only(env, cut):
    expert = trajectory("t", 1.0, 2, env=env)  # 3 turns after the prompt
    agent = _explored("t", 0.0, 12, env=env)  # 23 turns after the prompt
    (pair,), _ = trajectory_pairs([expert], [agent])
    assert len(pair.chosen) == 3
    full = agent.messages[3:]
    assert pair.rejected == (full[: 3 + 10] if cut else full)
    assert pair.rejected[-1]["role"] == "assistant"
    # A winning agent is never cut: the expert is the rejected side. (Official scores never let a
    # ScienceWorld or ALFWorld expert lose, so compare stored rewards for the win.)
    (win,), _ = trajectory_pairs(
        [trajectory("t", 0.0, 2, env=env)], [_explored("t", 1.0, 12, env=env)], rule=PairRule(rewards="stored")
    )
    assert len(win.chosen) == 23


def test_agent_trailing_observation_is_dropped_an_expert_one_drops_the_pair_unless_trimmed():
    expert = trajectory("t", 1.0, 3, env="alfworld")
    agent = _explored("t", 0.0, 4, env="alfworld", trailing_obs=True)
    (pair,), _ = trajectory_pairs([expert], [agent])
    assert pair.chosen == expert.messages[3:] and pair.rejected == agent.messages[3:-1]
    assert "pair_rule" not in pair.extra

    expert.messages.append({"role": "user", "content": "Observation: done."})
    # construct_preference.py never trims the expert: its pair does not end on an agent turn and goes.
    pairs, stats = trajectory_pairs([expert], [agent])
    assert pairs == [] and (stats.lose, stats.unusable, stats.pairs) == (1, 1, 0)
    # The same on a win (the expert is the rejected side) and in step mode's rule.
    webshop_expert = trajectory("w", 0.5, 3, env="webshop")
    webshop_expert.messages.append({"role": "user", "content": "Observation: done."})
    pairs, stats = trajectory_pairs([webshop_expert], [_explored("w", 1.0, 2)])
    assert pairs == [] and (stats.win, stats.unusable) == (1, 1)

    trim = PairRule(expert_observation="trim")
    (pair,), stats = trajectory_pairs([expert], [agent], rule=trim)
    assert pair.chosen == expert.messages[3:-1] and pair.rejected == agent.messages[3:-1]
    assert pair.extra["pair_rule"] == {"expert_observation": "trim"} and stats.unusable == 0
    (pair,), _ = trajectory_pairs([webshop_expert], [_explored("w", 1.0, 2)], rule=trim)
    assert pair.rejected == webshop_expert.messages[3:-1]


def test_official_scores_count_a_scienceworld_expert_as_1():
    expert = trajectory("t", 0.8, 3, env="scienceworld")
    agent = _explored("t", 0.9, 4, env="scienceworld")
    # construct_preference.py never reads a ScienceWorld expert's reward: it scores 1.0, the agent loses.
    (pair,), stats = trajectory_pairs([expert], [agent])
    assert pair.outcome == "lose" and pair.chosen == expert.messages[3:] and (stats.win, stats.lose) == (0, 1)
    assert (pair.chosen_reward, pair.rejected_reward) == (1.0, 0.9)
    assert pair.extra["chosen_stored_reward"] == 0.8 and "pair_rule" not in pair.extra

    (pair,), stats = trajectory_pairs([expert], [agent], rule=PairRule(rewards="stored"))
    assert pair.outcome == "win" and pair.chosen == agent.messages[3:] and (stats.win, stats.lose) == (1, 0)
    assert (pair.chosen_reward, pair.rejected_reward) == (0.9, 0.8)
    assert pair.extra["pair_rule"] == {"rewards": "stored"} and "chosen_stored_reward" not in pair.extra


def test_official_scores_on_alfworld_expert_1_and_agent_won_or_not():
    expert = trajectory("t", 0.0, 3, env="alfworld")
    # The official code scores the expert 1.0 and the agent `1.0 if reward else 0.0`: a tie.
    pairs, stats = trajectory_pairs([expert], [_explored("t", 0.5, 4, env="alfworld")])
    assert pairs == [] and stats.tie == 1
    (pair,), stats = trajectory_pairs(
        [expert], [_explored("t", 0.5, 4, env="alfworld")], rule=PairRule(rewards="stored")
    )
    assert pair.outcome == "win" and (pair.chosen_reward, pair.rejected_reward) == (0.5, 0.0)


def test_pair_rule_rejects_unknown_settings():
    with pytest.raises(DataError, match="rewards='best'"):
        PairRule(rewards="best")
    with pytest.raises(DataError, match="expert_observation='keep'"):
        PairRule(expert_observation="keep")


def test_alfworld_experts_without_game_file_match_on_the_task_turn():
    """The Hub copy of the paper's data drops game_file: an expert is then matched to the explored
    episode that starts with the same task turn (the room and the goal), never to another game's."""
    expert = trajectory("17", 1.0, 2, env="alfworld")
    expert.messages[2]["content"] = "You are in a room.\nYour task is to:  put a mug in the sink."
    agent = _explored(
        "json/train/pick_x/trial_T1", 0.0, 3, env="alfworld", extra={"game_file": "/data/pick_x/trial_T1/game.tw-pddl"}
    )
    agent.messages[2]["content"] = "You are in a room.\nYour task is to: put a mug in the sink."  # spacing aside
    other = _explored(
        "json/train/pick_y/trial_T9", 0.0, 3, env="alfworld", extra={"game_file": "/data/pick_y/trial_T9/game.tw-pddl"}
    )
    pairs, stats = trajectory_pairs([expert], [agent, other])
    assert [p.rejected for p in pairs] == [agent.messages[3:]] and stats.missing_expert == 1
    twin = trajectory("18", 1.0, 3, env="alfworld")
    twin.messages[2]["content"] = expert.messages[2]["content"]
    with pytest.raises(DataError, match="'17' and '18' have no game_file and the same task turn"):
        trajectory_pairs([expert, twin], [agent])


# --- the official rule, transcribed from construct_preference.py (build_preference and
# build_preference_alfworld) onto in-memory rows. Explored rows have no 1-shot example, so the
# prediction offset is the instruction part's length, 2; etokit's ScienceWorld task turn has no
# "Task Description:" prefix, so the official strip of it is left out.


def _official(task, golden_raw, pred_raw, instruction_part):
    golden_trajs, golden_rewards = {}, {}
    for item in golden_raw:
        idx = item["game_file"].split("/")[-1] if task == "alfworld" else str(item["id"])
        golden_trajs[idx] = item["conversations"][2:]
        if task in ("sciworld", "alfworld"):
            golden_rewards[idx] = 1.0
        elif task == "webshop":
            golden_rewards[idx] = item["reward"]
    pred_trajs, pred_rewards = {}, {}
    for item in pred_raw:
        if task == "alfworld":
            idx = item["meta"]["error"].split("/")[-2]
            pred_rewards[idx] = 1.0 if item["meta"]["reward"] else 0.0
        else:
            idx = item["id"]
            pred_rewards[idx] = item["meta"]["reward"]
        pred_trajs[idx] = item["conversations"][2:]
        if pred_trajs[idx][-1]["from"] == "human":
            pred_trajs[idx].pop()
    pm_data, win, tie, lose = [], 0, 0, 0
    for key in pred_rewards:
        if pred_rewards[key] is None:
            continue
        if key not in golden_trajs or key not in pred_trajs or key not in golden_rewards:
            continue
        if pred_rewards[key] < golden_rewards[key]:
            lose += 1
            rejected = (
                pred_trajs[key][1:] if task == "alfworld" else pred_trajs[key][: len(golden_trajs[key]) + 5 * 2][1:]
            )
            pm_data.append(
                {
                    "id": key,
                    "prompt": instruction_part + golden_trajs[key][:1],
                    "chosen": golden_trajs[key][1:],
                    "rejected": rejected,
                }
            )
        elif pred_rewards[key] > golden_rewards[key]:
            win += 1
            pm_data.append(
                {
                    "id": key,
                    "prompt": instruction_part + pred_trajs[key][:1],
                    "chosen": pred_trajs[key][1:],
                    "rejected": golden_trajs[key][1:],
                }
            )
        else:
            tie += 1
            continue
        if pm_data[-1]["chosen"][-1]["from"] != "gpt" or pm_data[-1]["rejected"][-1]["from"] != "gpt":
            pm_data.pop()
    return pm_data, (win, tie, lose)


def _conv(messages):
    return [{"from": ROLE_TO_FROM[m["role"]], "value": m["content"]} for m in messages]


def _draw_official_inputs(env, rng):
    """80 tasks drawn to reach every branch of the official code: experts stored below 1.0 on every
    env (ignored on ScienceWorld/ALFWorld), experts ending on an observation, a task's expert given
    twice (the last wins), ALFWorld agent rewards between 0 and 1, tasks without an expert, agents
    that replay the expert's turns (identical sides), trailing agent observations, long agents."""
    experts, explored = [], []
    for i in range(80):
        task_id = f"trial_T{i}" if env == "alfworld" else str(i)
        extra = {"game_file": f"json_2.1.1/train/pick_x/{task_id}"} if env == "alfworld" else {}
        expert = trajectory(task_id, rng.choice([0.5, 0.75, 0.8, 1.0]), rng.randint(1, 8), env=env, extra=extra)
        if rng.random() < 0.3 and i % 13 != 6:
            expert.messages.append({"role": "user", "content": "Observation: the episode ended."})
        if i % 11 == 5 and i % 7 != 3:  # an earlier expert of the same task, overwritten by the one below
            experts.append(trajectory(task_id, 0.1, 2, env=env, extra=extra))
        if i % 7 != 3:  # some tasks have no expert
            experts.append(expert)
        extra = {"game_file": f"/data/games/pick_x/{task_id}/game.tw-pddl"} if env == "alfworld" else {}
        reward = rng.choice([0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 0.8, 0.9, 1.0])
        if i % 13 == 6:  # the agent replays the expert, scored below it
            agent = Trajectory(
                task_id=task_id,
                env=env,
                messages=[dict(m) for m in expert.messages],
                reward=0.0,
                source="explore",
                seed=i,
                extra=extra,
            )
        else:
            agent = _explored(
                task_id,
                reward,
                rng.randint(1, 16),
                env=env,
                trailing_obs=rng.random() < 0.5,
                seed=rng.randint(0, 99),
                extra=extra,
            )
        explored.append(agent)
    return experts, explored


@pytest.mark.parametrize("env,task", [("webshop", "webshop"), ("scienceworld", "sciworld"), ("alfworld", "alfworld")])
def test_equal_to_the_official_rule(env, task):
    experts, explored = _draw_official_inputs(env, random.Random(env))
    pairs, stats = trajectory_pairs(experts, explored)
    golden = [{"id": t.task_id, "conversations": _conv(t.messages), "reward": t.reward, **t.extra} for t in experts]
    preds = [
        {
            "id": t.task_id,
            "conversations": _conv(t.messages),
            "meta": {"reward": t.reward, "error": t.extra.get("game_file")},
        }
        for t in explored
    ]
    official, counts = _official(task, golden, preds, _conv(experts[0].messages[:2]))
    # The one deliberate difference: a pair with identical sides (no DPO gradient) is dropped.
    identical = [row for row in official if row["chosen"] == row["rejected"]]
    assert len(official) > 10 and identical
    assert [pair_to_eto(p) for p in pairs] == [row for row in official if row not in identical]
    assert (stats.win, stats.tie, stats.lose) == counts
    assert stats.missing_expert == sum(1 for i in range(80) if i % 7 == 3)
    # The inputs reach the cases where a naive rule differs from the official one.
    expert_of = {task_key(t): t for t in experts}
    assert any(t.messages[-1]["role"] == "user" for t in expert_of.values())
    if env != "webshop":
        assert any(e.reward < a.reward < 1.0 for a in explored if (e := expert_of.get(task_key(a))))
    if env == "alfworld":
        assert any(0.0 < a.reward < 1.0 for a in explored)


def test_deviating_rules_differ_from_the_official_rule_only_where_documented():
    experts, explored = _draw_official_inputs("scienceworld", random.Random(0))
    official, _ = trajectory_pairs(experts, explored)
    stored, _ = trajectory_pairs(experts, explored, rule=PairRule(rewards="stored"))
    trimmed, _ = trajectory_pairs(experts, explored, rule=PairRule(expert_observation="trim"))
    assert {p.task_id for p in official} < {p.task_id for p in trimmed}  # trimming only adds pairs
    assert all(p.extra["pair_rule"] == {"rewards": "stored"} for p in stored)
    assert any(p.outcome == "win" for p in stored) and not any(p.outcome == "win" for p in official)


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
    write_jsonl(
        explore_file,
        [
            _explored("1", 0.0, 4, env="textworld-express"),
            _explored("2", 1.0, 2, env="textworld-express"),
            _explored("9", 0.0, 4, env="textworld-express"),
        ],
    )
    result = runner.invoke(
        app,
        [
            "build-pairs",
            "--expert",
            str(expert_file),
            "--explore",
            str(explore_file),
            "--out",
            str(out),
            "--iteration",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    pairs = read_jsonl(out, "pair")
    assert [(p.task_id, p.outcome, p.iteration, p.mode) for p in pairs] == [("1", "lose", 3, "trajectory")]
    stats = json.loads((tmp_path / "pairs.stats.json").read_text())
    assert stats == {"win": 0, "tie": 1, "lose": 1, "missing_expert": 1, "unusable": 0, "pairs": 1}
    text = " ".join(result.output.split())
    assert "1 pairs written" in text and "--ties 1" in text and "missing expert (skipped) │ 1" in text

    official = tmp_path / "pairs.json"
    result = runner.invoke(
        app, ["build-pairs", "--expert", str(expert_file), "--explore", str(explore_file), "--out", str(official)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(official.read_text()) == [pair_to_eto(Pair(**{**pairs[0].__dict__, "iteration": None}))]


def test_build_pairs_cli_official_rule_by_default_and_deviations_on_request(tmp_path):
    expert = trajectory("1", 0.8, 3, env="scienceworld")
    expert.messages.append({"role": "user", "content": "Observation: done."})
    expert_file, explore_file = tmp_path / "expert.jsonl", tmp_path / "explore.jsonl"
    write_jsonl(expert_file, [expert, trajectory("2", 0.8, 3, env="scienceworld")])
    write_jsonl(explore_file, [_explored("1", 0.9, 2, env="scienceworld"), _explored("2", 0.9, 2, env="scienceworld")])
    base = ["build-pairs", "--expert", str(expert_file), "--explore", str(explore_file)]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "official.jsonl")])
    assert result.exit_code == 0, result.output
    (official,) = read_jsonl(tmp_path / "official.jsonl", "pair")  # task 1's expert ends on an observation
    assert (official.task_id, official.outcome, official.chosen_reward) == ("2", "lose", 1.0)
    assert "pair_rule" not in official.extra

    result = runner.invoke(
        app, [*base, "--out", str(tmp_path / "dev.jsonl"), "--rewards", "stored", "--expert-observation", "trim"]
    )
    assert result.exit_code == 0, result.output
    pairs = read_jsonl(tmp_path / "dev.jsonl", "pair")
    assert [(p.task_id, p.outcome) for p in pairs] == [("1", "win"), ("2", "win")]
    assert pairs[0].rejected == expert.messages[3:-1]
    assert all(p.extra["pair_rule"] == {"rewards": "stored", "expert_observation": "trim"} for p in pairs)

    result = runner.invoke(app, [*base, "--out", str(tmp_path / "x.jsonl"), "--rewards", "best"])
    assert result.exit_code == 2 and "--rewards 'best'" in result.output, result.output


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
