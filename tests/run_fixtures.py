"""A fake `etokit run` folder (manifest, config, evaluation episodes, pair files, training logs),
written in the layout etokit/run/ makes, for report tests that must not train anything."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import yaml

from factories import pair, trajectory, write_jsonl

ENV = "textworld-express"
SPLITS = ("test-seen", "test-unseen")


def fake_run(run_dir: Path, *, iterations: int = 2, tasks: int = 12, pairs_per_iteration: int = 9,
             repo: str = "me/fake-eto", seed: int = 0) -> Path:
    """BC + ``iterations`` ETO iterations. Pair ``j`` of iteration k is a 'win' when j % 3 == 0
    (else 'lose'), its mode 'step' when j % 4 == 3 (else 'trajectory'), its task ``task-<k>-<j>``;
    iteration k records k ties. Rewards rise with the iteration, per task, seeded."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "etokit_config.yaml").write_text(yaml.safe_dump({"push_to": repo, "env": ENV,
                                                                "pairs_mode": "mixture"}))
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
                    row.update({"loss": 0.69 - 0.03 * s * k, "rewards/chosen": 0.01 * s, "rewards/rejected": -0.02 * s,
                                "rewards/margins": 0.03 * s, "rewards/accuracies": min(1.0, 0.5 + 0.08 * s),
                                "logps/chosen": -40.0 + s, "logps/rejected": -45.0 - s})
                f.write(json.dumps(row) + "\n")
        if k == 0:
            stages.append({"name": "bc", "outputs": {"model": "models/bc"}})
        else:
            pairs = [pair(f"task-{k}-{j}", k, env=ENV, outcome="win" if j % 3 == 0 else "lose")
                     for j in range(pairs_per_iteration)]
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
            stages += [{"name": f"pairs-{k}", "outputs": {"file": f"data/pairs_iter{k}.jsonl",
                                                          "stats": {**stats, "by_mode": by_mode}}},
                       {"name": f"dpo-{k}", "outputs": {"model": f"models/{model}", "reference": "bc"}}]
        evals = {}
        for split in SPLITS:
            rewards = {f"{split}-{t}": min(1.0, max(0.0, base[t] + rng.choice([-0.25, 0, 0, 0.25]) * (k > 0)))
                       for t in range(tasks)}
            path = run_dir / "eval" / model / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(path, [trajectory(t, r, 3, env=ENV, source="explore", split=split) for t, r in rewards.items()])
            evals[split] = {"file": f"eval/{model}/{split}.jsonl", "avg_reward": 100 * sum(rewards.values()) / tasks,
                            "success_rate": sum(r >= 1.0 for r in rewards.values()) / tasks, "episodes": tasks}
        stages.append({"name": f"eval-{model}", "outputs": evals})
    (run_dir / "manifest.json").write_text(json.dumps({"config_hash": "fake", "stages": stages}, indent=1))
    return run_dir
