"""push_checkpoint against the embedded Hub: branch + tag, idempotent, loadable, a full card."""

from __future__ import annotations

import shutil

import pytest
import torch

from etokit.hub.checkpoint import push_checkpoint, render_model_card
from etokit.models.init_model import build_tiny_model

from tests.conftest import HF_TEST_TOKEN
from tests.factories import trajectory

CARD = {
    "stage": "dpo",
    "iteration": 1,
    "base_model": "etokit-tests/agent-bc",
    "base_model_revision": "bc",
    "datasets": [
        {"repo": "etokit-tests/eto-pairs", "config": "textworld-express", "split": "iter_1", "revision": "abc1234"},
        {"repo": "pairs.jsonl", "local": True},
    ],
    "hyperparameters": {
        "beta": 0.1,
        "learning_rate": 1e-6,
        "num_epochs": 3,
        "hub_token": HF_TEST_TOKEN,
        "output_dir": f"/runs/{HF_TEST_TOKEN}/iter-1",
    },
    "eval": [{"env": "textworld-express", "split": "test", "avg_reward": 0.62, "success_rate": 0.5}],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    texts = [m["content"] for i in range(20) for m in trajectory(f"t{i}", 1.0, seed=i).messages]
    build_tiny_model(texts, folder, vocab_size=350)
    # Training state lives next to the model but is not published.
    (folder / "checkpoints" / "step-2").mkdir(parents=True)
    (folder / "checkpoints" / "step-2" / "optimizer.bin").write_bytes(b"state")
    return folder


def test_push_twice_is_one_commit_and_loads_by_revision(hub, repo_name, checkpoint):
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM, AutoTokenizer

    api = HfApi()
    sha = push_checkpoint(checkpoint, repo_name, "iter-1", card=CARD)
    commits = api.list_repo_commits(repo_name, revision="iter-1")
    assert commits[0].commit_id == sha

    again = push_checkpoint(checkpoint, repo_name, "iter-1", card=CARD)
    assert again == sha
    assert len(api.list_repo_commits(repo_name, revision="iter-1")) == len(commits)

    refs = api.list_repo_refs(repo_name)
    assert {b.name: b.target_commit for b in refs.branches}["iter-1"] == sha
    assert {t.name: t.target_commit for t in refs.tags}["iter-1"] == sha

    files = set(api.list_repo_files(repo_name, revision="iter-1"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
    assert not any(f.startswith("checkpoints/") for f in files)

    local = AutoModelForCausalLM.from_pretrained(checkpoint)
    remote = AutoModelForCausalLM.from_pretrained(repo_name, revision="iter-1")
    for name, p in local.state_dict().items():
        assert torch.equal(p, remote.state_dict()[name]), name
    assert AutoTokenizer.from_pretrained(repo_name, revision="iter-1").chat_template


def test_card_edit_on_branch_leaves_tag_and_new_weights_move_it(hub, repo_name, checkpoint, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi()
    first = push_checkpoint(checkpoint, repo_name, "iter-1", card=CARD)
    # A later card edit (new eval numbers) lands on the branch; the tag still pins the weights.
    edited = push_checkpoint(checkpoint, repo_name, "iter-1", card={**CARD, "eval": [{"avg_reward": 0.7}]})
    assert edited != first
    tags = {t.name: t.target_commit for t in api.list_repo_refs(repo_name).tags}
    assert tags["iter-1"] == edited  # the push that made the commit tags it last...

    # ...but a card-only commit made with the Hub API directly leaves the tag where it was.
    api.upload_file(path_or_fileobj=b"# edited\n", path_in_repo="README.md", repo_id=repo_name, revision="iter-1")
    assert {t.name: t.target_commit for t in api.list_repo_refs(repo_name).tags}["iter-1"] == edited

    # A re-push with different weights: stale files are removed and the tag follows the weights.
    changed = tmp_path / "changed"
    shutil.copytree(checkpoint, changed)
    (changed / "generation_config.json").unlink()
    moved = push_checkpoint(changed, repo_name, "iter-1", card=CARD)
    assert "generation_config.json" not in api.list_repo_files(repo_name, revision="iter-1")
    assert {t.name: t.target_commit for t in api.list_repo_refs(repo_name).tags}["iter-1"] == moved


def test_model_card_contents(hub, repo_name, checkpoint):
    from huggingface_hub import hf_hub_download

    push_checkpoint(checkpoint, repo_name, "iter-1", card=CARD)
    card = open(hf_hub_download(repo_name, "README.md", revision="iter-1")).read()
    assert card == render_model_card(repo_name, "iter-1", CARD)
    assert card.startswith("---\n") and "base_model: etokit-tests/agent-bc" in card
    assert "library_name: transformers" in card
    assert "`etokit-tests/agent-bc` at revision `bc`" in card
    assert "etokit-tests/eto-pairs" in card and "`abc1234`" in card and "iter_1" in card
    assert "pairs.jsonl (local file)" in card
    assert "| `beta` | `0.1` |" in card and "| `learning_rate` | `1e-06` |" in card
    assert "| env | split | avg_reward | success_rate |" in card
    assert "| textworld-express | test | 0.62 | 0.5 |" in card
    assert f'AutoModelForCausalLM.from_pretrained("{repo_name}", revision="iter-1")' in card
    assert HF_TEST_TOKEN not in card and "hub_token" not in card


def test_card_without_eval_has_no_eval_section():
    card = render_model_card("ns/name", "bc", {"base_model": "ns/base", "hyperparameters": {"learning_rate": 2e-5}})
    assert "## Evaluation" not in card and "## How to load" in card
