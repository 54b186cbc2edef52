"""`etokit run` end to end on TextWorldExpress with a tiny Llama and the embedded Hub: every stage
recorded, every dataset and checkpoint on the Hub; a crash at a stage boundary + --resume re-runs
nothing done and ends with the outputs of an uninterrupted run; re-pushes make no commit; config
errors are one line, exit 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from etokit.data import read_jsonl
from etokit.errors import EtokitError
from etokit.run import Run, RunConfig
from etokit.train.config import parse_config
from tests.run_fixtures import ENV, FLAGS, STAGES, commits, make_config, new_repo


class Crash(Exception):
    pass


def pair_rows(path: Path) -> list[tuple]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["task_id"], r["chosen"], r["rejected"], r["chosen_reward"], r["rejected_reward"]) for r in rows]


def test_loop_records_every_stage_and_publishes_everything(reference_run, hub):
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM

    cfg, rows = reference_run
    run_dir = Path(cfg.run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == STAGES
    assert all(s["config_hash"] == manifest["config_hash"] for s in manifest["stages"])
    outputs = {s["name"]: s["outputs"] for s in manifest["stages"]}
    assert yaml.safe_load((run_dir / "etokit_config.yaml").read_text())["push_to"] == cfg.push_to

    # The datasets, read back with `datasets` as a user would.
    import datasets

    expert = datasets.load_dataset(cfg.datasets["expert"], ENV, split="train")
    assert len(expert) == outputs["expert"]["trajectories"] > 0
    explore = datasets.load_dataset(cfg.datasets["explore"], ENV, split="iter_1")
    assert len(explore) == 3 and set(explore["source"]) == {"explore"}
    pairs = datasets.load_dataset(cfg.datasets["pairs"], ENV, split="iter_1")
    stats = outputs["pairs-1"]["stats"]
    assert len(pairs) == stats["pairs"] > 0 and stats["win"] + stats["tie"] + stats["lose"] == 3

    # Checkpoints: branch + tag per stage, the tag on the pushed commit, loadable by revision.
    refs = HfApi().list_repo_refs(cfg.push_to)
    tags = {t.name: t.target_commit for t in refs.tags}
    assert {"bc", "iter-1"} <= {b.name for b in refs.branches}
    assert tags["iter-1"] == outputs["push-iter-1"]["commit"] and tags["bc"] == outputs["push-bc"]["commit"]
    hub_model = AutoModelForCausalLM.from_pretrained(cfg.push_to, revision="iter-1")
    local = AutoModelForCausalLM.from_pretrained(run_dir / outputs["dpo-1"]["model"])
    bc = AutoModelForCausalLM.from_pretrained(run_dir / outputs["bc"]["model"])
    for a, b, c in zip(hub_model.parameters(), local.parameters(), bc.parameters()):
        assert (a == b).all()
    assert any((b != c).any() for b, c in zip(local.parameters(), bc.parameters())), "DPO changed nothing"

    # The iter-1 card's eval table holds every stage so far.
    from huggingface_hub import hf_hub_download

    card = Path(hf_hub_download(cfg.push_to, "README.md", revision="iter-1")).read_text()
    table = [line for line in card.splitlines() if line.startswith("| BC |") or line.startswith("| iter-1 |")]
    assert len(table) == 2, card
    assert "reward_per_iteration.md" in HfApi().list_repo_files(cfg.push_to, revision="iter-1")
    # ... with 95% intervals over tasks, and iter-1 against BC task for task
    assert "seen reward x100 [95% CI]" in card and "unseen vs BC [95% CI] up/down/same" in card
    assert "percentile-bootstrap" in card

    results = json.loads((run_dir / "results.json").read_text())
    assert [r["model"] for r in results["rows"]] == ["bc", "iter-1"] == [r["model"] for r in rows]
    for row in results["rows"]:
        stage = outputs[f"eval-{row['model']}"]
        for split in ("test-seen", "test-unseen"):
            assert row[split]["avg_reward"] == stage[split]["avg_reward"] and row[split]["episodes"] == 1
            # each task's result, as its episode in the run folder says; one task: a zero-width interval
            (episode,) = read_jsonl(run_dir / stage[split]["file"], "trajectory")
            assert (
                row[split]["per_task"]
                == stage[split]["per_task"]
                == [
                    {
                        "task_id": episode.task_id,
                        "reward": episode.reward,
                        "success": episode.success,
                        "steps": episode.num_steps,
                        "seed": episode.seed,
                    }
                ]
            )
            ci = row[split]["avg_reward_ci"]
            assert ci["lo"] == ci["mean"] == ci["hi"] == pytest.approx(100 * episode.reward) and ci["n"] == 1
    for split in ("test-seen", "test-unseen"):  # iter-1 vs BC on the same task
        bc_reward, it_reward = (results["rows"][i][split]["per_task"][0]["reward"] for i in (0, 1))
        vs = results["rows"][1][split]["vs_bc"]
        assert vs["mean"] == vs["lo"] == vs["hi"] == pytest.approx(100 * (it_reward - bc_reward))
        assert (vs["up"], vs["down"], vs["same"], vs["n"]) == (
            int(it_reward > bc_reward),
            int(it_reward < bc_reward),
            int(it_reward == bc_reward),
            1,
        )
    assert "vs_bc" not in results["rows"][0]["test-seen"]
    assert results["panels"]["test-unseen"]["task_ids"] == [
        r["task_id"] for r in results["rows"][0]["test-unseen"]["per_task"]
    ]
    assert results["rows"][1]["pairs"] == stats


def test_crash_then_resume_equals_uninterrupted_run(reference_run, hub, tmp_path):
    reference, reference_rows = reference_run
    cfg = make_config(tmp_path / "b", new_repo("b"))

    def crash_after_pairs(stage):
        if stage == "pairs-1":
            raise Crash(stage)

    with pytest.raises(Crash):
        Run(cfg, after_stage=crash_after_pairs).run()
    manifest_path = Path(cfg.run_dir) / "manifest.json"
    before = json.loads(manifest_path.read_text())
    assert [s["name"] for s in before["stages"]] == STAGES[: STAGES.index("pairs-1") + 1]
    commits_before = commits(cfg)

    with pytest.raises(EtokitError, match="--resume"):
        Run(cfg)  # a run dir with a manifest is never silently overwritten

    ran = []
    run = Run(cfg, resume=True, after_stage=ran.append)
    rows = run.run()
    assert ran == STAGES[STAGES.index("pairs-1") + 1 :]
    assert run.skipped == STAGES[: STAGES.index("pairs-1") + 1]
    after = json.loads(manifest_path.read_text())
    assert after["stages"][: len(before["stages"])] == before["stages"]  # earlier records untouched
    commits_after = commits(cfg)
    for repo, ids in commits_before.items():
        if repo != "tags" and ids:
            assert commits_after[repo][-len(ids) :] == ids  # history kept, nothing pushed twice
    assert commits_after[cfg.datasets["expert"]] == commits_before[cfg.datasets["expert"]]

    # Same outputs as the uninterrupted run (repos differ, so compare content, not ids).
    assert rows == reference_rows
    out_a = {
        s["name"]: s["outputs"] for s in json.loads((Path(reference.run_dir) / "manifest.json").read_text())["stages"]
    }
    out_b = {s["name"]: s["outputs"] for s in after["stages"]}
    for stage in ("bc", "dpo-1"):
        assert out_b[stage]["weights_sha256"] == out_a[stage]["weights_sha256"]
    assert pair_rows(Path(cfg.run_dir) / out_b["pairs-1"]["file"]) == pair_rows(
        Path(reference.run_dir) / out_a["pairs-1"]["file"]
    )

    # A crash between a push and its manifest record: the re-push finds the same content on the
    # Hub and makes no commit.
    after["stages"] = [s for s in after["stages"] if s["name"] not in ("push-pairs-1", "push-iter-1")]
    manifest_path.write_text(json.dumps(after))
    ran.clear()
    Run(cfg, resume=True, after_stage=ran.append).run()
    assert ran == ["push-pairs-1", "push-iter-1"]
    assert commits(cfg) == commits_after


def test_mixture_pairs_in_the_loop(hub, tmp_path):
    """pairs_mode mixture: exploration plays each task whole and step-wise from steps_per_task of
    the expert's steps; the pairs stage pairs both kinds, with per-mode counts. Stopped after the
    pairs stage (the rest of the loop is the trajectory-mode loop's)."""
    from etokit.data import read_jsonl
    from etokit.rollout.jobs import expert_steps, job_of

    cfg = make_config(tmp_path / "m", new_repo("m"), "--pairs-mode", "mixture", "--steps-per-task", "2")

    def stop(name):
        if name == "pairs-1":
            raise Crash

    run = Run(cfg, after_stage=stop)
    with pytest.raises(Crash):
        run.run()
    explore = run.manifest.get("explore-1")
    played = read_jsonl(tmp_path / "m" / explore["file"], "trajectory")
    experts = {t.task_id: t for t in read_jsonl(tmp_path / "m" / run.manifest.get("expert")["file"], "trajectory")}
    jobs = [job_of(t) for t in played]
    assert [j.prefix_steps for j in jobs if j.task_id == jobs[0].task_id][0] is None  # whole episode first
    assert sum(j.prefix_steps is None for j in jobs) == 3 and explore["step_wise_episodes"] == 6
    for task in experts:
        steps = [j.prefix_steps for j in jobs if j.task_id == task and j.prefix_steps is not None]
        assert len(steps) == 2 and steps == sorted(steps) and max(steps) < expert_steps(experts[task])
    stats = run.manifest.get("pairs-1")["stats"]
    assert set(stats["by_mode"]) == {"trajectory", "step"}
    assert stats["by_mode"]["step"]["win"] + stats["by_mode"]["step"]["tie"] + stats["by_mode"]["step"]["lose"] == 6
    for key in ("win", "tie", "lose", "pairs"):
        assert stats[key] == stats["by_mode"]["trajectory"][key] + stats["by_mode"]["step"][key]
    pairs = [
        json.loads(line) for line in (tmp_path / "m" / run.manifest.get("pairs-1")["file"]).read_text().splitlines()
    ]
    assert len(pairs) == stats["pairs"]
    assert {p["mode"] for p in pairs} <= {"trajectory", "step"}


def _evaluate_alone(policy, tmp_path, monkeypatch, record, **keys):
    """The eval stage alone (no manifest file, no Hub) of the tiny ``policy`` as BC, on CounterEnv,
    2 steps of 8 tokens, with the run config ``keys``; ``record(generator, batch)`` sees each
    generate call. Returns the stage's outputs."""
    from types import SimpleNamespace

    from etokit.rollout import play as play_module
    from etokit.rollout.generator import Generator
    from tests.factories import CounterEnv

    monkeypatch.setattr(play_module, "open_envs", lambda name, n, options=None: [CounterEnv() for _ in range(n)])
    real = Generator.generate
    monkeypatch.setattr(Generator, "generate", lambda self, batch, **kw: record(self, batch) or real(self, batch, **kw))
    cfg = RunConfig(run_dir=str(tmp_path), push_to="ns/a", max_steps=2, max_new_tokens=8, icl=False, **keys)
    run = Run.__new__(Run)
    run.cfg, run.dir = cfg, tmp_path
    run.manifest = SimpleNamespace(get={"bc": {"model": str(policy.path)}, "expert": {}}.get)
    return run.evaluate("bc")


def test_eval_plays_both_test_splits_in_one_pool(policy, tmp_path, monkeypatch):
    """The eval stage plays test-seen and test-unseen in one pool of eval_batch_size (6 rows a
    forward for 3 + 3 tasks, explore_batch_size being 2); each split's file and stage record are
    what playing that split alone gives (greedy; the splits share their task ids)."""
    from etokit.rollout import play as play_module
    from etokit.rollout.generator import ExploreConfig, Generator
    from etokit.rollout.jobs import Job
    from etokit.run.report import EVAL_SPLITS, _eval_outputs

    rows = []
    outputs = _evaluate_alone(
        policy,
        tmp_path,
        monkeypatch,
        lambda generator, batch: rows.append(len(batch)),
        eval_tasks=3,
        explore_batch_size=2,
        eval_batch_size=6,
    )
    assert max(rows) == 6
    assert list(outputs) == list(EVAL_SPLITS)
    for split in EVAL_SPLITS:
        alone = tmp_path / "alone" / f"{split}.jsonl"
        config = ExploreConfig(icl=False, max_new_tokens=8, max_steps=2)
        tasks = [Job(t) for t in ("t0", "t1", "t2")]
        play_module.play(
            "textworld-express",
            split,
            lambda env: tasks,
            Generator(policy.model, policy.tokenizer, config),
            batch_size=2,
            out=alone,
            model_name="ns/a@bc",
        )
        expected = read_jsonl(alone, "trajectory")
        assert [t.split for t in expected] == [split] * 3
        assert outputs[split] == {"file": f"eval/bc/{split}.jsonl", **_eval_outputs(expected)}
        got = read_jsonl(tmp_path / outputs[split]["file"], "trajectory")
        assert [t.to_row() for t in got] == [t.to_row() for t in expected]


def test_eval_loads_the_policy_in_generation_dtype(policy, tmp_path, monkeypatch):
    """generation_dtype reaches the explore/eval stages' model: the episodes are played by a bfloat16
    policy (the slot engine's K/V in bfloat16 too), and recorded as usual."""
    import torch

    played = []
    outputs = _evaluate_alone(
        policy,
        tmp_path,
        monkeypatch,
        lambda generator, batch: played.append(next(generator.model.parameters()).dtype),
        eval_tasks=2,
        generation_dtype="bfloat16",
    )
    assert played and set(played) == {torch.bfloat16}
    assert all(outputs[split]["episodes"] == 2 for split in outputs)


def test_keys_added_later_keep_an_older_runs_hash():
    """A run made before eval_batch_size / generation_dtype existed resumes: at their defaults they are
    not hashed; set otherwise, they change the hash (they change what the stages do)."""
    import dataclasses

    from etokit.run.config import config_hash

    cfg = make_config(Path("r"), "ns/x")
    older = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("iterations", "early_stopping")}
    for key in ("eval_batch_size", "generation_dtype"):
        older.pop(key)
    assert config_hash(cfg) == hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()[:16]
    assert config_hash(dataclasses.replace(cfg, generation_dtype="bfloat16")) != config_hash(cfg)
    assert config_hash(dataclasses.replace(cfg, eval_batch_size=8)) != config_hash(cfg)


