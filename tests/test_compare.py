"""`etokit compare` and the results it reads: per-task evaluation files and `etokit run` folders,
with intervals known in advance (exact binomial quantiles, zero-width shifts), panel mismatches
refused with exit code 2, and a run's rows carrying per-task results and their paired difference
from BC (results.json, the results table, the model card)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from etokit.cli import app
from etokit.data import write_jsonl
from etokit.evaluate import compare_panels, eval_report, load_eval_results, per_task, summarize
from tests.factories import exact_quantile_count, trajectory

runner = CliRunner()
N, K = 40, 10  # a two-point difference: +100 on K of N tasks, 0 on the others


def two_point_panels():
    """A's rewards vary over tasks; B gains a full reward on the first K of A's zero tasks."""
    a = {f"t{i:02d}": (i % 4) / 4 for i in range(N)}  # a quarter of them 0.0
    gains = [t for t, r in a.items() if r == 0.0][:K]
    b = {t: (1.0 if t in gains else r) for t, r in a.items()}
    return a, b


def write_eval(path: Path, rewards: dict[str, float], split: str = "test-seen", env: str = "webshop") -> Path:
    played = [trajectory(t, r, split=split, env=env) for t, r in rewards.items()]
    report = eval_report(played, env=env, split=split, model="m", model_revision="local:0", task_ids=list(rewards))
    path.write_text(json.dumps(report))
    return path


def test_compare_files_prints_the_exact_paired_interval(tmp_path):
    a, b = two_point_panels()
    lo, _ = exact_quantile_count(N, K / N, 0.025)
    hi, _ = exact_quantile_count(N, K / N, 0.975)
    fa, fb, out = write_eval(tmp_path / "a.json", a), write_eval(tmp_path / "b.json", b), tmp_path / "cmp.json"
    result = runner.invoke(app, ["compare", str(fa), str(fb), "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    (c,) = json.loads(out.read_text())["comparisons"]
    # the difference in reward x100 is 100 * Binomial(N, K/N) / N under the bootstrap
    assert c["mean"] == pytest.approx(100 * K / N)
    assert (c["lo"], c["hi"]) == (pytest.approx(100 * lo / N), pytest.approx(100 * hi / N))
    assert (c["up"], c["down"], c["same"], c["n"]) == (K, 0, N - K, N)
    assert c["a"]["mean"] == pytest.approx(100 * sum(a.values()) / N)
    assert f"+{100 * K / N:.1f} [+{100 * lo / N:.1f}, +{100 * hi / N:.1f}]" in result.output


def test_a_constant_shift_has_a_zero_width_paired_interval(tmp_path):
    a = {f"t{i}": (i % 5) / 10 for i in range(30)}
    b = {t: r + 0.25 for t, r in a.items()}
    c = compare_panels(
        load_eval_results(write_eval(tmp_path / "a.json", a)), load_eval_results(write_eval(tmp_path / "b.json", b))
    )
    assert (c.diff.diff.mean, c.diff.diff.lo, c.diff.diff.hi) == pytest.approx((25.0, 25.0, 25.0))
    assert c.a.hi - c.a.lo > 5  # while each mean alone is uncertain


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda b: {**{k: v for k, v in b.items() if k != "t03"}, "x99": 0.0},
            "only in A.json: t03; 1 task(s) only in B.json: x99",
        ),
        (lambda b: {k: v for k, v in b.items() if k not in ("t05", "t06")}, "2 task(s) only in A.json: t05, t06"),
    ],
)
def test_compare_refuses_different_panels_with_exit_2(tmp_path, change, message):
    a, b = two_point_panels()
    fa, fb = write_eval(tmp_path / "A.json", a), write_eval(tmp_path / "B.json", change(b))
    result = runner.invoke(app, ["compare", str(fa), str(fb)], terminal_width=400)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert message in result.output.replace(str(tmp_path) + "/", "")
    allowed = runner.invoke(app, ["compare", str(fa), str(fb), "--allow-mismatch"], terminal_width=200)
    assert allowed.exit_code == 0 and "compared on the" in allowed.output, allowed.output


def test_compare_refuses_another_split_or_env_and_bad_files(tmp_path):
    a, _ = two_point_panels()
    seen = write_eval(tmp_path / "seen.json", a)
    for other, what in [
        (write_eval(tmp_path / "unseen.json", a, split="test-unseen"), "webshop/test-unseen"),
        (write_eval(tmp_path / "alf.json", a, env="alfworld"), "alfworld/test-seen"),
    ]:
        result = runner.invoke(app, ["compare", str(seen), str(other)], terminal_width=400)
        assert result.exit_code == 2 and what in result.output and "same env and split" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"split": "test-seen", "per_task": [{"task_id": "t1", "reward": "high"}]}))
    result = runner.invoke(app, ["compare", str(seen), str(bad)], terminal_width=400)
    assert result.exit_code == 2 and "per_task[0] (task t1): reward must be a number" in result.output
    for args, message in [
        ([str(seen), str(tmp_path / "none.json")], "no such file"),
        ([str(seen), str(seen), "--split", "test-seen"], "--split only applies with --run"),
        ([str(seen), str(seen), "--out", str(tmp_path / "c.txt")], "expected a .json file"),
    ]:
        result = runner.invoke(app, ["compare", *args], terminal_width=400)
        assert result.exit_code == 2 and message in result.output, result.output


def test_an_environment_error_is_not_compared_silently(tmp_path):
    a, b = two_point_panels()
    fa = write_eval(tmp_path / "a.json", a)
    played = [
        trajectory(t, r, env="webshop", split="test-seen", extra={"error": "boom"} if t == "t07" else {})
        for t, r in b.items()
    ]
    fb = tmp_path / "b.json"
    fb.write_text(
        json.dumps(
            eval_report(played, env="webshop", split="test-seen", model="m", model_revision=None, task_ids=list(b))
        )
    )
    assert load_eval_results(fb).errors == ("t07",) and "t07" not in load_eval_results(fb).rewards
    result = runner.invoke(app, ["compare", str(fa), str(fb)], terminal_width=400)
    assert result.exit_code == 2 and "failed on 1 task(s) (t07)" in result.output
    allowed = runner.invoke(app, ["compare", str(fa), str(fb), "--allow-mismatch", "--out", str(tmp_path / "c.json")])
    assert allowed.exit_code == 0
    (c,) = json.loads((tmp_path / "c.json").read_text())["comparisons"]
    assert c["n"] == c["a"]["n"] == c["b"]["n"] == N - 1  # both means over the tasks compared
    assert c["a"]["mean"] == pytest.approx(100 * sum(r for t, r in a.items() if t != "t07") / (N - 1))


def test_eval_files_written_before_per_task_results_still_compare(tmp_path):
    a, b = two_point_panels()
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"env": "webshop", "split": "test-seen", "avg_reward": 1.0, "rewards": a}))
    c = compare_panels(load_eval_results(old), load_eval_results(write_eval(tmp_path / "b.json", b)))
    assert (c.diff.n, c.diff.up) == (N, K)


# ------------------------------------------------------------------------------ run folders


def fake_run(tmp_path: Path, stages: dict[str, dict[str, dict[str, float]]], *, per_task_in_manifest=True):
    """A run folder whose manifest records eval stages of the given rewards (by split, by task)."""
    from etokit.run import Run, RunConfig
    from etokit.train.config import parse_config

    cfg = parse_config(RunConfig, ["--run-dir", str(tmp_path / "run"), "--push-to", "me/agent"])
    run = Run(cfg)
    for name, splits in stages.items():
        outputs = {}
        for split, rewards in splits.items():
            played = [trajectory(t, r, split=split, source="explore") for t, r in rewards.items()]
            file = run.dir / "eval" / name / f"{split}.jsonl"
            write_jsonl(file, played)
            from etokit.run.report import _eval_outputs

            outputs[split] = {"file": f"eval/{name}/{split}.jsonl", **_eval_outputs(played)}
            if not per_task_in_manifest:  # as recorded before per-task results and intervals were kept
                outputs[split] = {k: outputs[split][k] for k in ("file", "episodes", "avg_reward", "success_rate")}
        run.manifest.done(f"eval-{name}", outputs, 1.0)
    return run


@pytest.mark.parametrize("per_task_in_manifest", [True, False])
def test_run_rows_carry_per_task_results_and_the_paired_difference_from_bc(tmp_path, per_task_in_manifest):
    from etokit.run.report import _card_row, reward_chart, results_table

    a, b = two_point_panels()
    unseen = {t: 0.5 for t in a}
    run = fake_run(
        tmp_path,
        {
            "bc": {"test-seen": a, "test-unseen": unseen},
            "iter-1": {"test-seen": b, "test-unseen": {t: 0.25 for t in a}},
        },
        per_task_in_manifest=per_task_in_manifest,
    )
    bc, it1 = run.results()
    assert "vs_bc" not in bc["test-seen"]
    assert [r["task_id"] for r in it1["test-seen"]["per_task"]] == list(b)
    assert [r["reward"] for r in it1["test-seen"]["per_task"]] == list(b.values())
    lo, _ = exact_quantile_count(N, K / N, 0.025)
    hi, _ = exact_quantile_count(N, K / N, 0.975)
    seen = it1["test-seen"]["vs_bc"]
    assert (seen["mean"], seen["lo"], seen["hi"]) == pytest.approx((100 * K / N, 100 * lo / N, 100 * hi / N))
    assert (seen["up"], seen["down"], seen["same"]) == (K, 0, N - K)
    unseen_d = it1["test-unseen"]["vs_bc"]
    assert (unseen_d["mean"], unseen_d["lo"], unseen_d["hi"], unseen_d["down"]) == (-25.0, -25.0, -25.0, N)
    ci = bc["test-seen"]["avg_reward_ci"]
    assert ci["lo"] < ci["mean"] < ci["hi"] and ci["mean"] == pytest.approx(bc["test-seen"]["avg_reward"])
    assert bc["test-unseen"]["avg_reward_ci"] == {"mean": 50.0, "lo": 50.0, "hi": 50.0, "n": N, "confidence": 0.95}

    card = _card_row(it1)
    assert card["seen vs BC [95% CI] up/down/same"] == (
        f"+{100 * K / N:.1f} [+{100 * lo / N:.1f}, +{100 * hi / N:.1f}] {K}/0/{N - K}"
    )
    assert card["unseen reward x100 [95% CI]"] == "25.0 [25.0, 25.0]"
    assert _card_row(bc)["seen vs BC [95% CI] up/down/same"] == "-"
    assert "seen vs BC [95% CI] up/down/same" not in _card_row(bc, vs_bc=False)
    assert f"[{ci['lo']:.1f}, {ci['hi']:.1f}]" in reward_chart([bc, it1])
    from rich.console import Console

    console = Console(width=300, record=True)
    console.print(results_table([bc, it1]))
    assert "-25.0 [-25.0, -25.0] 0/40/0" in console.export_text()


def test_compare_run_stages_per_split(tmp_path):
    a, b = two_point_panels()
    run = fake_run(tmp_path, {"bc": {"test-seen": a, "test-unseen": a}, "iter-1": {"test-seen": b, "test-unseen": a}})
    out = tmp_path / "c.json"
    result = runner.invoke(
        app, ["compare", "--run", str(run.dir), "bc", "iter-1", "--out", str(out)], terminal_width=200
    )
    assert result.exit_code == 0, result.output
    seen, unseen = json.loads(out.read_text())["comparisons"]
    assert (seen["split"], seen["up"], unseen["split"], unseen["same"]) == ("test-seen", K, "test-unseen", N)
    assert seen == {**seen, **{k: v for k, v in run.results()[1]["test-seen"]["vs_bc"].items() if k != "missing_in_a"}}
    only = runner.invoke(app, ["compare", "--run", str(run.dir), "bc", "iter-1", "--split", "test-unseen"])
    assert only.exit_code == 0 and "test-seen" not in only.output.split("\n", 2)[-1]
    for args, message in [
        (["bc", "iter-3"], "has no evaluation of 'iter-3' (evaluated: bc, iter-1)"),
        (["bc", "iter-1", "--split", "train"], "--split 'train': a run evaluates"),
    ]:
        result = runner.invoke(app, ["compare", "--run", str(run.dir), *args], terminal_width=400)
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(app, ["compare", "--run", str(tmp_path), "bc", "iter-1"], terminal_width=400)
    assert result.exit_code == 2 and "no manifest.json" in result.output


def test_per_task_records_what_a_rerun_needs():
    played = [trajectory("t1", 1.0, seed=3), trajectory("t2", 0.5, extra={"error": "env died"})]
    assert per_task(played) == [
        {"task_id": "t1", "reward": 1.0, "success": True, "steps": 3, "seed": 3},
        {"task_id": "t2", "reward": 0.5, "success": False, "steps": 3, "seed": 0, "error": "env died"},
    ]
    assert summarize(played).avg_reward_ci.n == 1  # the failed episode is not in the interval


def test_compare_help_has_examples():
    result = runner.invoke(app, ["compare", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "Examples" in result.output and "$ etokit compare --run" in result.output
