"""`make experiment`'s verdict: ETO iterations against BC over several seeds on one task panel."""

from __future__ import annotations

import json
import math

import numpy as np
import yaml
import pytest
from tests.run_fixtures import SPLITS, fake_run

from etokit.experiment import aggregate, verdict_rows
from etokit.stats import PanelMismatchError, paired_diff, seed_averaged_diff


def test_seeds_are_averaged_task_by_task_before_the_bootstrap():
    # By hand: per-task differences (b - a) of seed 0 are 1, 0, 0, -1 and of seed 1 are 0, 0, 1, 0,
    # so the seed-averaged differences are 0.5, 0, 0.5, -0.5: mean 0.125 over 4 tasks (not 8 values).
    a0, b0 = {"t1": 0, "t2": 1, "t3": 0, "t4": 1}, {"t1": 1, "t2": 1, "t3": 0, "t4": 0}
    a1, b1 = {"t1": 0, "t2": 0, "t3": 0, "t4": 1}, {"t1": 0, "t2": 0, "t3": 1, "t4": 1}
    d = seed_averaged_diff([(a0, b0), (a1, b1)])
    assert d.n == 4 and d.mean == pytest.approx(0.125)
    assert (d.up, d.down, d.same) == (2, 1, 1)
    # The bootstrap of 4 values can only land on multiples of 1/8 between the extremes.
    assert -0.5 <= d.lo <= d.mean <= d.hi <= 0.5


def test_the_seed_averaged_interval_matches_the_normal_approximation():
    # 400 tasks, 3 seeds: each task's averaged difference has a known spread, so the 95% interval of
    # its mean must be close to mean +- 1.96 sd / sqrt(n), an independent formula. Pooling the 1,200
    # (task, seed) values instead of averaging would give n = 1200 and an interval ~sqrt(3) too narrow.
    rng = np.random.default_rng(1)
    n, seeds = 400, 3
    runs = []
    for _ in range(seeds):
        a = {f"t{i}": float(rng.integers(0, 2)) for i in range(n)}
        b = {t: float(rng.integers(0, 2)) for t in a}
        runs.append((a, b))
    averaged = np.array([np.mean([b[t] - a[t] for a, b in runs]) for t in runs[0][0]])
    d = seed_averaged_diff(runs)
    half = 1.96 * averaged.std(ddof=1) / math.sqrt(n)
    assert d.n == n
    assert d.mean == pytest.approx(averaged.mean())
    assert d.lo == pytest.approx(averaged.mean() - half, abs=0.15 * half)
    assert d.hi == pytest.approx(averaged.mean() + half, abs=0.15 * half)


def test_seeds_evaluated_on_other_tasks_are_refused_naming_the_run():
    same = {"t1": 1.0, "t2": 0.0}
    with pytest.raises(PanelMismatchError, match=r"seed run 1: B .*t3"):
        seed_averaged_diff([(same, same), (same, {"t1": 1.0, "t3": 0.0})])


def _rewards(run_dir, policy, split):
    """An evaluation's rewards read straight from its episodes (not through etokit's panels)."""
    rows = [json.loads(line) for line in (run_dir / "eval" / policy / f"{split}.jsonl").read_text().splitlines()]
    return {r["task_id"]: 100 * r["reward"] for r in rows}


def test_the_verdict_compares_every_iteration_with_bc_per_seed_and_over_seeds(tmp_path):
    runs = {seed: fake_run(tmp_path / f"seed-{seed}" / "run", iterations=2, tasks=12, seed=seed) for seed in (0, 1, 2)}
    verdict = aggregate(runs, root=tmp_path)

    assert verdict["seeds"] == [0, 1, 2] and verdict["tasks"] == {s: 12 for s in SPLITS}
    assert verdict["runs"]["1"] == "seed-1/run"
    assert [(c["b"], c["split"]) for c in verdict["comparisons"]] == [
        (p, s) for p in ("iter-1", "iter-2") for s in SPLITS
    ]
    for c in verdict["comparisons"]:
        bc = {s: _rewards(runs[s], "bc", c["split"]) for s in runs}
        it = {s: _rewards(runs[s], c["b"], c["split"]) for s in runs}
        by_hand = np.mean([np.mean([it[s][t] - bc[s][t] for s in runs]) for t in bc[0]])
        assert c["seed_averaged"]["mean"] == pytest.approx(by_hand)
        assert c["seed_averaged"]["n"] == 12
        for s, per_seed in zip(runs, c["per_seed"]):
            assert per_seed["mean"] == pytest.approx(np.mean([it[s][t] - bc[s][t] for t in bc[s]]))
            assert per_seed == paired_diff(bc[s], it[s], names=("bc", c["b"])).to_dict()
    policy = verdict["policies"]["iter-2"]["test-unseen"]
    assert [p["mean"] for p in policy["per_seed"]] == pytest.approx(
        [np.mean(list(_rewards(runs[s], "iter-2", "test-unseen").values())) for s in runs]
    )

    rows = verdict_rows(verdict)
    assert [(r["comparison"], r["split"]) for r in rows] == [
        (f"{p} - bc", s) for p in ("iter-1", "iter-2") for s in SPLITS
    ]
    for row, c in zip(rows, verdict["comparisons"]):
        avg = c["seed_averaged"]
        expected = "above zero" if avg["lo"] > 0 else "below zero" if avg["hi"] < 0 else "includes zero"
        assert row["interval"] == expected
        assert row["per seed"] == ", ".join(f"{d['mean']:+.1f}" for d in c["per_seed"])