def test_resume_refuses_a_changed_config(tmp_path):
    run_dir = tmp_path / "c"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps({"config_hash": "0" * 16, "stages": []}))
    with pytest.raises(EtokitError, match="config differs"):
        Run(make_config(run_dir, "ns/x"), resume=True)


@pytest.mark.parametrize(
    "yaml_text, flags, message",
    [
        ("push_to: ns/agent\nrun_dir: r\nbogus_key: 1\n", [], "unknown config key 'bogus_key'"),
        ("push_to: ns/agent\nrun_dir: r\n", ["--dpo-betas", "0.1"], "unknown config key --dpo-betas"),
        ("push_to: ns/agent\nrun_dir: r\ndpo_schedule: {beta: [0.1, 0]}\n", [], "must be > 0, got 0"),
        ("push_to: agent\nrun_dir: r\n", [], "--push-to must be NAMESPACE/NAME"),
        ("push_to: ns/agent\nrun_dir: r\nenv: nethack\n", [], "--env 'nethack'"),
        ("run_dir: r\n", [], "--push-to is required"),
        # the keys of the flat config before the recipes' configs became sections name their new place
        (
            "push_to: ns/agent\nrun_dir: r\nbc_learning_rate: 1.0e-5\n",
            [],
            "is now 'bc.learning_rate' (YAML `bc: {learning_rate: ...}`)",
        ),
        (
            "push_to: ns/agent\nrun_dir: r\n",
            ["--dpo-beta", "0.1"],
            "--dpo-beta on the command line is now --dpo-schedule.beta",
        ),
        (
            "push_to: ns/agent\nrun_dir: r\ndpo_args: [--lora]\n",
            [],
            "every option of that recipe is a key of the 'dpo' section",
        ),
        # what the run sets for each stage is not a key of its section
        (
            "push_to: ns/agent\nrun_dir: r\nbc: {output_dir: elsewhere}\n",
            [],
            "config key bc.output_dir: the run sets it",
        ),
        (
            "push_to: ns/agent\nrun_dir: r\n",
            ["--dpo.beta", "0.3"],
            "config key dpo.beta: the run sets it (dpo_schedule.beta",
        ),
        (
            "push_to: ns/agent\nrun_dir: r\ndpo_schedule: {beta: []}\n",
            [],
            "--dpo-schedule.beta needs at least one value",
        ),
    ],
)
def test_config_errors_are_one_line_exit_2(tmp_path, yaml_text, flags, message):
    from typer.testing import CliRunner

    from etokit.cli import app

    path = tmp_path / "eto.yaml"
    path.write_text(yaml_text)
    result = CliRunner().invoke(app, ["run", "--config", str(path), *flags])
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert message in text and "Traceback" not in text
    assert len(text.splitlines()) == 1, text


