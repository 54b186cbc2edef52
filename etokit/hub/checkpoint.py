"""Publish a trained checkpoint as a versioned revision of a Hub model repo.

Each ETO stage (BC, then DPO iteration K) is pushed to the same repo under its own revision name
(``bc``, ``iter-1``, ...), as both a branch and a tag. The branch holds the files and may get
later edits (a card with new eval numbers); the tag, created last, pins the commit whose weights
were trained, so ``from_pretrained(repo, revision="iter-1")`` keeps meaning the same weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from etokit.errors import EtokitError

logger = logging.getLogger(__name__)

CARD_TEMPLATE = Path(__file__).resolve().parents[2] / "model_cards" / "model.md.j2"
# Files the Hub creates itself and that a checkpoint folder never has.
_HUB_OWNED = {".gitattributes"}
# Training state (optimizer moments, RNG states) is for resuming a run, not part of a release.
_LOCAL_ONLY = ("checkpoints",)


def push_checkpoint(folder, repo_id, revision, *, card: dict, commit_message=None, private=False) -> str:
    """Upload ``folder`` with a rendered model card to branch ``revision`` of ``repo_id`` and tag it.

    Returns the commit sha that the branch and the tag point to. Pushing the same folder again
    creates no commit and keeps the tag. ``card`` keys: base_model, base_model_revision, datasets
    (list of {repo, revision, config, split, local}), hyperparameters (dict), eval (list of row
    dicts), stage, iteration, description, license, tags.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise EtokitError(f"checkpoint folder {folder} does not exist")
    if "/" not in repo_id:
        raise EtokitError(f"--push-to must be NAMESPACE/NAME, got {repo_id!r}")
    if revision in ("", "main"):
        raise EtokitError(f"--revision must name this checkpoint (e.g. iter-1), got {revision!r}")

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.create_branch(repo_id, branch=revision, exist_ok=True)

    readme = render_model_card(repo_id, revision, card).encode()
    local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    local = [p for p in local if p != "README.md" and p.split("/")[0] not in _LOCAL_ONLY
             and not any(part.startswith(".") for part in p.split("/"))]
    operations: list = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in local]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme))
    # The branch mirrors the folder: files from an earlier push of this revision that are gone now
    # (an old shard) would otherwise load alongside the new ones.
    remote = set(api.list_repo_files(repo_id, revision=revision))
    stale = sorted(remote - set(local) - {"README.md"} - _HUB_OWNED)
    operations += [CommitOperationDelete(path_in_repo=p) for p in stale]

    # The Hub drops files whose content it already has at the branch head; if nothing is left,
    # no commit is made and the head's sha comes back.
    info = api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message or f"Upload {revision}",
        revision=revision,
    )
    sha = info.oid
    _tag(api, repo_id, revision, sha)
    return sha


def _tag(api, repo_id: str, tag: str, sha: str) -> None:
    refs = api.list_repo_refs(repo_id)
    existing = {t.name: t.target_commit for t in refs.tags}
    if existing.get(tag) == sha:
        return
    if tag in existing:
        # A re-push with different weights: the tag must follow, or revision=tag and the branch
        # of the same name would resolve to different weights.
        logger.warning("moving tag %s of %s from %s to %s", tag, repo_id, existing[tag], sha)
        api.delete_tag(repo_id, tag=tag)
    api.create_tag(repo_id, tag=tag, revision=sha, tag_message=f"etokit checkpoint {tag}")


def render_model_card(repo_id: str, revision: str, card: dict[str, Any]) -> str:
    """The README.md of a checkpoint: YAML metadata, base model, data, hyperparameters, eval, usage."""
    from huggingface_hub import constants

    from etokit.train.config import redact

    card = redact(dict(card))
    datasets = [{"config": None, "split": None, "revision": None, "local": False,
                 **(d if isinstance(d, dict) else {"repo": str(d)})} for d in card.get("datasets") or []]
    eval_rows = card.get("eval") or []
    columns: list[str] = []
    for row in eval_rows:
        columns += [c for c in row if c not in columns]
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": card.get("license"),
        "base_model": card.get("base_model"),
        "datasets": [d["repo"] for d in datasets if not d.get("local")] or None,
        "tags": ["etokit", "eto", "agent", *(card.get("tags") or [])],
    }
    metadata = {k: v for k, v in metadata.items() if v}
    env = Environment(loader=FileSystemLoader(CARD_TEMPLATE.parent), undefined=StrictUndefined, keep_trailing_newline=True)
    text = env.get_template(CARD_TEMPLATE.name).render(
        metadata_yaml=yaml.safe_dump(metadata, sort_keys=False),
        repo_id=repo_id,
        revision=revision,
        description=card.get("description") or "An LLM agent trained on multi-turn agent trajectories.",
        stage=card.get("stage"),
        iteration=card.get("iteration"),
        base_model=card.get("base_model"),
        base_model_revision=card.get("base_model_revision"),
        datasets=datasets,
        endpoint=constants.ENDPOINT,
        hyperparameters=card.get("hyperparameters") or {},
        eval=eval_rows,
        eval_columns=columns,
    )
    # Collapse the blank lines that Jinja's block tags leave behind.
    lines, blank = [], False
    for line in text.splitlines():
        if not line.strip():
            if not blank:
                lines.append("")
            blank = True
        else:
            lines.append(line)
            blank = False
    return "\n".join(lines).strip() + "\n"
