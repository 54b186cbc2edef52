"""The paper's published data, straight from the Hub: a dataset repo laid out exactly like
`agent-eto/eto-sft-trajectory` (one `default` config; splits webshop / scienceworld / alfworld
declared in the README's `configs`, files data/webshop_sft.json, data/sciworld_sft.json,
data/alfworld_sft.json; `dataset_info.features` of only `id` and `conversations`), served by the
embedded Hub, with rows generated in the official shape. BC trains from it, DPO from an official
pm-format pairs repo, and `etokit run` takes it as its expert data."""

from __future__ import annotations

import json

import pytest

from etokit.data import DataError
from etokit.data.eto_format import SCIWORLD_TASK_NAMES
from etokit.data.sources import HubDataset, load_source, parse_source
from tests.run_fixtures import TINY_RUN

PAPER_README = """---
configs:
- config_name: default
  data_files:
  - split: webshop
    path: data/webshop_*
  - split: scienceworld
    path: data/sciworld_*
  - split: alfworld
    path: data/alfworld_*
dataset_info:
  features:
  - name: id
    dtype: string
  - name: conversations
    list:
    - name: from
      dtype: string
    - name: value
      dtype: string
---
# ETO SFT trajectories (layout of agent-eto/eto-sft-trajectory)
"""
# Worded unlike etokit's own instructions (etokit/agent/prompts/), as the published data is.
PAPER_INSTRUCTION = {
    "webshop": "You are web shopping. Reply with a thought and an action such as search[...] or click[...].",
    "scienceworld": "You are a helpful assistant doing a science experiment. Reply as\nThought: ...\nAction: ...",
    "alfworld": "Interact with a household to solve a task. Reply as\nThought: ...\nAction: ...",
}
SCIWORLD_IDS = {name: number for number, name in SCIWORLD_TASK_NAMES.items()}


def _row(row_id: str, env: str, task: str, actions: list[str]) -> dict:
    turns = [
        {"from": "human", "value": PAPER_INSTRUCTION[env]},
        {"from": "gpt", "value": "OK"},
        {"from": "human", "value": task},
    ]
    for i, action in enumerate(actions):
        turns.append({"from": "gpt", "value": f"Thought: step {i} of the plan.\nAction: {action}"})
        if i < len(actions) - 1:
            turns.append({"from": "human", "value": f"Observation: you did {action}."})
    return {"id": row_id, "conversations": turns}


def official_id(task_id: str) -> str:
    """etokit's ScienceWorld id as the official data writes it: boil_12 -> 0_12."""
    name, variation = task_id.rsplit("_", 1)
    return f"{SCIWORLD_IDS[name]}_{variation}"


def sciworld_rows(task_ids: list[str]) -> list[dict]:
    return [
        _row(official_id(t), "scienceworld", f"Your task is to do {t}.", ["look around", "teleport to kitchen"])
        for t in task_ids
    ]


def publish(repo: str, files: dict[str, object], readme: str) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo, repo_type="dataset", exist_ok=True)
    ops = [CommitOperationAdd(path, json.dumps(rows).encode()) for path, rows in files.items()]
    ops.append(CommitOperationAdd("README.md", readme.encode()))
    api.create_commit(repo, ops, commit_message="the paper's layout", repo_type="dataset")


@pytest.fixture
def paper_repo(hub, repo_name):
    """A repo laid out as agent-eto/eto-sft-trajectory, its rows without reward or game_file."""
    files = {
        "data/webshop_sft.json": [
            _row(
                str(i),
                "webshop",
                f"WebShop [SEP] Instruction: [SEP] i need item {i}",
                [f"search[item {i}]", "click[buy now]"],
            )
            for i in range(3)
        ],
        "data/sciworld_sft.json": sciworld_rows(["boil_12", "melt_3", "find-animal_0"]),
        "data/alfworld_sft.json": [
            _row(
                f"alf{i}",
                "alfworld",
                f"You are in a room.\nYour task is to: put apple {i} in fridge.",
                ["go to fridge 1", "open fridge 1"],
            )
            for i in range(2)
        ],
    }
    publish(repo_name, files, PAPER_README)
    return repo_name


def test_the_published_layout_loads_with_datasets_as_the_issue_describes(paper_repo):
    from datasets import load_dataset

    ds = load_dataset(paper_repo, split="scienceworld")
    assert ds.column_names == ["id", "conversations"] and len(ds) == 3


