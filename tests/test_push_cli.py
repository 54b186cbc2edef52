"""`etokit push-*` end to end against the embedded Hub: what a user pushes is what
`datasets.load_dataset` gives back, iterations accumulate, the card lists them all."""

from __future__ import annotations

import json

import pytest
from tests.conftest import HF_TEST_TOKEN
from tests.factories import pair, trajectory, write_jsonl
from typer.testing import CliRunner

from etokit.cli import app
from etokit.data import from_dataset

runner = CliRunner()


def push(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def load(repo, config, split, revision=None):
    from datasets import load_dataset

    return load_dataset(repo, config, split=split, revision=revision, download_mode="force_redownload")


def card_text(repo, revision=None):
    from huggingface_hub import hf_hub_download

    return open(hf_hub_download(repo, "README.md", repo_type="dataset", revision=revision), encoding="utf-8").read()


def test_push_expert_round_trips_through_load_dataset(hub, repo_name, tmp_path):
    trajs = [trajectory(f"t{i}", reward=r, n_steps=2 + i % 3) for i, r in enumerate([1.0, 1.0, 0.5, 0.0, 1.0])]
    trajs[2].extra = {"game_file": "pick_and_place/trial_1"}
    src = tmp_path / "expert.jsonl"
    write_jsonl(src, trajs)

    result = push("push-expert", src, "--repo-id", repo_name)
    assert result.exit_code == 0, result.output
    assert "5 valid trajectory rows" in result.output

    ds = load(repo_name, "textworld-express", "train")
    assert from_dataset(ds, "trajectory") == trajs

    card = card_text(repo_name)
    for expected in (
        "# ETO expert trajectories",
        "- eto",
        "- agent",
        "- trajectory",
        "config_name: textworld-express",
        f'load_dataset("{repo_name}", "textworld-express", split="train")',
        "| textworld-express | train | 5 | 70.0 | 60.0% |",
    ):
        assert expected in card, expected
    assert HF_TEST_TOKEN not in card + result.output


def test_second_iteration_keeps_the_first_and_card_lists_both(hub, repo_name, tmp_path):
    it1 = [pair(f"t{i}", iteration=1) for i in range(4)]
    it2 = [pair(f"t{i}", iteration=2, outcome="win" if i == 0 else "lose") for i in range(3)]
    for p in it2:  # made by a deviating pair rule (etokit build-pairs --rewards stored)
        p.extra = {"pair_rule": {"rewards": "stored"}}
    write_jsonl(tmp_path / "p1.jsonl", it1)
    write_jsonl(tmp_path / "p2.jsonl", it2)

    assert push("push-pairs", tmp_path / "p1.jsonl", "--repo-id", repo_name, "--ties", 6).exit_code == 0
    r2 = push("push-pairs", tmp_path / "p2.jsonl", "--repo-id", repo_name)  # split defaults to iter_2
    assert r2.exit_code == 0, r2.output
    assert "split iter_2" in r2.output

    assert from_dataset(load(repo_name, "textworld-express", "iter_1"), "pair") == it1
    assert from_dataset(load(repo_name, "textworld-express", "iter_2"), "pair") == it2

    card = card_text(repo_name)
    assert "| textworld-express | iter_1 | 4 | 0 | 6 | 4 |" in card
    assert "| textworld-express | iter_2 | 3 | 1 | - | 2 |" in card
    made = card.split("## How it was made")[1]
    it1_text, it2_text = made.split("`textworld-express/iter_2`")
    assert "pair rule: the official `construct_preference.py`." in it1_text
    assert "pair rule: deviates from the official `construct_preference.py` with rewards=stored." in it2_text
    from huggingface_hub import hf_hub_download

    stats = json.load(open(hf_hub_download(repo_name, "etokit_stats.json", repo_type="dataset")))
    assert set(stats["textworld-express"]) == {"iter_1", "iter_2"}


def test_repeating_a_push_makes_no_new_commit(hub, repo_name, tmp_path):
    from huggingface_hub import HfApi

    write_jsonl(tmp_path / "p.jsonl", [pair(f"t{i}", iteration=1) for i in range(3)])
    assert push("push-pairs", tmp_path / "p.jsonl", "--repo-id", repo_name, "--ties", 2).exit_code == 0
    commits = HfApi().list_repo_commits(repo_name, repo_type="dataset")
    r = push("push-pairs", tmp_path / "p.jsonl", "--repo-id", repo_name, "--ties", 2)
    assert r.exit_code == 0, r.output
    assert HfApi().list_repo_commits(repo_name, repo_type="dataset") == commits


def test_repushing_an_earlier_split_makes_no_commit_and_changed_rows_are_pushed(hub, repo_name, tmp_path):
    """A re-run (after a crash or a lost response) must not commit again, even for a split that is
    not the last one pushed: datasets alone would re-commit its card with that split moved."""
    from huggingface_hub import HfApi

    for k in (1, 2):
        write_jsonl(tmp_path / f"p{k}.jsonl", [pair(f"t{k}{i}", iteration=k) for i in range(k + 1)])
        assert push("push-pairs", tmp_path / f"p{k}.jsonl", "--repo-id", repo_name).exit_code == 0
    commits = HfApi().list_repo_commits(repo_name, repo_type="dataset")
    r = push("push-pairs", tmp_path / "p1.jsonl", "--repo-id", repo_name)
    assert r.exit_code == 0, r.output
    assert HfApi().list_repo_commits(repo_name, repo_type="dataset") == commits

    changed = [pair("t10", iteration=1, outcome="win"), pair("t11", iteration=1)]
    write_jsonl(tmp_path / "p1.jsonl", changed)
    assert push("push-pairs", tmp_path / "p1.jsonl", "--repo-id", repo_name).exit_code == 0
    assert from_dataset(load(repo_name, "textworld-express", "iter_1"), "pair") == changed
    assert len(HfApi().list_repo_commits(repo_name, repo_type="dataset")) == len(commits) + 2


def test_push_to_a_revision_leaves_main_alone(hub, repo_name, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [trajectory("a", 1.0, source="explore")])
    write_jsonl(tmp_path / "b.jsonl", [trajectory("b", 0.0, source="explore"), trajectory("c", 1.0, source="explore")])
    assert push("push-explore", tmp_path / "a.jsonl", "--repo-id", repo_name, "--split", "iter_1").exit_code == 0
    r = push("push-explore", tmp_path / "b.jsonl", "--repo-id", repo_name, "--split", "iter_1", "--revision", "dev")
    assert r.exit_code == 0, r.output
    assert 'revision="dev"' in r.output
    assert [t.task_id for t in from_dataset(load(repo_name, "textworld-express", "iter_1", "dev"), "trajectory")] == [
        "b",
        "c",
    ]
    assert [t.task_id for t in from_dataset(load(repo_name, "textworld-express", "iter_1"), "trajectory")] == ["a"]
    assert "# ETO exploration trajectories" in card_text(repo_name, "dev")


def test_push_official_eto_sft_file(hub, repo_name, tmp_path):
    rows = [
        {
            "id": i,
            "conversations": [
                {"from": "human", "value": "Instruction"},
                {"from": "gpt", "value": "OK"},
                {"from": "human", "value": f"Buy item {i}"},
                {"from": "gpt", "value": "Thought: search.\nAction: search[item]"},
            ],
            "reward": 0.5 + 0.25 * i,
            "source": "human",
        }
        for i in range(2)
    ]
    src = tmp_path / "webshop_sft.json"
    src.write_text(json.dumps(rows))
    r = push("push-expert", src, "--repo-id", repo_name, "--env", "webshop")
    assert r.exit_code == 0, r.output
    got = from_dataset(load(repo_name, "webshop", "train"), "trajectory")
    assert [t.reward for t in got] == [0.5, 0.75]
    from etokit.data.eto_format import trajectory_to_eto

    assert [trajectory_to_eto(t) for t in got] == rows


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--split", "iter-1"], "use 'iter_1'"),
        (["--config-name", "bad name!"], "--config-name"),
    ],
)
def test_bad_names_fail_before_anything_is_pushed(hub, repo_name, tmp_path, args, expected):
    from huggingface_hub import HfApi

    write_jsonl(tmp_path / "x.jsonl", [trajectory("x", 1.0)])
    r = push("push-expert", tmp_path / "x.jsonl", "--repo-id", repo_name, *args)
    assert r.exit_code == 2
    assert expected in r.output
    assert not HfApi().repo_exists(repo_name, repo_type="dataset")


