"""`etokit eval` and the metrics it reports."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from etokit.cli import app
from etokit.data import read_jsonl
from etokit.evaluate import summarize
from tests.factories import trajectory
from tests.test_explore import build_policy

runner = CliRunner()


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "tiny"
    build_policy(path)
    return path


def test_summarize_uses_the_papers_metric_and_skips_env_errors():
    rows = [trajectory("a", 1.0, 4, extra={"invalid_actions": 1}),
            trajectory("b", 0.5, 2, extra={"invalid_actions": 2}),
            trajectory("c", 0.0, 3, extra={"invalid_actions": 0}), trajectory("d", 0.0, 1, extra={"error": "boom"})]
    result = summarize(rows)
    scored = rows[:3]
    assert result.episodes == 3 and result.errors == 1
    assert result.avg_reward == pytest.approx(100 * sum(t.reward for t in scored) / 3)
    assert result.success_rate == pytest.approx(1 / 3)
    assert result.avg_steps == pytest.approx(sum(t.num_steps for t in scored) / 3)
    assert result.invalid_action_rate == pytest.approx(3 / sum(t.num_steps for t in scored))
    assert summarize([]).episodes == 0


def test_eval_cli_reports_metrics_consistent_with_its_episodes(policy_path, tmp_path):
    metrics, episodes = tmp_path / "eval.json", tmp_path / "eval.jsonl"
    result = runner.invoke(app, ["eval", "--model", str(policy_path), "--env", "webshop", "--split", "test-seen",
                                    "--limit", "3", "--no-icl", "--max-steps", "2", "--max-new-tokens", "8",
                                    "--batch-size", "3", "--out", str(metrics), "--trajectories", str(episodes)])
    assert result.exit_code == 0, result.output
    report = json.loads(metrics.read_text())
    played = read_jsonl(episodes, "trajectory")
    assert [t.split for t in played] == ["test-seen"] * 3
    assert report["rewards"] == {t.task_id: t.reward for t in played}
    assert {k: report[k] for k in summarize(played).to_dict()} == summarize(played).to_dict()
    assert report["model_revision"].startswith("local:") and report["env"] == "webshop"
    for label in ("avg reward (x100)", "success rate", "avg steps", "invalid-action rate"):
        assert label in result.output


def test_eval_cli_user_errors(policy_path, tmp_path):
    for args, message in [
        (["--split", "valid"], "--split 'valid'"),
        (["--out", str(tmp_path / "m.txt")], "expected a .json file"),
        (["--env", "nethack"], "unknown environment 'nethack'"),
    ]:
        result = runner.invoke(app, ["eval", "--model", str(policy_path), "--env", "webshop", *args])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