def test_dpo_hyperparameters_per_iteration():
    from etokit.run.config import DPOSchedule

    cfg = RunConfig(run_dir="r", push_to="ns/a")
    assert [cfg.dpo_hparams(k) for k in (1, 2, 3)] == [(0.1, 1e-6), (0.5, 5e-7), (0.5, 5e-7)]
    cfg = RunConfig(run_dir="r", push_to="ns/a", dpo_schedule=DPOSchedule(beta=[0.2], learning_rate=[1e-5, 2e-6, 3e-7]))
    assert [cfg.dpo_hparams(k) for k in (1, 2, 4)] == [(0.2, 1e-5), (0.2, 2e-6), (0.2, 3e-7)]


def test_the_run_launches_each_recipe_with_its_section(tmp_path, monkeypatch):
    """The `bc` / `dpo` sections reach the recipes as their own config (models/<stage>.yaml, read
    with --config), with what the run sets per stage: data, model, output folder, the iteration's
    beta / learning rate, the run's max_length and seed, --resume. No training here: the launch is
    caught."""
    import subprocess

    from etokit.train.config import BCConfig, DPOConfig

    path = tmp_path / "run.yaml"
    path.write_text(
        "bc: {learning_rate: 1.0e-4, lora: true, save_steps: 3}\ndpo: {batch_size: 8, backend: bucketed}\n"
        "dpo_schedule: {beta: [0.2, 0.4], learning_rate: [1.0e-5, 2.0e-6]}\nmax_length: 1024\nseed: 7\n"
    )
    cfg = parse_config(
        RunConfig,
        [
            "--config",
            str(path),
            "--run-dir",
            str(tmp_path / "r"),
            "--push-to",
            "ns/a",
            "--bc.num-epochs",
            "5",
            "--dpo.no-lora",
            "--dpo.warmup-ratio",
            "0",
        ],
    )
    launched = []

    def launch(cmd, **kwargs):
        launched.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr("etokit.run.loop.subprocess.run", launch)
    run = Run(cfg)
    run.manifest.done("expert", {"file": "data/expert.jsonl"}, 0.0)
    run.manifest.done("dpo-1", {"model": "models/iter-1"}, 0.0)
    run.bc({"model": "me/base", "revision": "v1"})
    run.dpo(2, "iter-1", {"file": "data/pairs_iter2.jsonl", "stats": {"pairs": 4}})

    (bc_cmd, dpo_cmd) = launched
    assert bc_cmd[-2:] == ["--config", str(tmp_path / "r" / "models" / "bc.yaml")]
    bc = parse_config(BCConfig, bc_cmd[-2:])
    assert (bc.learning_rate, bc.num_epochs, bc.lora, bc.save_steps) == (1e-4, 5, True, 3)  # the section
    assert (
        bc.per_device_batch_size,
        bc.gradient_accumulation_steps,
        bc.warmup_ratio,
        bc.lr_scheduler,
        bc.report_to,
    ) == (4, 16, 0.03, "cosine", "none")  # ETO's, as before
    assert (bc.model, bc.model_revision, bc.data, bc.output_dir) == (
        "me/base",
        "v1",
        str(tmp_path / "r" / "data" / "expert.jsonl"),
        str(tmp_path / "r" / "models" / "bc"),
    )
    assert (bc.max_length, bc.seed, bc.resume, bc.push_to) == (1024, 7, True, None)

    assert dpo_cmd[-2:] == ["--config", str(tmp_path / "r" / "models" / "iter-2.yaml")]
    dpo = parse_config(DPOConfig, dpo_cmd[-2:])
    assert (dpo.beta, dpo.learning_rate, dpo.iteration) == (0.4, 2e-6, 2)  # dpo_schedule at iteration 2
    assert (dpo.batch_size, dpo.backend, dpo.lora, dpo.warmup_ratio, dpo.num_epochs, dpo.lr_scheduler) == (
        8,
        "bucketed",
        False,
        0.0,
        3,
        "constant_with_warmup",
    )
    assert (dpo.model, dpo.ref_model, dpo.data, dpo.ref_cache_dir) == (
        str(tmp_path / "r" / "models" / "iter-1"),
        None,
        str(tmp_path / "r" / "data" / "pairs_iter2.jsonl"),
        str(tmp_path / "r" / "ref-cache"),
    )
    assert (dpo.max_length, dpo.seed, dpo.resume, dpo.report_to) == (1024, 7, True, "none")


