"""`etokit eval` and the metrics it reports."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from etokit.cli import app
from etokit.data import read_jsonl
from etokit.evaluate import panel, summarize
from tests.factories import build_policy, trajectory

runner = CliRunner()


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "tiny"
    build_policy(path)
    return path


def test_summarize_uses_the_papers_metric_and_skips_env_errors():
    rows = [
        trajectory("a", 1.0, 4, extra={"invalid_actions": 1}),
        trajectory("b", 0.5, 2, extra={"invalid_actions": 2}),
        trajectory("c", 0.0, 3, extra={"invalid_actions": 0}),
        trajectory("d", 0.0, 1, extra={"error": "boom"}),
    ]
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
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(policy_path),
            "--env",
            "webshop",
            "--split",
            "test-seen",
            "--limit",
            "3",
            "--no-icl",
            "--max-steps",
            "2",
            "--max-new-tokens",
            "8",
            "--batch-size",
            "3",
            "--out",
            str(metrics),
            "--trajectories",
            str(episodes),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(metrics.read_text())
    played = read_jsonl(episodes, "trajectory")
    assert [t.split for t in played] == ["test-seen"] * 3
    assert report["rewards"] == {t.task_id: t.reward for t in played}
    assert {k: report[k] for k in summarize(played).to_dict()} == summarize(played).to_dict()
    assert report["model_revision"].startswith("local:") and report["env"] == "webshop"
    for label in ("avg reward (x100)", "success rate", "avg steps", "invalid-action rate"):
        assert label in result.output
    ci = report["avg_reward_ci"]
    assert ci["n"] == 3 and ci["mean"] == pytest.approx(report["avg_reward"]) and ci["lo"] <= ci["mean"] <= ci["hi"]
    assert f"{ci['mean']:.1f} [{ci['lo']:.1f}, {ci['hi']:.1f}]" in result.output


def test_eval_writes_a_rerunnable_panel_with_per_task_results(policy_path, tmp_path):
    # A named panel in the order asked for; each task's result; comparable with `etokit compare`.
    out, episodes = tmp_path / "twx.json", tmp_path / "twx.jsonl"
    wanted = ["10003", "10000", "10002"]
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(policy_path),
            "--env",
            "textworld-express",
            "--split",
            "test-seen",
            "--task-ids",
            ",".join(wanted),
            "--no-icl",
            "--max-steps",
            "2",
            "--max-new-tokens",
            "8",
            "--batch-size",
            "3",
            "--out",
            str(out),
            "--trajectories",
            str(episodes),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    played = read_jsonl(episodes, "trajectory")
    assert report["panel"] == {
        "env": "textworld-express",
        "split": "test-seen",
        "task_ids": wanted,
        "id": panel("textworld-express", "test-seen", wanted)["id"],
    }
    assert report["panel"]["id"] != panel("textworld-express", "test-seen", sorted(wanted))["id"]
    assert report["panel"]["id"].startswith("textworld-express/test-seen:3:")
    assert [t.task_id for t in played] == wanted
    assert report["per_task"] == [
        {"task_id": t.task_id, "reward": t.reward, "success": t.success, "steps": t.num_steps, "seed": t.seed}
        for t in played
    ]
    assert report["model"] == played[0].model and report["model_revision"] == played[0].model_revision
    assert (report["format"], report["success_rate_ci"]["n"]) == ("etokit-eval", 3)
    # B: the same panel with task 10000 won
    better = {
        **report,
        "per_task": [{**r, "reward": 1.0} if r["task_id"] == "10000" else r for r in report["per_task"]],
    }
    (tmp_path / "better.json").write_text(json.dumps(better))
    gained = 100 * (1.0 - played[1].reward) / 3
    compared = runner.invoke(
        app, ["compare", str(out), str(tmp_path / "better.json"), "--out", str(tmp_path / "cmp.json")]
    )
    assert compared.exit_code == 0, compared.output
    (c,) = json.loads((tmp_path / "cmp.json").read_text())["comparisons"]
    up = int(gained > 0)
    assert c["mean"] == pytest.approx(gained) and (c["up"], c["same"], c["n"]) == (up, 3 - up, 3)
    fewer = {**report, "per_task": report["per_task"][:2]}
    (tmp_path / "fewer.json").write_text(json.dumps(fewer))
    refused = runner.invoke(app, ["compare", str(out), str(tmp_path / "fewer.json")])
    assert refused.exit_code == 2 and "10002" in refused.output

    # --panel plays the recorded panel again: same tasks in the same order (greedy: same results)
    again = tmp_path / "again.json"
    rerun = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(policy_path),
            "--panel",
            str(out),
            "--no-icl",
            "--max-steps",
            "2",
            "--max-new-tokens",
            "8",
            "--batch-size",
            "3",
            "--out",
            str(again),
        ],
    )
    assert rerun.exit_code == 0, rerun.output
    assert json.loads(again.read_text())["panel"] == report["panel"]
    assert json.loads(again.read_text())["per_task"] == report["per_task"]
    for args, message in [
        (["--split", "test-unseen"], "--split test-unseen: --panel"),
        (["--env", "webshop"], "is a panel of textworld-express"),
        (["--limit", "2"], "leave out --limit and --task-ids"),
        (["--task-ids", "10000"], "leave out --limit and --task-ids"),
    ]:
        result = runner.invoke(app, ["eval", "--model", str(policy_path), "--panel", str(out), *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_eval_cli_user_errors(policy_path, tmp_path):
    for args, message in [
        (["--split", "valid"], "--split 'valid'"),
        (["--out", str(tmp_path / "m.txt")], "expected a .json file"),
        (["--env", "nethack"], "unknown environment 'nethack'"),
        (["--panel", str(tmp_path / "none.json")], "none.json: no such file"),
    ]:
        result = runner.invoke(app, ["eval", "--model", str(policy_path), "--env", "webshop", *args])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"env": "webshop", "split": "test-seen", "rewards": {"1": 0.5}}))
    for args, message in [([], "--env is required (or --panel FILE"), (["--panel", str(old)], "old.json: no panel")]:
        result = runner.invoke(app, ["eval", "--model", str(policy_path), *args])
        assert result.exit_code == 2 and message in result.output, result.output