def test_the_verdict_file_alone_reproduces_every_interval(tmp_path):
    # experiment.json keeps each task's reward per policy, split and seed, read from the episodes; the
    # comparisons recomputed from those alone (the run folders deleted) are the recorded ones.
    import shutil

    runs = {seed: fake_run(tmp_path / f"seed-{seed}" / "run", iterations=1, tasks=9, seed=seed) for seed in (0, 1)}
    verdict = json.loads(json.dumps(aggregate(runs, root=tmp_path)))  # as written and read back
    for policy in ("bc", "iter-1"):
        for split in SPLITS:
            assert verdict["per_task"][policy][split] == {str(s): _rewards(runs[s], policy, split) for s in runs}
    for seed in runs:
        shutil.rmtree(runs[seed])
    for c in verdict["comparisons"]:
        tables = verdict["per_task"]
        pairs = [(tables["bc"][c["split"]][s], tables[c["b"]][c["split"]][s]) for s in ("0", "1")]
        assert seed_averaged_diff(pairs, names=("bc", c["b"])).to_dict() == c["seed_averaged"]
        assert [paired_diff(a, b, names=("bc", c["b"])).to_dict() for a, b in pairs] == c["per_seed"]


def test_a_seed_that_stopped_early_limits_the_verdict_to_the_iterations_all_seeds_have(tmp_path):
    runs = {
        0: fake_run(tmp_path / "a", iterations=2, tasks=6, seed=0),
        1: fake_run(tmp_path / "b", iterations=1, tasks=6, seed=1),
    }
    verdict = aggregate(runs)
    assert list(verdict["policies"]) == ["bc", "iter-1"]
    assert {c["b"] for c in verdict["comparisons"]} == {"iter-1"}


def test_make_experiment_runs_each_seed_and_resumes_instead_of_starting_over(tmp_path):
    # The real driver, in its own process (it starts its own embedded Hub before any HF import), on
    # the tiny run of the loop tests: 2 seeds, then the same command again, which must read both
    # finished runs back instead of training anything again.
    import os
    import subprocess
    import sys

    from tests.run_fixtures import FLAGS

    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "etokit.experiment", "--dir", str(out), "--config", "demo", "--seeds", "3,4", *FLAGS]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    verdict = json.loads((out / "experiment.json").read_text())
    assert verdict["seeds"] == [3, 4] and verdict["runs"] == {"3": "seed-3/run", "4": "seed-4/run"}
    assert [(c["b"], c["split"]) for c in verdict["comparisons"]] == [("iter-1", s) for s in SPLITS]
    configs = [yaml.safe_load((out / f"seed-{s}" / "run" / "etokit_config.yaml").read_text()) for s in (3, 4)]
    assert [c["seed"] for c in configs] == [3, 4]
    assert "seed-averaged (paired)" in first.stdout and "iter-1 - bc" in first.stdout
    assert set(verdict["diagnostics"]) == {"3", "4"} and "pairs-1" in verdict["diagnostics"]["3"]
    assert "What the runs did" in first.stdout

    manifests = {s: (out / f"seed-{s}" / "run" / "manifest.json").read_bytes() for s in (3, 4)}
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert {s: (out / f"seed-{s}" / "run" / "manifest.json").read_bytes() for s in (3, 4)} == manifests
    assert json.loads((out / "experiment.json").read_text())["comparisons"] == verdict["comparisons"]