def _changed(value, f):
    """Another valid value of field ``f``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1 if f.metadata.get("max") is None and f.metadata.get("lt") is None else value / 2 + 0.01
    if isinstance(value, list):
        return [*value, value[-1] if value else "x"]
    choices = f.metadata.get("choices")
    if choices:
        return next(c for c in choices if c != value)
    return "eager" if value is None else value + "x"


def test_config_hash_changes_with_every_training_hyperparameter():
    """A resumed run must match its config: a change to any option of the BC / DPO sections or of the
    DPO schedule is a different config (only what the run sets itself is left out)."""
    import dataclasses

    from etokit.run.config import DPO_RUN_SETS, RUN_SETS, config_hash

    cfg = RunConfig(run_dir="r", push_to="ns/a")
    base = config_hash(cfg)
    checked = []
    for section, run_sets in (("bc", RUN_SETS), ("dpo", DPO_RUN_SETS), ("dpo_schedule", {})):
        values = getattr(cfg, section)
        for f in dataclasses.fields(values):
            if f.name in run_sets:
                continue
            changed = dataclasses.replace(values, **{f.name: _changed(getattr(values, f.name), f)})
            assert config_hash(dataclasses.replace(cfg, **{section: changed})) != base, f"{section}.{f.name}"
            checked.append(f"{section}.{f.name}")
    assert {
        "bc.learning_rate",
        "bc.num_epochs",
        "bc.gradient_accumulation_steps",
        "bc.lora",
        "dpo.batch_size",
        "dpo.warmup_ratio",
        "dpo_schedule.beta",
        "dpo_schedule.learning_rate",
    } <= set(checked)
    assert config_hash(dataclasses.replace(cfg, iterations=5)) == base  # more iterations: the same run, extended


def test_paper_configs_parse():
    from etokit.configs import shipped

    assert {"textworld-express", "webshop", "scienceworld", "alfworld", "demo", "demo-smollm2"} <= set(shipped())
    for name in ("textworld-express", "webshop", "scienceworld", "alfworld", "demo"):
        cfg = parse_config(RunConfig, ["--config", str(shipped()[name]), "--push-to", "ns/a", "--run-dir", "r"])
        if name != "demo":
            assert cfg.dpo_hparams(1) == (0.1, 1e-6) and cfg.dpo_hparams(2) == (0.5, 5e-7)
            assert cfg.bc.per_device_batch_size * cfg.bc.gradient_accumulation_steps == 64


def test_two_iterations_explore_with_and_reference_the_previous_policy(hub, tmp_path, monkeypatch):
    """Past iteration 1: iteration 1 yields no pairs (every explored episode ties its expert), so
    its DPO keeps the BC weights; iteration 2 explores with iter-1, trains DPO against iter-1 as
    the reference with the second beta / learning rate; early_stopping ends the loop after
    iteration 2 (of 3) because its test-unseen reward fell below iteration 1's."""
    import dataclasses

    from etokit import pairs as pairs_module
    from etokit.data import read_jsonl

    real_build_pairs = pairs_module.build_pairs

    def all_ties_in_iteration_1(explored, experts=None, *, iteration=None, **kwargs):
        experts = list(experts)
        if iteration == 1:  # the agent matched its expert on every task: nothing to prefer
            reward = {pairs_module.task_key(e): e.reward for e in experts}
            explored = [dataclasses.replace(t, reward=reward[pairs_module.task_key(t)]) for t in explored]
        return real_build_pairs(explored, experts, iteration=iteration, **kwargs)

    monkeypatch.setattr(pairs_module, "build_pairs", all_ties_in_iteration_1)
    # The tiny model scores 0 everywhere; early stopping reads these test-unseen rewards instead.
    unseen = {"bc": 10.0, "iter-1": 10.0, "iter-2": 5.0}
    monkeypatch.setattr(Run, "_unseen", lambda self, name: unseen[name])
    # FLAGS with 2 train tasks, 3 iterations, no mid-training checkpoints (not what is tested here) and no
    # warmup (2 pairs make one DPO step, which a warmup would take at learning rate 0).
    flags = FLAGS[: FLAGS.index("--bc.save-steps")]  # FLAGS end with the two save-steps options
    for name, value in (("--train-tasks", "2"), ("--iterations", "3")):
        flags[flags.index(name) + 1] = value
    flags.insert(flags.index("--dpo-schedule.learning-rate") + 2, "5e-4")  # a list: 1e-3 at iteration 1, then 5e-4
    cfg = parse_config(
        RunConfig,
        [
            *flags,
            "--run-dir",
            str(tmp_path / "two"),
            "--push-to",
            new_repo("two"),
            "--early-stopping",
            "--dpo-schedule.beta",
            "0.1",
            "0.5",
            "--dpo.warmup-ratio",
            "0",
            "--pairs-expert-observation",
            "trim",
        ],
    )
    assert (cfg.dpo_hparams(1), cfg.dpo_hparams(2)) == ((0.1, 1e-3), (0.5, 5e-4))
    rows = Run(cfg).run()

    run_dir = Path(cfg.run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    names = [s["name"] for s in manifest["stages"]]
    iteration = lambda k: [n.replace("-1", f"-{k}") for n in STAGES[STAGES.index("explore-1") :]]  # noqa: E731
    assert names == STAGES[: STAGES.index("explore-1")] + iteration(1) + iteration(2)  # no explore-3: stopped
    assert [r["model"] for r in rows] == ["bc", "iter-1", "iter-2"]
    out = {s["name"]: s["outputs"] for s in manifest["stages"]}

    # Iteration 1: no pairs, so no DPO: iter-1 is the BC weights, said so.
    assert out["pairs-1"]["stats"]["pairs"] == 0 and out["pairs-1"]["stats"]["tie"] == 2
    assert out["dpo-1"]["skipped"] == "no pairs" and out["dpo-1"]["weights_sha256"] == out["bc"]["weights_sha256"]

    # Iteration 2: explored by iter-1, DPO from iter-1 with iter-1 as the reference, second hparams.
    explored = read_jsonl(run_dir / out["explore-2"]["file"], "trajectory")
    assert explored and {t.model for t in explored} == {f"{cfg.push_to}@iter-1"}
    assert out["pairs-2"]["stats"]["pairs"] > 0 and "skipped" not in out["dpo-2"]
    assert (out["dpo-2"]["reference"], out["dpo-2"]["beta"], out["dpo-2"]["learning_rate"]) == ("iter-1", 0.5, 5e-4)
    ran = yaml.safe_load((run_dir / out["dpo-2"]["model"] / "etokit_config.yaml").read_text())
    assert Path(ran["model"]) == run_dir / out["dpo-1"]["model"] and ran["ref_model"] is None  # reference = --model
    assert (ran["beta"], ran["learning_rate"]) == (0.5, 5e-4)
    assert out["dpo-2"]["weights_sha256"] != out["dpo-1"]["weights_sha256"]

    # A deviating pair rule (pairs_expert_observation: trim) is recorded on the pairs and in the card.
    made = read_jsonl(run_dir / out["pairs-2"]["file"], "pair")
    assert made and all(p.extra["pair_rule"] == {"expert_observation": "trim"} for p in made)
    from huggingface_hub import hf_hub_download

    card = Path(hf_hub_download(cfg.datasets["pairs"], "README.md", repo_type="dataset")).read_text()
    assert "with expert_observation=trim" in card