def test_scienceworld_split_loads_with_official_ids_mapped_and_the_official_reward_rule(paper_repo):
    records = load_source(f"{paper_repo}:scienceworld", "trajectory")
    assert records.format == "eto-sft"
    assert [t.task_id for t in records.records] == ["boil_12", "melt_3", "find-animal_0"]
    assert {t.env for t in records.records} == {"scienceworld"}
    assert all(t.reward == 1.0 and t.split == "train" for t in records.records)  # construct_preference.py's 1.0
    # The split is the env's when not named.
    assert [t.task_id for t in load_source(paper_repo, "trajectory", env="scienceworld").records][0] == "boil_12"
    alf = load_source(paper_repo, "trajectory", env="alfworld").records
    assert [t.task_id for t in alf] == ["alf0", "alf1"] and all(t.reward == 1.0 for t in alf)


def test_webshop_rows_without_reward_need_a_stated_expert_reward(paper_repo):
    with pytest.raises(DataError, match="--expert-reward") as e:
        load_source(f"{paper_repo}:webshop", "trajectory")
    assert "row 0" in str(e.value) and "field 'reward'" in str(e.value)
    records = load_source(f"{paper_repo}:webshop", "trajectory", expert_reward=0.75).records
    assert [t.reward for t in records] == [0.75] * 3
    assert all(t.extra["expert_reward_stated"] == 0.75 for t in records)


def test_source_names_are_parsed_and_bad_ones_refused(tmp_path):
    assert parse_source("ns/data@iter-1:scienceworld") == HubDataset("ns/data", None, "scienceworld", "iter-1")
    assert parse_source("ns/data", config="c", split="s", revision="r") == HubDataset("ns/data", "c", "s", "r")
    local = tmp_path / "x.jsonl"
    local.write_text("")
    assert parse_source(str(local)) == local
    for bad in ("missing.jsonl", "./ns/data", "a/b/c", "ns/data:bad-split"):
        with pytest.raises(DataError, match="neither an existing file nor a Hub dataset"):
            parse_source(bad)


def test_a_missing_split_is_one_line_naming_the_repo(paper_repo):
    with pytest.raises(DataError, match=f"{paper_repo}.*nope"):
        load_source(f"{paper_repo}:nope", "trajectory")
    with pytest.raises(DataError, match="--env"):
        load_source(paper_repo, "trajectory")  # three splits, no environment to pick one


def test_bc_trains_from_the_published_layout(paper_repo, tmp_path):
    import etokit.recipes.train_bc as train_bc
    from etokit.models.init_model import build_tiny_model
    from etokit.train.metric_logging import read_log

    texts = [m["value"] for r in sciworld_rows(["boil_12", "melt_3", "find-animal_0"]) for m in r["conversations"]]
    build_tiny_model(texts, tmp_path / "tiny", seed=0)
    train_bc.main(
        [
            "--model",
            str(tmp_path / "tiny"),
            "--data",
            paper_repo,
            "--data-split",
            "scienceworld",
            "--output-dir",
            str(tmp_path / "bc"),
            "--max-steps",
            "2",
            "--per-device-batch-size",
            "2",
            "--report-to",
            "none",
            "--learning-rate",
            "1e-3",
            "--warmup-ratio",
            "0",
        ]
    )
    assert [row["step"] for row in read_log(tmp_path / "bc")] == [1, 2]
    with pytest.raises(DataError, match="--expert-reward"):  # WebShop rows: no reward is assumed
        train_bc.main(
            [
                "--model",
                str(tmp_path / "tiny"),
                "--data",
                paper_repo,
                "--data-split",
                "webshop",
                "--output-dir",
                str(tmp_path / "bc-webshop"),
                "--max-steps",
                "1",
                "--report-to",
                "none",
            ]
        )


