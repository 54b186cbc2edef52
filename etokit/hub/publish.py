"""Publish expert, exploration and pair datasets to the Hub.

The data goes through `datasets.Dataset.push_to_hub` (one config per environment, one split per
ETO iteration), so `datasets.load_dataset(repo, config, split=...)` reads it back. Then one more
commit regenerates README.md from `data_cards/` and `etokit_stats.json`, the per-split statistics
and provenance the card is rendered from, so each push lists every config and split pushed so far.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from etokit import __version__
from etokit.data import Records, pair_stats, to_dataset, trajectory_stats
from etokit.data.names import check_revision
from etokit.errors import EtokitError
from etokit.faults import faultpoint
from etokit.hub.cards import render

STATS_FILE = "etokit_stats.json"
CARDS = {  # what each push command publishes: record kind, card template, default split
    "expert": ("trajectory", "expert.md.j2", "train"),
    "explore": ("trajectory", "exploration.md.j2", "train"),
    "pairs": ("pair", "pairs.md.j2", "train"),
}
# datasets only accepts split names matching this (so `iter_1`, never `iter-1`).
_SPLIT_RE = re.compile(r"^\w+(\.\w+)*$")
_CONFIG_RE = re.compile(r"^[\w][\w.-]*$")
_CARD_RETRIES = 3


@dataclass
class PushResult:
    repo_id: str
    config_name: str
    split: str
    revision: str
    rows: int
    data_commit: str
    card_commit: str | None


def push_dataset(
    records: Records,
    repo_id: str,
    *,
    card: str,
    config_name: str | None = None,
    split: str | None = None,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    license: str = "apache-2.0",
    ties: int | None = None,
) -> PushResult:
    """Push `records` as `config_name`/`split` of the dataset repo `repo_id`, then refresh its card."""
    kind, template, default_split = CARDS[card]
    if records.kind != kind:
        raise EtokitError(f"{records.path}: holds {records.kind} rows, but push-{card} publishes {kind} rows")
    _check_repo_id(repo_id)
    if revision is not None:
        check_revision(revision, "--revision")
    config_name = config_name or _single_env(records)
    split = split or _default_split(records, default_split)
    _check_names(config_name, split)

    from huggingface_hub import HfApi

    from etokit.hub import retry

    retry.install()
    api = HfApi()
    branch = revision or "main"
    dataset = to_dataset(records.records)
    entry = _split_entry(records, card, ties)
    message = commit_message or f"etokit push-{card}: {config_name}/{split} ({len(dataset)} rows)"

    def attempt() -> tuple[str, str | None]:
        # Re-run from here after any transient failure. Each step converges: the repo and branch
        # are created only if missing, and push_to_hub / the card commit leave out files the Hub
        # already has, so a step whose response was lost adds no second commit when re-run.
        _ensure_repo(api, repo_id, branch, private)
        there = on_hub(api, repo_id, branch, config_name, split, dataset, entry)
        if there.published:  # a re-push, or a resumed run whose push was not recorded: nothing to commit
            return there.head, there.head
        data_commit = there.head if there.rows else None
        if data_commit is None:
            data_commit = dataset.push_to_hub(
                repo_id,
                config_name=config_name,
                split=split,
                revision=revision,
                private=private,
                commit_message=message,
            ).oid
        faultpoint("hub.dataset.before-card")  # crash tests (etokit/faults.py): data committed, card not yet
        card_commit = _refresh_card(
            api, repo_id, branch, data_commit, card, template, license, config_name, split, entry
        )
        return data_commit, card_commit

    with _hub_errors(repo_id):
        data_oid, card_oid = retry.run(attempt, what=f"push of {config_name}/{split} to dataset '{repo_id}' ({branch})")
    return PushResult(repo_id, config_name, split, branch, len(dataset), data_oid, card_oid)


def _ensure_repo(api, repo_id: str, branch: str, private: bool) -> None:
    from etokit.hub import retry

    # Creating what exists is a 409 that exist_ok accepts: safe to retry after a lost response.
    retry.run(
        lambda: api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True),
        what=f"creating dataset '{repo_id}'",
    )
    if branch != "main":
        retry.run(
            lambda: api.create_branch(repo_id, branch=branch, repo_type="dataset", exist_ok=True),
            what=f"creating branch '{branch}' of dataset '{repo_id}'",
        )


@dataclass
class OnHub:
    """What the head of a dataset branch already holds of one split (:func:`on_hub`)."""

    head: str
    rows: bool  # its Parquet shards hold exactly these rows, and the card's configs / dataset_info list it
    card: bool  # etokit_stats.json holds the split's entry as this push would write it

    @property
    def published(self) -> bool:
        """The split is on the Hub, card included: pushing it again would commit nothing."""
        return self.rows and self.card


def on_hub(api, repo_id: str, branch: str, config_name: str, split: str, dataset, entry: dict[str, Any]) -> OnHub:
    """Is this split already on the Hub? The one check of every push (`etokit push-*` and `etokit
    run`'s, which re-pushes after a crash whatever it had not recorded).

    ``rows``: the same rows in the split's Parquet shards, and the split in the card's ``configs`` and
    ``dataset_info``. push_to_hub is then skipped: run again for an existing split it is not a no-op
    (datasets moves the split to the end of ``dataset_info``, a commit that only reorders YAML), which
    would make a re-run after a lost response, or a re-push, add a second commit. ``card``: our entry
    in ``etokit_stats.json`` (which the card is rendered from); without it the data was pushed but
    its card commit was not made (a crash in between), and the push completes it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import DatasetCard

    head = api.dataset_info(repo_id, revision=branch).sha
    stats = json.loads(_read(api, repo_id, STATS_FILE, head) or "{}")
    card = stats.get(config_name, {}).get(split) == json.loads(json.dumps(entry))
    shard = re.compile(rf"^{re.escape(config_name)}/{re.escape(split)}-(\d{{5}})-of-(\d{{5}})\.parquet$")
    shards = sorted(p for p in api.list_repo_files(repo_id, repo_type="dataset", revision=head) if shard.match(p))
    if not shards or [shard.match(p).groups() for p in shards] != [
        (f"{i:05d}", f"{len(shards):05d}") for i in range(len(shards))
    ]:
        return OnHub(head, False, card)
    meta = DatasetCard(_read(api, repo_id, "README.md", head) or "").data.to_dict()
    files = next((c.get("data_files") for c in meta.get("configs") or [] if c.get("config_name") == config_name), None)
    if not isinstance(files, list) or {"split": split, "path": f"{config_name}/{split}-*"} not in files:
        return OnHub(head, False, card)
    infos = meta.get("dataset_info")
    infos = [infos] if isinstance(infos, dict) else infos or []
    info = next((i for i in infos if i.get("config_name", "default") == config_name), {})
    if not any(s.get("name") == split and s.get("num_examples") == len(dataset) for s in info.get("splits") or []):
        return OnHub(head, False, card)
    remote = pa.concat_tables(
        [pq.read_table(api.hf_hub_download(repo_id, p, repo_type="dataset", revision=head)) for p in shards]
    )
    local = dataset.data.table
    same = remote.schema.remove_metadata() == local.schema.remove_metadata() and remote.equals(
        local, check_metadata=False
    )
    return OnHub(head, same, card)


def _split_entry(records: Records, card: str, ties: int | None) -> dict[str, Any]:
    recs = records.records
    stats = pair_stats(recs, ties=ties) if card == "pairs" else trajectory_stats(recs)
    distinct = lambda attr: sorted({str(v) for r in recs if (v := getattr(r, attr)) is not None})  # noqa: E731
    provenance = {"envs": distinct("env"), "source_file": records.path.name, "source_format": records.format}
    if card == "pairs":
        # Deviations from construct_preference.py's rule (etokit.pairs.PairRule) that made these pairs.
        rules = {tuple(sorted((r.extra.get("pair_rule") or {}).items())) for r in recs}
        provenance |= {
            "modes": distinct("mode"),
            "iterations": distinct("iteration"),
            "rule_deviations": sorted(f"{k}={v}" for rule in rules for k, v in rule),
        }
    else:
        provenance |= {
            "sources": distinct("source"),
            "models": distinct("model"),
            "model_revisions": distinct("model_revision"),
            "seeds": distinct("seed"),
        }
    return {"card": card, "stats": stats, "provenance": provenance, "etokit_version": __version__}


def _refresh_card(api, repo_id, branch, parent, card, template, license, config_name, split, entry) -> str | None:
    """Commit README.md + etokit_stats.json on top of `parent`. A concurrent push that moved the
    branch in between makes the commit fail with 412; re-read and retry on the new head (past
    _CARD_RETRIES, the 412 goes up and the whole push is re-run). Files whose content the Hub
    already has are left out of the commit, so a card that is up to date makes no commit."""
    from huggingface_hub import CommitOperationAdd, DatasetCard
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(_CARD_RETRIES):
        all_stats = json.loads(_read(api, repo_id, STATS_FILE, parent) or "{}")
        all_stats.setdefault(config_name, {})[split] = entry
        readme = DatasetCard(_read(api, repo_id, "README.md", parent) or "")
        existing = readme.data.to_dict()  # keeps the `configs` / `dataset_info` datasets wrote
        ours = {
            "license": existing.get("license") or license,
            "language": existing.get("language") or ["en"],
            "task_categories": sorted(set(existing.get("task_categories") or []) | {"text-generation"}),
            "tags": sorted(
                set(existing.get("tags") or []) | {"eto", "agent", "trajectory", *entry["provenance"]["envs"]}
            ),
        }
        # A fixed key order, so re-pushing the same data renders the same README (no new commit).
        metadata = ours | {k: existing[k] for k in sorted(existing) if k not in ours}
        body = render("data_cards", template, repo_id=repo_id, configs=all_stats, card=card, version=__version__)
        content = DatasetCard(f"---\n{_yaml(metadata)}---\n{body}").content
        ops = [
            CommitOperationAdd("README.md", content.encode()),
            CommitOperationAdd(STATS_FILE, (json.dumps(all_stats, indent=2, sort_keys=True) + "\n").encode()),
        ]
        try:
            commit = api.create_commit(
                repo_id,
                ops,
                commit_message=f"Update dataset card ({config_name}/{split})",
                repo_type="dataset",
                revision=branch,
                parent_commit=parent,
            )
            return commit.oid
        except HfHubHTTPError as e:
            if e.response is None or e.response.status_code != 412 or attempt == _CARD_RETRIES - 1:
                raise
            parent = api.dataset_info(repo_id, revision=branch).sha
    return None


def _read(api, repo_id: str, filename: str, revision: str) -> str | None:
    """A text file of the dataset repo at `revision` (a commit sha), or None if it has none."""
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        path = api.hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision)
    except RemoteEntryNotFoundError:
        # Only the Hub saying "no such file" means there is none. Its sibling LocalEntryNotFoundError
        # ("cannot reach the Hub") must not read as "no stats yet": the card would be re-rendered
        # without every earlier split.
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _yaml(metadata: dict) -> str:
    import yaml

    return yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)


