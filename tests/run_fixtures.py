"""`etokit run` helpers for tests: the tiny configuration of a real run (FLAGS, the STAGES it
records, the Hub commits it made; the run itself is the `reference_run` fixture in conftest.py), and
a fake run folder (manifest, config, evaluation episodes, pair files, training logs), written in the
layout etokit/run/ makes, for report tests that must not train anything."""

from __future__ import annotations

import json
import math
import random
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from tests.factories import pair, trajectory, write_jsonl

if TYPE_CHECKING:
    from etokit.run import RunConfig

ENV = "textworld-express"
SPLITS = ("test-seen", "test-unseen")
# Small enough for CI (~1 minute a run on 2 cores), large enough that every stage does real work.
# A state checkpoint after every training step (of 2), so a killed BC/DPO resumes mid-training.
# The loop at its smallest that still trains, explores, pairs and evaluates (other tests add to it).
TINY_RUN = (
    "--train-tasks 3 --eval-tasks 1 --iterations 1 --max-steps 2 --max-new-tokens 16 --explore-batch-size 1 --no-icl "
    "--bc.num-epochs 1 --bc.per-device-batch-size 2 --bc.gradient-accumulation-steps 1 --bc.learning-rate 1e-3 "
    "--dpo.num-epochs 1 --dpo.batch-size 2 --dpo-schedule.learning-rate 1e-3 --max-length 1024"
).split()
FLAGS = [*TINY_RUN, "--bc.save-steps", "1", "--dpo.save-steps", "1"]
STAGES = [
    "expert",
    "push-expert",
    "init-model",
    "bc",
    "eval-bc",
    "push-bc",
    "explore-1",
    "pairs-1",
    "push-explore-1",
    "push-pairs-1",
    "dpo-1",
    "eval-iter-1",
    "push-iter-1",
]


def make_config(run_dir: Path, repo: str, *extra: str) -> RunConfig:
    from etokit.run import RunConfig
    from etokit.train.config import parse_config

    return parse_config(RunConfig, [*FLAGS, "--run-dir", str(run_dir), "--push-to", repo, *extra])


def new_repo(tag: str) -> str:
    return f"etokit-tests/run-{tag}-{uuid.uuid4().hex[:8]}"


def commits(cfg: RunConfig) -> dict[str, list[str]]:
    """Commit ids of every repo and branch the run pushes to."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi()
    out = {}
    for repo in cfg.datasets.values():
        try:
            out[repo] = [c.commit_id for c in api.list_repo_commits(repo, repo_type="dataset")]
        except RepositoryNotFoundError:  # not pushed yet
            out[repo] = []
    refs = api.list_repo_refs(cfg.push_to)
    for branch in refs.branches:
        out[f"{cfg.push_to}@{branch.name}"] = [
            c.commit_id for c in api.list_repo_commits(cfg.push_to, revision=branch.name)
        ]
    out["tags"] = sorted((t.name, t.target_commit) for t in refs.tags)
    return out


def fake_run(
    run_dir: Path,
    *,
    iterations: int = 2,
    tasks: int = 12,
    pairs_per_iteration: int = 9,
    repo: str = "me/fake-eto",
    seed: int = 0,
) -> Path:
    """BC + ``iterations`` ETO iterations. Pair ``j`` of iteration k is a 'win' when j % 3 == 0
    (else 'lose'), its mode 'step' when j % 4 == 3 (else 'trajectory'), its task ``task-<k>-<j>``;
    iteration k records k ties. Rewards rise with the iteration, per task, seeded."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "etokit_config.yaml").write_text(yaml.safe_dump({"push_to": repo, "env": ENV, "pairs_mode": "mixture"}))
    stages = [{"name": "expert", "outputs": {"file": "data/expert.jsonl"}}]
    base = {t: rng.choice([0.0, 0.25, 0.5, 1.0]) for t in range(tasks)}
    for k in range(iterations + 1):
        model = "bc" if k == 0 else f"iter-{k}"
        folder = run_dir / "models" / model
        folder.mkdir(parents=True, exist_ok=True)
        steps = 8 if k == 0 else 6
        with open(folder / "train_log.jsonl", "w") as f:
            for s in range(1, steps + 1):
                row = {"step": s, "loss": 2.5 * math.exp(-s / 4) + 0.1, "learning_rate": 1e-5}
                if k:
                    row.update(
                        {
                            "loss": 0.69 - 0.03 * s * k,
                            "rewards/chosen": 0.01 * s,
                            "rewards/rejected": -0.02 * s,
                            "rewards/margins": 0.03 * s,
                            "rewards/accuracies": min(1.0, 0.5 + 0.08 * s),
                            "logps/chosen": -40.0 + s,
                            "logps/rejected": -45.0 - s,
                        }
                    )
                f.write(json.dumps(row) + "\n")
        if k == 0:
            stages.append({"name": "bc", "outputs": {"model": "models/bc"}})
        else:
            pairs = [
                pair(f"task-{k}-{j}", k, env=ENV, outcome="win" if j % 3 == 0 else "lose")
                for j in range(pairs_per_iteration)
            ]
            by_mode: dict[str, dict] = {}
            for j, p in enumerate(pairs):
                if j % 4 == 3:
                    p.mode = "step"
                if j == 1:  # markup in an agent turn must show as text and not end the page's inline data
                    p.rejected[-1] = {**p.rejected[-1], "content": p.rejected[-1]["content"] + " </script><b>x</b>"}
                s = by_mode.setdefault(p.mode, {"win": 0, "tie": 0, "lose": 0, "pairs": 0})
                s[p.outcome] += 1
                s["pairs"] += 1
            by_mode.setdefault("trajectory", {"win": 0, "tie": 0, "lose": 0, "pairs": 0})["tie"] = k
            (run_dir / "data").mkdir(exist_ok=True)
            write_jsonl(run_dir / "data" / f"pairs_iter{k}.jsonl", pairs)
            stats = {o: sum(s[o] for s in by_mode.values()) for o in ("win", "tie", "lose", "pairs")}
            stages += [
                {
                    "name": f"pairs-{k}",
                    "outputs": {"file": f"data/pairs_iter{k}.jsonl", "stats": {**stats, "by_mode": by_mode}},
                },
                {"name": f"dpo-{k}", "outputs": {"model": f"models/{model}", "reference": "bc"}},
            ]
        evals = {}
        for split in SPLITS:
            rewards = {
                f"{split}-{t}": min(1.0, max(0.0, base[t] + rng.choice([-0.25, 0, 0, 0.25]) * (k > 0)))
                for t in range(tasks)
            }
            path = run_dir / "eval" / model / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(path, [trajectory(t, r, 3, env=ENV, source="explore", split=split) for t, r in rewards.items()])
            evals[split] = {
                "file": f"eval/{model}/{split}.jsonl",
                "avg_reward": 100 * sum(rewards.values()) / tasks,
                "success_rate": sum(r >= 1.0 for r in rewards.values()) / tasks,
                "episodes": tasks,
            }
        stages.append({"name": f"eval-{model}", "outputs": evals})
    (run_dir / "manifest.json").write_text(json.dumps({"config_hash": "fake", "stages": stages}, indent=1))
    return run_dir