def test_invalid_file_or_kind_is_refused_with_its_location(hub, repo_name, tmp_path):
    from huggingface_hub import HfApi

    bad = tmp_path / "bad.jsonl"
    good_row = trajectory("ok", 1.0).to_row()
    bad_row = trajectory("broken", 1.0).to_row() | {"reward": 1.5}
    bad.write_text(json.dumps(good_row) + "\n" + json.dumps(bad_row) + "\n")
    r = push("push-expert", bad, "--repo-id", repo_name)
    assert r.exit_code == 2
    assert "row 1" in r.output and "reward" in r.output

    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [pair("p")])
    r = push("push-expert", pairs, "--repo-id", repo_name)
    assert r.exit_code == 2 and "pair" in r.output

    r = push("push-pairs", pairs, "--repo-id", "not/a/valid/repo")
    assert r.exit_code == 2 and "--repo-id" in r.output
    assert not HfApi().repo_exists(repo_name, repo_type="dataset")


def test_help_shows_examples():
    for cmd in ("push-expert", "push-explore", "push-pairs"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0
        assert "Examples" in r.output and f"etokit {cmd}" in r.output


def test_a_split_is_published_only_with_its_rows_its_card_and_its_stats_entry(hub, repo_name, tmp_path):
    """`etokit push-*` and `etokit run` (which re-pushes whatever a crash left unrecorded) ask the Hub
    one question, etokit.hub.publish.on_hub: the same rows, the split in the card's configs and our
    stats entry. Rows without the entry (a crash before the card commit) or rows and entry without
    the card's config (a card edited since) are not published: the push completes what is missing."""
    from huggingface_hub import CommitOperationAdd, DatasetCard, DatasetCardData, HfApi, hf_hub_download

    from etokit.data import load_records, to_dataset
    from etokit.hub.publish import STATS_FILE, _split_entry, on_hub
    from etokit.run import Run, RunConfig

    env = "textworld-express"
    api = HfApi()
    path = tmp_path / "expert.jsonl"
    write_jsonl(path, [trajectory(f"t{i}", reward=1.0, n_steps=2) for i in range(3)])
    records = load_records(path, "trajectory")
    run = Run(RunConfig(run_dir=str(tmp_path / "run"), push_to=repo_name, env=env))
    repo = run.cfg.datasets["expert"]

    def state():
        return on_hub(
            api, repo, "main", env, "train", to_dataset(records.records), _split_entry(records, "expert", None)
        )

    def read(filename):
        return open(hf_hub_download(repo, filename, repo_type="dataset"), encoding="utf-8").read()

    def replace(filename, text):
        api.create_commit(
            repo, [CommitOperationAdd(filename, text.encode())], commit_message=f"edit {filename}", repo_type="dataset"
        )

    first = run.push("expert", path, "train")
    assert state().published and state().head == first["card_commit"]
    commits = api.list_repo_commits(repo, repo_type="dataset")
    repeat = run.push("expert", path, "train")  # published: nothing committed, the head recorded
    assert repeat["data_commit"] == repeat["card_commit"] == first["card_commit"]
    assert api.list_repo_commits(repo, repo_type="dataset") == commits

    # The rows, not the stats entry: the push makes the card commit only.
    stats = json.loads(read(STATS_FILE))
    del stats[env]["train"]
    replace(STATS_FILE, json.dumps(stats))
    broken = state()
    assert broken.rows and not broken.card and not broken.published
    again = run.push("expert", path, "train")
    assert again["data_commit"] == broken.head != again["card_commit"]
    assert state().published

    # The rows and the stats entry, the split gone from the card's configs: pushed again.
    card = DatasetCard(read("README.md"))
    meta = card.data.to_dict()
    meta["configs"] = [c for c in meta["configs"] if c["config_name"] != env]
    card.data = DatasetCardData(**meta)
    replace("README.md", str(card))
    broken = state()
    assert broken.card and not broken.rows and not broken.published
    third = run.push("expert", path, "train")
    assert third["data_commit"] != broken.head and state().published
    assert from_dataset(load(repo, env, "train"), "trajectory") == records.records