def test_dpo_trains_from_an_official_pm_format_pairs_repo(hub, repo_name, tmp_path):
    import etokit.recipes.train_dpo as train_dpo
    from etokit.models.init_model import build_tiny_model
    from etokit.train.metric_logging import read_log

    pairs = []
    for i, t in enumerate(["boil_12", "melt_3"]):
        prompt = [
            {"from": "human", "value": PAPER_INSTRUCTION["scienceworld"]},
            {"from": "gpt", "value": "OK"},
            {"from": "human", "value": f"Your task is to do {t}."},
        ]
        chosen = [{"from": "gpt", "value": "Thought: go.\nAction: teleport to kitchen"}]
        rejected = [{"from": "gpt", "value": "Thought: hm.\nAction: look around"}]
        pairs.append({"id": official_id(t), "prompt": prompt, "chosen": chosen, "rejected": rejected})
    readme = (
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/sciworld_pm.json\n---\n"
    )
    publish(repo_name, {"data/sciworld_pm.json": pairs}, readme)
    texts = [m["value"] for p in pairs for side in ("prompt", "chosen", "rejected") for m in p[side]]
    build_tiny_model(texts, tmp_path / "tiny", seed=0)
    # Neither the rows nor the names the Hub gives (repo, config "default", split "train") say which
    # environment these are: --data-env does.
    common = [
        "--model",
        str(tmp_path / "tiny"),
        "--data",
        repo_name,
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--report-to",
        "none",
        "--ref-cache-dir",
        str(tmp_path / "ref"),
    ]
    with pytest.raises(DataError, match="--env"):
        train_dpo.main([*common, "--output-dir", str(tmp_path / "x")])
    train_dpo.main([*common, "--data-env", "scienceworld", "--output-dir", str(tmp_path / "dpo")])
    assert [row["step"] for row in read_log(tmp_path / "dpo")] == [1]


def test_etokit_run_takes_the_published_data_and_explores_with_its_instruction(hub, repo_name, tmp_path):
    """expert_data = the published layout: BC on those trajectories (their rationales), exploration and
    evaluation with their instruction turn, pairs against them by the official rule, cards saying so."""
    from huggingface_hub import hf_hub_download

    from etokit.data import read_jsonl
    from etokit.envs import make
    from etokit.run import Run, RunConfig
    from etokit.train.config import parse_config

    env = make("scienceworld")
    try:
        tasks = env.task_ids("train")[:2]
    finally:
        env.close()
    data_repo = f"{repo_name}-paper"
    publish(
        data_repo,
        {"data/sciworld_sft.json": sciworld_rows(tasks)},
        PAPER_README.replace("  - split: webshop\n    path: data/webshop_*\n", "").replace(
            "  - split: alfworld\n    path: data/alfworld_*\n", ""
        ),
    )
    cfg = parse_config(
        RunConfig,
        [
            "--env",
            "scienceworld",
            "--expert-data",
            data_repo,
            "--run-dir",
            str(tmp_path / "run"),
            "--push-to",
            repo_name,
            *TINY_RUN,
            # this test's sizes, after the tiny run's (the last value of a flag wins)
            "--train-tasks",
            "2",
            "--max-new-tokens",
            "8",
            "--explore-batch-size",
            "2",
        ],
    )
    run = Run(cfg)
    run.run()
    experts = read_jsonl(tmp_path / "run" / run.manifest.get("expert")["file"], "trajectory")
    assert [t.task_id for t in experts] == tasks and experts[0].messages[3]["content"].startswith("Thought: step 0")
    explored = read_jsonl(tmp_path / "run" / run.manifest.get("explore-1")["file"], "trajectory")
    assert {t.task_id for t in explored} == set(tasks)
    assert all(t.messages[0]["content"] == PAPER_INSTRUCTION["scienceworld"] for t in explored)
    evaluated = read_jsonl(tmp_path / "run" / run.manifest.get("eval-bc")["test-unseen"]["file"], "trajectory")
    assert all(t.messages[0]["content"] == PAPER_INSTRUCTION["scienceworld"] for t in evaluated)
    stats = run.manifest.get("pairs-1")["stats"]
    assert stats["win"] + stats["tie"] + stats["lose"] == 2 and stats["missing_expert"] == 0
    card = open(hf_hub_download(repo_name, "README.md", revision="bc")).read()
    assert "the expert data's" in card


def test_a_stated_expert_reward_is_written_in_the_dataset_card(paper_repo, hub, repo_name, tmp_path):
    from huggingface_hub import hf_hub_download
    from typer.testing import CliRunner

    from etokit.cli import app

    out = tmp_path / "webshop.jsonl"
    runner = CliRunner()
    done = runner.invoke(app, ["import-eto", f"{paper_repo}:webshop", "--expert-reward", "0.75", "--out", str(out)])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, ["push-expert", str(out), "--repo-id", f"{repo_name}-expert"])
    assert done.exit_code == 0, done.output
    card = open(hf_hub_download(f"{repo_name}-expert", "README.md", repo_type="dataset")).read()
    assert "3 rows had no reward in their source; their reward 0.75 was stated with `--expert-reward`" in card
