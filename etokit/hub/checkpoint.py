"""Publish a trained checkpoint as a versioned revision of a Hub model repo.

Each ETO stage (BC, then DPO iteration K) is pushed to the same repo under its own revision name
(``bc``, ``iter-1``, ...), as both a branch and a tag. The branch holds the files and may get
later edits (a card with new eval numbers); the tag, created last, pins the commit whose weights
were trained, so ``from_pretrained(repo, revision="iter-1")`` keeps meaning the same weights.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Iterable

import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from etokit.errors import EtokitError
from etokit.faults import faultpoint

logger = logging.getLogger(__name__)

CARD_TEMPLATE = "model.md.j2"  # in model_cards/ (etokit.hub.cards.template_dir)
# Files the Hub creates itself and that a checkpoint folder never has.
_HUB_OWNED = {".gitattributes"}
# Training state (optimizer moments, RNG states) is for resuming a run, not part of a release.
_LOCAL_ONLY = ("checkpoints",)


def push_checkpoint(folder, repo_id, revision, *, card: dict, commit_message=None, private=False) -> str:
    """Upload ``folder`` with a rendered model card to branch ``revision`` of ``repo_id`` and tag it.

    Returns the commit sha that the branch and the tag point to. Pushing the same folder again
    creates no commit and keeps the tag. ``card`` keys: base_model, base_model_revision, datasets
    (list of {repo, revision, config, split, local}), hyperparameters (dict), eval (list of row
    dicts), eval_note (a line under the eval table: what its numbers are), stage, iteration,
    description, license, tags, plots (list of {title, path}: images in the folder), eval_results
    (huggingface_hub ``EvalResult`` fields: the card's ``model-index``).

    Order, so that a failure at any point leaves nothing misleading: commit to the branch (one
    atomic commit on top of the head it read), check that the commit holds exactly this checkpoint,
    and only then point the tag at it. A transient failure re-runs the push from the start; a
    commit whose response was lost is then found already there and not made twice.
    """
    from huggingface_hub import HfApi

    from etokit.hub import retry
    from etokit.hub.publish import _hub_errors

    folder = Path(folder)
    if not folder.is_dir():
        raise EtokitError(f"checkpoint folder {folder} does not exist")
    if "/" not in repo_id:
        raise EtokitError(f"--push-to must be NAMESPACE/NAME, got {repo_id!r}")
    if revision in ("", "main"):
        raise EtokitError(f"--revision must name this checkpoint (e.g. iter-1), got {revision!r}")
    from etokit.data.names import check_repo_id, check_revision

    check_repo_id(repo_id, "--push-to")
    check_revision(revision, "--revision")

    retry.install()
    api = HfApi()
    readme = render_model_card(repo_id, revision, card).encode()
    local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    local = [
        p
        for p in local
        if p != "README.md"
        and p.split("/")[0] not in _LOCAL_ONLY
        and not any(part.startswith(".") for part in p.split("/"))
    ]
    expected = {p: _Expected.of_file(folder / p) for p in local} | {"README.md": _Expected.of_bytes(readme)}
    what = f"push of {folder} to '{repo_id}' revision '{revision}'"

    def attempt() -> str:
        retry.run(
            lambda: api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True),
            what=f"creating model '{repo_id}'",
        )
        retry.run(
            lambda: api.create_branch(repo_id, branch=revision, exist_ok=True),
            what=f"creating branch '{revision}' of '{repo_id}'",
        )
        head = api.model_info(repo_id, revision=revision).sha
        sha = _commit(api, repo_id, revision, head, folder, local, readme, commit_message or f"Upload {revision}")
        faultpoint("hub.checkpoint.before-tag")  # crash tests (etokit/faults.py): committed, not yet tagged
        _verify(api, repo_id, revision, sha, expected)
        _tag(api, repo_id, revision, sha)
        return sha

    with _hub_errors(repo_id):
        return retry.run(attempt, what=what)


def _commit(api, repo_id, revision, head, folder, local, readme, message) -> str:
    """One commit on top of ``head`` making branch ``revision`` mirror the folder; the head itself if
    it already does (the Hub drops files whose content it already has, and with nothing left makes no
    commit). ``parent_commit``: if the branch moved since ``head`` was read, 412, and the push re-runs."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    operations: list = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in local]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme))
    # The branch mirrors the folder: files from an earlier push of this revision that are gone now
    # (an old shard) would otherwise load alongside the new ones.
    remote = set(api.list_repo_files(repo_id, revision=head))
    stale = sorted(remote - set(local) - {"README.md"} - _HUB_OWNED)
    operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
    info = api.create_commit(
        repo_id, operations=operations, commit_message=message, revision=revision, parent_commit=head
    )
    return info.oid


class _Expected(tuple):
    """(size, sha256, git blob sha1 or None): what the Hub must hold for one file. The Hub reports
    an LFS file's sha256 and a regular file's git blob sha1 (only files under 10 MB are regular)."""

    @classmethod
    def of_bytes(cls, data: bytes) -> "_Expected":
        return cls((len(data), hashlib.sha256(data).hexdigest(), _git_sha1(data)))

    @classmethod
    def of_file(cls, path: Path) -> "_Expected":
        size = path.stat().st_size
        if size < 10 * 1024 * 1024:
            return cls.of_bytes(path.read_bytes())
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return cls((size, digest.hexdigest(), None))


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _verify(api, repo_id: str, revision: str, sha: str, expected: dict[str, _Expected]) -> None:
    """Before the tag moves: commit ``sha`` holds exactly the checkpoint's files, byte for byte.
    A mismatch (a concurrent push of the same revision) re-runs the push, which commits a fix."""
    from huggingface_hub.hf_api import RepoFile

    from etokit.hub import retry

    remote = {e.path: e for e in api.list_repo_tree(repo_id, revision=sha, recursive=True) if isinstance(e, RepoFile)}
    problems = sorted(set(expected) - set(remote)) + sorted(set(remote) - set(expected) - _HUB_OWNED)
    for path, (size, sha256, sha1) in expected.items():
        entry = remote.get(path)
        if entry is None:
            continue
        same = entry.lfs.sha256 == sha256 if entry.lfs is not None else entry.blob_id == sha1
        if entry.size != size or not same:
            problems.append(path)
    if problems:
        raise retry.Transient(f"commit {sha[:8]} on {revision} does not hold the checkpoint: {', '.join(problems[:5])}")


def _tag(api, repo_id: str, tag: str, sha: str) -> None:
    """Point ``tag`` at ``sha`` (create, or move it off an older commit). Re-run from the read of the
    refs after a transient failure, so a delete or create whose response was lost is not repeated."""
    from huggingface_hub.errors import HfHubHTTPError

    from etokit.hub import retry

    def step() -> None:
        existing = {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags}
        if existing.get(tag) == sha:
            return
        try:
            if tag in existing:
                # A re-push with different weights: the tag must follow, or revision=tag and the
                # branch of the same name would resolve to different weights.
                logger.warning("moving tag %s of %s from %s to %s", tag, repo_id, existing[tag], sha)
                api.delete_tag(repo_id, tag=tag)
            api.create_tag(repo_id, tag=tag, revision=sha, tag_message=f"etokit checkpoint {tag}")
        except HfHubHTTPError as e:
            if retry.status_of(e) in (404, 409):  # the tag changed under us (a concurrent push): read again
                raise retry.Transient(f"tag {tag} of {repo_id} changed while it was being moved") from e
            raise

    retry.run(step, what=f"tagging {sha[:8]} as '{tag}' in '{repo_id}'")


def card_datasets(entries: Iterable[tuple[str, str | None, str | None, str | None]]) -> list[dict]:
    """Model-card data rows from (source, config, split, revision); local files are marked local."""
    return [
        {"repo": src, "config": cfg, "split": split, "revision": rev, "local": Path(src).exists()}
        for src, cfg, split, rev in entries
    ]


def render_model_card(repo_id: str, revision: str, card: dict[str, Any]) -> str:
    """The README.md of a checkpoint: YAML metadata, base model, data, hyperparameters, eval, usage."""
    from huggingface_hub import constants

    from etokit.train.config import redact

    card = redact(dict(card))
    datasets = [
        {
            "config": None,
            "split": None,
            "revision": None,
            "local": False,
            **(d if isinstance(d, dict) else {"repo": str(d)}),
        }
        for d in card.get("datasets") or []
    ]
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
    if card.get("eval_results"):
        # The Hub shows `model-index` as the model's evaluation results; huggingface_hub builds and
        # checks it (every entry needs a task, a dataset and a metric).
        from huggingface_hub import EvalResult, ModelCardData

        data = ModelCardData(
            model_name=f"{repo_id}@{revision}", eval_results=[EvalResult(**r) for r in card["eval_results"]]
        ).to_dict()
        metadata["model-index"] = data["model-index"]
    from etokit.hub.cards import template_dir

    env = Environment(
        loader=FileSystemLoader(template_dir("model_cards")), undefined=StrictUndefined, keep_trailing_newline=True
    )
    text = env.get_template(CARD_TEMPLATE).render(
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
        eval_note=card.get("eval_note"),
        plots=card.get("plots") or [],
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