def _single_env(records: Records) -> str:
    envs = sorted({r.env for r in records.records})
    if len(envs) != 1:
        raise EtokitError(
            f"{records.path}: rows come from several environments ({', '.join(envs)}); pass --config-name"
        )
    return envs[0]


def _default_split(records: Records, fallback: str) -> str:
    iterations = {getattr(r, "iteration", None) for r in records.records}
    if len(iterations) == 1 and (it := iterations.pop()) is not None:
        return f"iter_{it}"
    return fallback


def _check_names(config_name: str, split: str) -> None:
    if not _SPLIT_RE.match(split):
        hint = f" (use '{re.sub(r'[^A-Za-z0-9_.]', '_', split)}')" if split else ""
        raise EtokitError(f"--split '{split}' is not a valid split name: letters, digits, '_' and '.' only{hint}")
    if not _CONFIG_RE.match(config_name):
        raise EtokitError(f"--config-name '{config_name}' is not a valid config name: letters, digits, '_', '-', '.'")


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise EtokitError(f"--repo-id '{repo_id}' is not a valid repo id: {e}") from None
    if repo_id.count("/") != 1:
        raise EtokitError(f"--repo-id '{repo_id}' must be NAMESPACE/NAME")


class _hub_errors:
    """Hub failures become one-line errors naming the repo (the client's messages carry no token)."""

    def __init__(self, repo_id: str):
        self.repo_id = repo_id

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else "?"
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise EtokitError(f"Hub refused the push to '{self.repo_id}' (HTTP {status}): {first}") from None
        return False
