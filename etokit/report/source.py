"""What a run report shows, read from a local run folder or from the Hub repos of a run.

A run's *summary* is a JSON-able dict, the same wherever it comes from:

    {"repo": "me/agent", "env": "textworld-express", "pairs_mode": "trajectory",
     "datasets": {"expert": ..., "explore": ..., "pairs": ...},
     "stages": [{"model": "bc", "test-seen": {"avg_reward": 12.5, "success_rate": 0.1, "episodes": 50,
                                              "per_task": {"task-0": [0.5, false], ...}},
                 "test-unseen": {...}},
                {"model": "iter-1", ..., "pairs": {"win": 3, "tie": 10, "lose": 40, ..., "by_mode": {...}}}]}

``per_task`` comes from the evaluation episodes (``<run>/eval/<stage>/<split>.jsonl``): those are not
pushed to the Hub, so each checkpoint carries the summary as ``eto_results.json``
(:data:`SUMMARY_FILE`), which is how a report of a Hub repo gets its per-task results back. The pairs
come from the run's pair files or its pairs dataset, the training curves from the ``train_log.jsonl``
the trainers write next to their weights (pushed with them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from etokit.data.schema import Pair
from etokit.errors import EtokitError

SUMMARY_FILE = "eto_results.json"
EVAL_SPLITS = ("test-seen", "test-unseen")


@dataclass
class RunData:
    summary: dict[str, Any]
    pairs: list[Pair] = field(default_factory=list)
    logs: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # stage -> train_log.jsonl rows
    source: str = ""


def load_run(source: str | Path) -> RunData:
    """A local run folder (one with ``manifest.json``) or a Hub model repo made by ``etokit run``."""
    path = Path(source)
    if path.exists():
        return load_local(path)
    from etokit.data.names import check_repo_id

    try:
        check_repo_id(str(source), "RUN_DIR_OR_REPO")
    except EtokitError:
        raise EtokitError(f"{source}: no such run folder, and not a Hub repo id (NAMESPACE/NAME)") from None
    return load_hub(str(source))


# ------------------------------------------------------------------------------------- local


def load_local(run_dir: Path, *, upto: str | None = None) -> RunData:
    """The run in ``run_dir`` as recorded in its manifest so far (a live run: its finished
    stages), up to and including the evaluation of stage ``upto``."""
    from etokit.data import read_jsonl
    from etokit.train.metric_logging import read_log
    from etokit.train.config import CONFIG_FILENAME

    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise EtokitError(f"{run_dir}: not an etokit run folder (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
        stages = {s["name"]: s["outputs"] for s in manifest["stages"]}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise EtokitError(f"{manifest_path}: not a valid run manifest ({e})") from None
    config_path = run_dir / CONFIG_FILENAME
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    prefix = config.get("dataset_prefix") or config.get("push_to", "")
    summary: dict[str, Any] = {
        "repo": config.get("push_to", ""),
        "env": config.get("env", ""),
        "pairs_mode": config.get("pairs_mode", "trajectory"),
        "datasets": {kind: f"{prefix}-{kind}" for kind in ("expert", "explore", "pairs")} if prefix else {},
        "stages": [],
    }
    pairs: list[Pair] = []
    logs: dict[str, list[dict]] = {}
    for name in [s["name"] for s in manifest["stages"]]:
        if not name.startswith("eval-"):
            continue
        model = name[len("eval-") :]
        outputs = stages[name]
        row: dict[str, Any] = {"model": model}
        for split in EVAL_SPLITS:
            if split not in outputs:
                continue
            entry = {k: outputs[split][k] for k in ("avg_reward", "success_rate", "episodes") if k in outputs[split]}
            file = run_dir / outputs[split].get("file", "")
            if outputs[split].get("file") and file.is_file():
                entry["per_task"] = {t.task_id: [t.reward, bool(t.success)] for t in read_jsonl(file, "trajectory")}
            row[split] = entry
        train = stages.get("bc" if model == "bc" else f"dpo-{model.split('-')[1]}")
        if train and not train.get("skipped") and (run_dir / train["model"]).is_dir():
            logs[model] = read_log(run_dir / train["model"])
        if model != "bc":
            k = int(model.split("-")[1])
            made = stages.get(f"pairs-{k}")
            if made:
                row["pairs"] = made["stats"]
                if (run_dir / made["file"]).is_file():
                    pairs += read_jsonl(run_dir / made["file"], "pair")
        summary["stages"].append(row)
        if model == upto:
            break
    return RunData(summary=summary, pairs=pairs, logs=logs, source=str(run_dir))


# --------------------------------------------------------------------------------------- Hub


def load_hub(repo: str) -> RunData:
    """A model repo pushed by ``etokit run``: every checkpoint is a branch (``bc``, ``iter-1``, ...)
    holding its ``train_log.jsonl`` and the run's summary up to it; the pairs are read back from
    the pairs dataset the summary names."""
    import datasets
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    api = HfApi()
    try:
        branches = {b.name for b in api.list_repo_refs(repo).branches}
    except RepositoryNotFoundError:
        raise EtokitError(f"{repo}: no such run folder or Hub model repo") from None
    except HfHubHTTPError as e:
        raise EtokitError(f"{repo}: the Hub refused to list its branches ({e})") from None
    stages = sorted((b for b in branches if b == "bc" or _iteration(b) is not None), key=lambda b: _iteration(b) or 0)
    if not stages:
        raise EtokitError(f"{repo}: no checkpoint branch (bc, iter-1, ...); was it made by `etokit run`?")

    def read(name: str, revision: str):
        try:
            return Path(hf_hub_download(repo, name, revision=revision))
        except EntryNotFoundError:
            return None

    summary_path = read(SUMMARY_FILE, stages[-1])
    if summary_path is None:
        raise EtokitError(f"{repo}@{stages[-1]} has no {SUMMARY_FILE}; it was pushed by an etokit without run reports")
    summary = json.loads(summary_path.read_text())
    logs = {}
    for stage in stages:
        log = read("train_log.jsonl", stage)
        if log is not None:
            logs[stage] = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    pairs: list[Pair] = []
    pairs_repo = summary.get("datasets", {}).get("pairs")
    for row in summary["stages"]:
        k = _iteration(row["model"])
        if k is None or not pairs_repo or not (row.get("pairs") or {}).get("pairs"):
            continue
        try:
            split = datasets.load_dataset(pairs_repo, summary["env"], split=f"iter_{k}")
        except (HfHubHTTPError, FileNotFoundError, ValueError) as e:
            raise EtokitError(f"{repo}: could not read the pairs of iteration {k} from {pairs_repo} ({e})") from None
        pairs += [Pair.from_row(r) for r in split.to_list()]
    return RunData(summary=summary, pairs=pairs, logs=logs, source=repo)


def _iteration(name: str) -> int | None:
    head, _, k = name.partition("-")
    return int(k) if head == "iter" and k.isdigit() else None
