"""Step-wise and mixture pairs (paper App. B) on hand-made episodes, and `etokit build-pairs
--mode step|mixture`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from etokit.cli import app
from etokit.data import DataError, read_jsonl, validate_pair
from etokit.data.schema import Trajectory
from etokit.pairs import build_pairs, self_play_pairs, step_pairs, trajectory_pairs
from tests.factories import trajectory, write_jsonl

runner = CliRunner()


def _step_wise(
    expert: Trajectory, t: int, reward: float, agent_steps: int, *, trailing_obs: bool = False, sample: int = 0
) -> Trajectory:
    """A step-wise episode: the expert's prompt and steps 1..t-1 (with their observations), then
    ``agent_steps`` agent turns of its own from step t."""
    messages = [dict(m) for m in expert.messages[: 3 + 2 * (t - 1)]]
    for i in range(agent_steps):
        messages.append({"role": "assistant", "content": f"Thought: my step {t + i}.\nAction: agent action {i}"})
        if i < agent_steps - 1 or trailing_obs:
            messages.append({"role": "user", "content": f"Observation: agent saw {i}."})
    return Trajectory(
        task_id=expert.task_id,
        env=expert.env,
        messages=messages,
        reward=reward,
        source="explore",
        seed=sample,
        extra={"sample": sample, "step_wise": {"prefix_steps": t - 1, "expert_steps": 4}},
    )


def test_lose_win_tie_with_the_expert_prefix_in_the_prompt():
    experts = [trajectory(i, 0.5, 4, env="textworld-express") for i in ("a", "b", "c")]
    explored = [_step_wise(experts[0], 3, 0.0, 2), _step_wise(experts[1], 2, 0.5, 5), _step_wise(experts[2], 4, 1.0, 3)]
    pairs, stats = step_pairs(experts, explored, iteration=2)
    assert (stats.win, stats.tie, stats.lose, stats.missing_expert, stats.pairs) == (1, 1, 1, 0, 2)
    lose, win = pairs
    # t = 3: the prompt is instruction, OK, task, then the expert's steps 1-2 and their observations.
    assert lose.outcome == "lose" and lose.prompt == experts[0].messages[: 3 + 4]
    assert lose.prompt[-1]["role"] == "user" and lose.prompt[3]["role"] == "assistant"
    assert lose.chosen == experts[0].messages[7:] and lose.rejected == explored[0].messages[7:]
    assert (lose.chosen_reward, lose.rejected_reward) == (0.5, 0.0)
    # t = 4 (the expert's last step): the expert continuation is its last turn alone.
    assert win.outcome == "win" and win.prompt == experts[2].messages[: 3 + 6]
    assert win.chosen == explored[2].messages[9:] and win.rejected == experts[2].messages[9:] == [
        experts[2].messages[-1]
    ]
    for p, prefix in ((lose, 2), (win, 3)):
        assert p.mode == "step" and p.iteration == 2 and p.extra["prefix_steps"] == prefix
        validate_pair(p)


def test_step_one_pairs_like_trajectory_mode():
    expert = trajectory("a", 1.0, 3, env="alfworld")
    agent = _step_wise(expert, 1, 0.0, 4)
    (step,), _ = step_pairs([expert], [agent])
    ordinary = Trajectory(**{**agent.__dict__, "extra": {"sample": 0}})
    (whole,), _ = trajectory_pairs([expert], [ordinary])
    assert (step.prompt, step.chosen, step.rejected) == (whole.prompt, whole.chosen, whole.rejected)
    assert step.extra["prefix_steps"] == 0 and step.mode == "step" and whole.mode == "trajectory"


def test_trailing_observation_is_dropped():
    expert = trajectory("a", 1.0, 4, env="alfworld")
    agent = _step_wise(expert, 2, 0.0, 3, trailing_obs=True)
    (pair,), _ = step_pairs([expert], [agent])
    assert pair.rejected == agent.messages[5:-1] and pair.rejected[-1]["role"] == "assistant"


@pytest.mark.parametrize("env,cut", [("webshop", True), ("scienceworld", True), ("alfworld", False)])
def test_losing_continuation_is_cut_to_the_experts_plus_5_rounds_on_webshop_and_scienceworld(env, cut):
    expert = trajectory("a", 1.0, 4, env=env)
    agent = _step_wise(expert, 3, 0.0, 12)  # expert continuation: 2 steps = 3 turns; agent's: 23 turns
    (pair,), _ = step_pairs([expert], [agent])
    assert len(pair.chosen) == 3
    assert pair.rejected == (agent.messages[7:][: 3 + 10] if cut else agent.messages[7:])
    assert pair.rejected[-1]["role"] == "assistant"


def test_a_task_without_expert_is_counted_and_skipped():
    expert = trajectory("a", 1.0, 4, env="alfworld")
    orphan = _step_wise(trajectory("zz", 1.0, 4, env="alfworld"), 2, 0.0, 2)
    pairs, stats = step_pairs([expert], [_step_wise(expert, 2, 0.0, 2), orphan])
    assert [p.task_id for p in pairs] == ["a"] and stats.missing_expert == 1 and stats.lose == 1


def test_a_prefix_that_is_not_the_experts_is_an_error():
    expert = trajectory("a", 1.0, 4, env="alfworld")
    agent = _step_wise(expert, 3, 0.0, 2)
    agent.messages[4] = {"role": "user", "content": "Observation: something else."}
    with pytest.raises(DataError, match=r"task 'a', step-wise episode, field 'messages': its 2-step prefix"):
        step_pairs([expert], [agent])
    agent.extra["step_wise"]["prefix_steps"] = "2"
    with pytest.raises(DataError, match="prefix_steps.*non-negative integer"):
        step_pairs([expert], [agent])


def test_each_mode_reads_only_its_own_kind_of_episode():
    experts = [trajectory(i, 0.5, 4, env="textworld-express") for i in ("a", "b")]
    ordinary = [
        trajectory("a", 0.0, 3, env="textworld-express", source="explore", seed=1),
        trajectory("b", 1.0, 2, env="textworld-express", source="explore", seed=1),
    ]
    step_wise = [
        _step_wise(experts[0], 2, 1.0, 3),
        _step_wise(experts[1], 3, 0.0, 2),
        _step_wise(experts[1], 4, 0.5, 1),
    ]
    explored = [step_wise[0], ordinary[0], step_wise[1], ordinary[1], step_wise[2]]
    trajectory_only, t_stats = trajectory_pairs(experts, explored)
    assert [(p.task_id, p.mode, p.outcome) for p in trajectory_only] == [
        ("a", "trajectory", "lose"),
        ("b", "trajectory", "win"),
    ]
    assert trajectory_only == trajectory_pairs(experts, ordinary)[0]
    step_only, s_stats = step_pairs(experts, explored)
    assert [(p.task_id, p.mode, p.outcome, p.extra["prefix_steps"]) for p in step_only] == [
        ("a", "step", "win", 1),
        ("b", "step", "lose", 2),
    ]
    assert s_stats.tie == 1 and step_only == step_pairs(experts, step_wise)[0]
    # Self-play never compares episodes from different prefixes.
    assert self_play_pairs(explored)[0] == self_play_pairs(ordinary)[0]

    mixture, stats = build_pairs(explored, experts, mode="mixture", iteration=1)
    assert [(p.task_id, p.mode) for p in mixture] == [
        ("a", "trajectory"),
        ("b", "trajectory"),
        ("a", "step"),
        ("b", "step"),
    ]
    assert stats.to_dict() == {
        "win": 2,
        "tie": 1,
        "lose": 2,
        "missing_expert": 0,
        "unusable": 0,
        "pairs": 4,
        "by_mode": {"trajectory": {**t_stats.to_dict()}, "step": {**s_stats.to_dict()}},
    }
    assert stats.by_mode["trajectory"].pairs == 2 and stats.by_mode["step"].pairs == 2
    assert "by_mode" not in t_stats.to_dict()  # single-mode stats files keep their shape


# --- CLI -------------------------------------------------------------------------------------


def _files(tmp_path):
    experts = [trajectory(i, 1.0, 4, env="alfworld") for i in ("1", "2")]
    explored = [
        trajectory("1", 0.0, 3, env="alfworld", source="explore", seed=1),
        _step_wise(experts[0], 2, 0.0, 3),
        _step_wise(experts[1], 3, 1.0, 2),
        _step_wise(experts[1], 4, 0.0, 2),
    ]
    expert_file, explore_file = tmp_path / "expert.jsonl", tmp_path / "explore.jsonl"
    write_jsonl(expert_file, experts)
    write_jsonl(explore_file, explored)
    return expert_file, explore_file


def test_build_pairs_cli_step_and_mixture(tmp_path):
    expert_file, explore_file = _files(tmp_path)
    out = tmp_path / "step.jsonl"
    result = runner.invoke(
        app,
        [
            "build-pairs",
            "--mode",
            "step",
            "--expert",
            str(expert_file),
            "--explore",
            str(explore_file),
            "--out",
            str(out),
            "--iteration",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert [(p.task_id, p.mode, p.extra["prefix_steps"]) for p in read_jsonl(out, "pair")] == [
        ("1", "step", 1),
        ("2", "step", 3),
    ]
    text = " ".join(result.output.split())
    assert "1 ordinary episodes" in text and "not used in step mode" in text and "2 pairs written" in text
    assert json.loads((tmp_path / "step.stats.json").read_text())["tie"] == 1

    out = tmp_path / "mixture.jsonl"
    result = runner.invoke(
        app,
        [
            "build-pairs",
            "--mode",
            "mixture",
            "--expert",
            str(expert_file),
            "--explore",
            str(explore_file),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert [p.mode for p in read_jsonl(out, "pair")] == ["trajectory", "step", "step"]
    stats = json.loads((tmp_path / "mixture.stats.json").read_text())
    assert (stats["pairs"], stats["by_mode"]["trajectory"]["lose"], stats["by_mode"]["step"]["tie"]) == (3, 1, 1)
    # One row per outcome, a column per mode and the total.
    text = " ".join(result.output.split())
    assert "trajectory ┃ step ┃ total" in text
    assert "lose │ 1 │ 2 │ 3" in text and "pairs │ 1 │ 2 │ 3" in text

    out = tmp_path / "trajectory.jsonl"
    result = runner.invoke(
        app, ["build-pairs", "--expert", str(expert_file), "--explore", str(explore_file), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert [p.mode for p in read_jsonl(out, "pair")] == ["trajectory"]
    assert "3 step-wise episodes" in " ".join(result.output.split())


def test_build_pairs_cli_mode_errors(tmp_path):
    expert_file, explore_file = _files(tmp_path)
    ordinary = tmp_path / "ordinary.jsonl"
    write_jsonl(ordinary, [trajectory("1", 0.0, 3, env="alfworld", source="explore", seed=1)])
    step_only = tmp_path / "step_only.jsonl"
    write_jsonl(step_only, read_jsonl(explore_file, "trajectory")[1:])
    for args, message in [
        (["--mode", "step", "--explore", str(explore_file)], "--expert is required in step mode"),
        (["--mode", "stepwise", "--expert", str(expert_file), "--explore", str(explore_file)], "--mode 'stepwise'"),
        (["--mode", "step", "--expert", str(expert_file), "--explore", str(ordinary)], "no step-wise episodes"),
        (["--expert", str(expert_file), "--explore", str(step_only)], "all 3 episodes are step-wise"),
        (["--mode", "self-play", "--explore", str(step_only)], "all 3 episodes are step-wise"),
    ]:
        result = runner.invoke(app, ["build-pairs", *args, "--out", str(tmp_path / "p.jsonl")])
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and message in text and "Traceback" not in text, result.output
    assert not (tmp_path / "p.jsonl").exists()