def test_diagnostics_of_a_run_read_its_stages_curves_and_replies(tmp_path):
    """run_diagnostics (printed by `make experiment` before its verdict) on a hand-made run folder:
    figures computed here by hand from the episodes and the training log."""
    from etokit.data import write_jsonl
    from etokit.data.schema import Trajectory
    from etokit.experiment import diagnostic_rows
    from etokit.run.report import run_diagnostics
    from tests.factories import conversation

    seen = Trajectory(
        task_id="1",
        env="textworld-express",
        messages=conversation("task", ["look", "look", "open fridge", "look"], ["a", "b", "c"]),
        reward=0.5,
        source="explore",
    )
    # Two replies without an Action line: no action, so not a repeat of each other.
    unseen_messages = conversation("task", ["take apple"], [])[:3] + [
        {"role": "assistant", "content": "Thought: hmm"},
        {"role": "user", "content": "Observation: nothing"},
        {"role": "assistant", "content": "Thought: hmm"},
    ]
    unseen = Trajectory(task_id="2", env="textworld-express", messages=unseen_messages, reward=0.0, source="explore")
    write_jsonl(tmp_path / "eval" / "bc" / "test-seen.jsonl", [seen])
    write_jsonl(tmp_path / "eval" / "bc" / "test-unseen.jsonl", [unseen])
    (tmp_path / "models" / "iter-1").mkdir(parents=True)
    log = [
        {"step": s, "loss": 0.7 - 0.1 * s, "rewards/margins": 0.2 * s, "rewards/accuracies": 0.25 * s}
        for s in (1, 2, 3)
    ]
    (tmp_path / "models" / "iter-1" / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    evaluation = {"avg_reward": 50.0, "invalid_action_rate": 0.0, "avg_steps": 4.0}
    stages = [
        {"name": "eval-bc", "outputs": {s: {"file": f"eval/bc/{s}.jsonl", **evaluation} for s in SPLITS}},
        {
            "name": "explore-1",
            "outputs": {"policy": "bc", "episodes": 3, "avg_reward": 9.5, "invalid_action_rate": 0.1},
        },
        {"name": "pairs-1", "outputs": {"stats": {"win": 1, "tie": 2, "lose": 3, "pairs": 4}}},
        {"name": "dpo-1", "outputs": {"model": "models/iter-1", "beta": 0.1, "learning_rate": 5e-5}},
    ]
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": stages}))

    d = run_diagnostics(tmp_path)
    # 4 replies of 7, 7, 8, 7 words ("Thought: step 0 of task.\nAction: look"); 1 repeat in 3 pairs.
    assert d["eval-bc"]["test-seen"]["reply_words"] == 7.25
    assert d["eval-bc"]["test-seen"]["repeated_action_rate"] == round(1 / 3, 4)
    assert d["eval-bc"]["test-unseen"] == {**evaluation, "reply_words": 2.0, "repeated_action_rate": 0.0}
    assert d["pairs-1"] == {"win": 1, "tie": 2, "lose": 3, "pairs": 4}
    assert d["explore-1"] == {"policy": "bc", "episodes": 3, "avg_reward": 9.5, "invalid_action_rate": 0.1}
    assert d["dpo-1"]["steps"] == 3
    assert d["dpo-1"]["first"] == {"loss": 0.6, "rewards/margins": 0.2, "rewards/accuracies": 0.25}
    assert d["dpo-1"]["last"] == {"loss": 0.4, "rewards/margins": 0.6, "rewards/accuracies": 0.75}
    rows = diagnostic_rows({"0": d})
    assert [r["stage"] for r in rows] == ["eval-bc", "eval-bc", "explore-1", "pairs-1", "dpo-1"]
    assert "repeated actions 33.3%" in rows[0]["diagnostics"]
    assert "rewards/margins 0.20 -> 0.60" in rows[-1]["diagnostics"]


def test_an_interrupted_experiment_says_how_to_resume_instead_of_a_traceback(tmp_path, monkeypatch, capsys):
    import contextlib

    import etokit.demo
    from etokit import experiment

    def interrupted(root, config, seed, overrides):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run_seed", interrupted)
    monkeypatch.setattr(etokit.demo, "embedded_hub", lambda root: contextlib.nullcontext())
    with pytest.raises(SystemExit) as exit:
        experiment.main(["--dir", str(tmp_path / "exp"), "--config", "demo"])
    assert exit.value.code == 130
    assert "run the same command again to resume" in capsys.readouterr().out
