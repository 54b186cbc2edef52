"""Where trajectories and pairs come from: a local file, or a Hub dataset repo, in etokit's schema or
an official ETO format, detected row by row exactly as for files.

Every option that takes records (BC and DPO ``--data``, ``build-pairs --expert``, ``explore
--step-wise-expert``, ``import-eto``, a run's ``expert_data``) reads them through ``load_source``.
A Hub dataset is named ``NAMESPACE/NAME[@REVISION][:SPLIT]``, or with the separate config / split /
revision options the training recipes have. The published ETO data is one such repo:
``agent-eto/eto-sft-trajectory:scienceworld`` is its ScienceWorld split (config ``default``).

Official rows carry no environment: it comes from ``env`` when given, else from the names around
the rows (file stem, Hub config and split: ``webshop``, ``scienceworld``/``sciworld``,
``alfworld``), else ALFWorld when every row has a ``game_file``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from etokit.data.io import Records, env_from_names, load_records, records_from_rows
from etokit.data.schema import RecordKind
from etokit.data.validate import DataError

_SPEC = re.compile(r"^(?P<repo>[^@:\s/]+/[^@:\s/]+)(?:@(?P<revision>[^:\s]+))?(?::(?P<split>\w+(?:\.\w+)*))?$")


@dataclass(frozen=True)
class HubDataset:
    repo: str
    config: str | None = None
    split: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        parts = [
            f"config {self.config}" if self.config else "",
            f"split {self.split}" if self.split else "",
            f"revision {self.revision}" if self.revision else "",
        ]
        details = ", ".join(p for p in parts if p)
        return f"{self.repo} ({details})" if details else self.repo


def parse_source(
    text: str | Path,
    *,
    config: str | None = None,
    split: str | None = None,
    revision: str | None = None,
    option: str = "--data",
) -> Path | HubDataset:
    """A local file when ``text`` exists, else a Hub dataset ``NAMESPACE/NAME[@REVISION][:SPLIT]``
    (the options ``config``/``split``/``revision`` fill what the text leaves out)."""
    path = Path(text)
    if path.exists():
        return path
    text = str(text)
    match = _SPEC.match(text)
    if match is None or text.startswith((".", "/", "~")) or Path(text).suffix in (".jsonl", ".json", ".parquet"):
        raise DataError(
            f"{option} {text!r} is neither an existing file nor a Hub dataset NAMESPACE/NAME[@REVISION][:SPLIT]"
        )
    from etokit.data.names import check_repo_id, check_revision

    repo = check_repo_id(match["repo"], option)
    revision = match["revision"] or revision
    if revision is not None:
        check_revision(revision, option)
    return HubDataset(repo=repo, config=config, split=match["split"] or split, revision=revision)


def load_source(
    source: str | Path | HubDataset,
    kind: RecordKind | None = None,
    *,
    env: str | None = None,
    split: str = "train",
    formats: Iterable[str] | None = None,
    expert_reward: float | None = None,
    option: str = "--data",
) -> Records:
    """The validated records of a file or Hub dataset. ``split`` is the environment split official
    SFT rows are recorded under (etokit rows carry their own); the Hub split is the source's."""
    if not isinstance(source, HubDataset):
        source = parse_source(source, option=option)
    if isinstance(source, Path):
        return load_records(source, kind, env=env, split=split, formats=formats, expert_reward=expert_reward)
    config, hub_split = _resolve(source, env)
    import datasets

    try:
        ds = datasets.load_dataset(source.repo, config, split=hub_split, revision=source.revision)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; each becomes one clear line
        raise DataError(f"cannot load {option} {source}: {_describe(e)}") from None
    resolved = HubDataset(source.repo, config, hub_split, source.revision)
    return records_from_rows(
        ds.to_list(),
        Path(str(resolved)),
        kind,
        env=env,
        split=split,
        formats=formats,
        names=(hub_split, config, source.repo.split("/")[1]),
        expert_reward=expert_reward,
    )


def _resolve(source: HubDataset, env: str | None) -> tuple[str | None, str]:
    """(config, split) to load: the given ones, else the only config / the env's config, and the
    env's split (the published ETO repo has one split per environment) or ``train``."""
    import datasets

    config = source.config
    try:
        if config is None:
            configs = datasets.get_dataset_config_names(source.repo, revision=source.revision)
            if len(configs) == 1:
                config = configs[0]
            elif env in configs:
                config = env
            elif "default" in configs:
                config = "default"
            else:
                raise DataError(f"{source} has configs {', '.join(configs)}: name one (or pass --env to pick its own)")
        if source.split is not None:
            return config, source.split
        splits = datasets.get_dataset_split_names(source.repo, config, revision=source.revision)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read Hub dataset {source}: {_describe(e)}") from None
    for split in splits:
        if env is not None and env_from_names([split]) == env or split == env:
            return config, split
    if len(splits) == 1:
        return config, splits[0]
    if "train" in splits:
        return config, "train"
    raise DataError(
        f"{source} has splits {', '.join(splits)}: name one as {source.repo}:SPLIT "
        "(or pass --env to pick the environment's)"
    )


def _describe(e: Exception) -> str:
    """An error from datasets / huggingface_hub as one line: its type and its message's first line."""
    text = str(e).splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
