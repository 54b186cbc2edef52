"""`etokit expert` and `etokit envs list` through the CLI (Typer's CliRunner)."""

from __future__ import annotations

import json
import os

from typer.testing import CliRunner

from etokit.cli import app
from etokit.data import Trajectory
from etokit.envs import Reset, Step
from tests.factories import FakeEnv

runner = CliRunner()


class FlakyExpertEnv(FakeEnv):
    """Tasks 0-6, each with a 2-action gold path, longer than the agent's 1-step limit: the expert of
    task 1 falls short, task 2 crashes its process, task 6 ends (fails) on its first step, the rest
    succeed."""

    max_steps = 1

    def task_ids(self, split):
        return [str(i) for i in range(7)]

    def expert(self, task_id):
        return ["take key", "open door"]

    def reset(self, task_id, max_steps=None):
        self.task, self.n, self.limit = task_id, 0, max_steps or self.max_steps
        return Reset(task_id=task_id, instruction="Open the door.", observation="")

    def step(self, action):
        if self.task == "2":
            os._exit(9)
        self.n += 1
        reward = 0.5 if self.task == "1" else 0.0 if self.task == "6" else self.n / 2
        done = self.n == 2 or self.task == "6" or self.n >= self.limit
        return Step(observation=f"done {action}", reward=reward, done=done)


def _rows(path):
    return [Trajectory.from_row(json.loads(line)) for line in path.read_text().splitlines()]


def test_expert_writes_and_resumes_without_duplicates(tmp_path):
    out = tmp_path / "expert.jsonl"
    first = runner.invoke(
        app, ["expert", "--env", "textworld-express", "--split", "train", "--limit", "3", "--out", str(out)]
    )
    assert first.exit_code == 0, first.output
    assert [r.task_id for r in _rows(out)] and len(_rows(out)) == 3
    second = runner.invoke(
        app, ["expert", "--env", "textworld-express", "--limit", "5", "--workers", "2", "--out", str(out)]
    )
    assert second.exit_code == 0, second.output
    rows = _rows(out)
    assert sorted(int(r.task_id) for r in rows) == [0, 1, 2, 3, 4]
    assert "2 written, 3 already in" in " ".join(second.output.split())
    for r in rows:
        assert r.env == "textworld-express" and r.split == "train" and r.source == "expert"
        assert r.reward == 1.0 and r.success and r.messages[-1]["role"] == "assistant"
    third = runner.invoke(app, ["expert", "--env", "textworld-express", "--limit", "5", "--out", str(out)])
    assert third.exit_code == 0 and len(_rows(out)) == 5


def test_expert_seed_picks_a_reproducible_subset(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (a, b):
        result = runner.invoke(
            app,
            [
                "expert",
                "--env",
                "textworld-express",
                "--split",
                "test-seen",
                "--limit",
                "2",
                "--seed",
                "7",
                "--out",
                str(path),
            ],
        )
        assert result.exit_code == 0, result.output
    ids = [r.task_id for r in _rows(a)]
    assert sorted(ids) == sorted(r.task_id for r in _rows(b)) and ids != ["10000", "10001"]


def test_failed_and_crashed_experts_are_reported_not_written(tmp_path):
    out = tmp_path / "expert.jsonl"
    result = runner.invoke(app, ["expert", "--env", f"{__name__}:FlakyExpertEnv", "--workers", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    # The gold paths (2 actions) are played whole although the agent's limit is 1 step.
    rows = _rows(out)
    assert sorted(r.task_id for r in rows) == ["0", "3", "4", "5"] and {r.num_steps for r in rows} == {2}
    assert "expert failed 1: reward 0.50 after 2 of 2 gold actions (the gold path ended short of the goal)" in text
    assert "expert failed 6: reward 0.00: the episode ended after 1 of 2 gold actions" in text
    assert "error 2:" in text
    assert "4 written" in text and "2 failed, 1 errors" in text and "success rate 66.7% over 6 played" in text


def test_user_errors_are_one_line_exit_2(tmp_path):
    out = str(tmp_path / "x.jsonl")
    for args, message in [
        (["--env", "nethack"], "unknown environment 'nethack'"),
        (["--env", "textworld-express", "--split", "dev"], "--split 'dev'"),
    ]:
        result = runner.invoke(app, ["expert", *args, "--out", out])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not os.path.exists(out)


def test_envs_list_shows_every_environment():
    result = runner.invoke(app, ["envs", "list"])
    assert result.exit_code == 0, result.output
    for name in ("webshop", "scienceworld", "alfworld", "textworld-express"):
        assert name in result.output
    assert "available" in result.output
