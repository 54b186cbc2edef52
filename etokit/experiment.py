"""`make experiment`: the ETO loop run once per training seed on one fixed evaluation panel, and
the verdict, each ETO iteration against BC with its paired 95% interval.

    python -m etokit.experiment [--config experiment-smollm2] [--seeds 0,1,2] [--dir .experiment] [--fresh]
                                [RUN OPTIONS, e.g. --eval-tasks 128]

Each seed is a whole `etokit run` (its own folder DIR/seed-S/run and model repo on an embedded Hub
whose data stays in DIR/hub). Nothing is wiped unless --fresh: run the command again after an
interruption and the finished seeds are read back while the interrupted one resumes where it
stopped (`etokit run --resume`). The runs differ only by their seed; their test panels (the first
N tasks of test-seen and test-unseen) are the same, which is what lets the seeds be averaged task
by task.

The diagnostics of each run (etokit.run.report.run_diagnostics: pairs, DPO curves, invalid and repeated
actions, reply lengths), then the verdict (DIR/experiment.json and the table printed last): for every evaluated iteration and
test split, iteration minus BC in average reward x100, per seed (paired bootstrap over tasks) and
averaged over the seeds (each task's difference averaged over the seeds, paired bootstrap over
tasks: etokit.stats.seed_averaged_diff), with how many tasks went up, down or stayed, and every
task's reward per policy, split and seed (its "per_task"), from which each interval can be recomputed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

SEED_DIR = "seed-{seed}"
RESULT_FILE = "experiment.json"


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected integers separated by commas") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected one or more distinct seeds")
    return seeds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m etokit.experiment",
        description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog="Other options are `etokit run`'s (etokit run --help).",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(".experiment"),
        help="working folder: the runs, the embedded Hub's data and experiment.json (default "
        ".experiment; kept between invocations so an interrupted experiment resumes)",
    )
    parser.add_argument(
        "--config",
        default="experiment-smollm2",
        help="a shipped run config name or a YAML file (default experiment-smollm2)",
    )
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="training seeds (default 0,1,2)")
    parser.add_argument("--fresh", action="store_true", help="wipe --dir first instead of resuming")
    args, overrides = parser.parse_known_args(argv)
    from etokit.configs import resolve
    from etokit.errors import EtokitError

    try:
        config = resolve(args.config)
    except EtokitError as e:
        parser.error(str(e))
    if args.fresh and args.dir.exists():
        shutil.rmtree(args.dir)
    args.dir.mkdir(parents=True, exist_ok=True)
    from etokit.demo import embedded_hub

    with embedded_hub(args.dir):
        start = time.monotonic()
        try:
            run_dirs = {seed: run_seed(args.dir, config, seed, overrides) for seed in args.seeds}
        except KeyboardInterrupt:
            from etokit.run import console

            # Each finished stage and each recorded episode is kept: the same command resumes there.
            console.print(f"experiment interrupted: run the same command again to resume (kept in {args.dir})")
            raise SystemExit(130) from None
        minutes = (time.monotonic() - start) / 60
    verdict = aggregate(run_dirs, root=args.dir)
    verdict["minutes_this_invocation"] = round(minutes, 1)
    from etokit.run.report import run_diagnostics

    verdict["diagnostics"] = {str(seed): run_diagnostics(d) for seed, d in run_dirs.items()}
    from etokit.data import atomic_write

    with atomic_write(args.dir / RESULT_FILE) as f:
        f.write((json.dumps(verdict, indent=2) + "\n").encode())
    print_diagnostics(verdict["diagnostics"])
    print_verdict(verdict)
    from etokit.run import console

    console.print(
        f"experiment: {len(run_dirs)} seed(s) in {minutes:.1f} min this time; verdict in {args.dir / RESULT_FILE}"
    )


def run_seed(root: Path, config: Path, seed: int, overrides: list[str]) -> Path:
    """Run (or resume, or read back) the loop of one seed; returns its run folder."""
    from etokit.run import MANIFEST, Run, RunConfig, console
    from etokit.train.config import parse_config

    run_dir = root / SEED_DIR.format(seed=seed) / "run"
    cfg = parse_config(
        RunConfig,
        [
            "--config",
            str(config),
            *overrides,
            "--seed",
            str(seed),
            "--run-dir",
            str(run_dir),
            "--push-to",
            f"experiment/eto-seed{seed}",
        ],
    )
    console.rule(f"seed {seed}: {run_dir}")
    Run(cfg, resume=(run_dir / MANIFEST).exists()).run()
    return run_dir


def aggregate(run_dirs: dict[int, Path], *, root: Path | None = None, confidence: float = 0.95) -> dict[str, Any]:
    """Every iteration evaluated by all the runs against their BC, per split: per seed and averaged
    over the seeds, in average reward x100 (see the module docstring)."""
    from etokit.errors import EtokitError
    from etokit.run import EVAL_SPLITS, run_eval_panels
    from etokit.stats import mean_ci, paired_diff, seed_averaged_diff

    panels = {}
    for seed, run_dir in run_dirs.items():
        panels[seed] = {"bc": run_eval_panels(run_dir, "bc")}
        k = 1
        while True:
            try:
                panels[seed][f"iter-{k}"] = run_eval_panels(run_dir, f"iter-{k}")
            except EtokitError:  # not evaluated (fewer iterations, or early stopping)
                break
            k += 1
    seeds = list(run_dirs)
    common = [p for p in panels[seeds[0]] if all(p in panels[s] for s in seeds)]
    # Every task's reward x100 (the paper's scale) per policy, split and seed, in the order of `seeds`.
    tables = {
        policy: {
            split: [{t: 100 * r for t, r in panels[s][policy][split].rewards.items()} for s in seeds]
            for split in EVAL_SPLITS
        }
        for policy in common
    }
    out: dict[str, Any] = {
        "unit": "average reward x100",
        "confidence": confidence,
        "seeds": seeds,
        "runs": {str(s): str(d.relative_to(root) if root else d) for s, d in run_dirs.items()},
        "tasks": {split: len(panels[seeds[0]]["bc"][split].rewards) for split in EVAL_SPLITS},
        "policies": {},
        "comparisons": [],
        # The tables themselves, by seed: the verdict file alone lets anyone recompute each interval
        # (etokit.stats) after the run folders are gone.
        "per_task": {
            policy: {split: dict(zip(map(str, seeds), by_seed)) for split, by_seed in t.items()}
            for policy, t in tables.items()
        },
    }
    for policy in common:
        out["policies"][policy] = {}
        for split in EVAL_SPLITS:
            per_seed = [mean_ci(rewards.values(), confidence=confidence) for rewards in tables[policy][split]]
            tasks = tables[policy][split][0]
            averaged = {t: sum(rewards[t] for rewards in tables[policy][split]) / len(seeds) for t in tasks}
            out["policies"][policy][split] = {
                "per_seed": [i.to_dict() for i in per_seed],
                "seed_averaged": mean_ci(averaged.values(), confidence=confidence).to_dict(),
            }
    for policy in common[1:]:
        for split in EVAL_SPLITS:
            runs = list(zip(tables["bc"][split], tables[policy][split]))
            names = ("bc", policy)
            out["comparisons"].append(
                {
                    "a": "bc",
                    "b": policy,
                    "split": split,
                    "per_seed": [paired_diff(a, b, confidence=confidence, names=names).to_dict() for a, b in runs],
                    "seed_averaged": seed_averaged_diff(runs, confidence=confidence, names=names).to_dict(),
                }
            )
    return out


def verdict_rows(verdict: dict[str, Any]) -> list[dict[str, str]]:
    """One row per (iteration, split): the table printed by `make experiment`, and its RESULTS.md rows."""
    fmt = lambda d: f"{d['mean']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]"  # noqa: E731
    rows = []
    for c in verdict["comparisons"]:
        avg = c["seed_averaged"]
        where = "above zero" if avg["lo"] > 0 else "below zero" if avg["hi"] < 0 else "includes zero"
        base = verdict["policies"]["bc"][c["split"]]["seed_averaged"]
        other = verdict["policies"][c["b"]][c["split"]]["seed_averaged"]
        rows.append(
            {
                "comparison": f"{c['b']} - bc",
                "split": c["split"],
                "tasks": str(avg["n"]),
                "bc": f"{base['mean']:.1f} [{base['lo']:.1f}, {base['hi']:.1f}]",
                "iteration": f"{other['mean']:.1f} [{other['lo']:.1f}, {other['hi']:.1f}]",
                "per seed": ", ".join(f"{d['mean']:+.1f}" for d in c["per_seed"]),
                "seed-averaged (paired)": fmt(avg),
                "up/down/same": f"{avg['up']}/{avg['down']}/{avg['same']}",
                "interval": where,
            }
        )
    return rows


def diagnostic_rows(diagnostics: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """One row per seed and stage of etokit.run.report.run_diagnostics, in words."""
    rows = []
    for seed, stages in diagnostics.items():
        for stage, d in stages.items():
            if stage.startswith("explore-"):
                what = [f"reward {d['avg_reward']:.1f}, invalid actions {d['invalid_action_rate']:.1%}"]
            elif stage.startswith("pairs-"):
                what = [f"{d['pairs']} pairs: win {d['win']} / tie {d['tie']} / lose {d['lose']}"]
            elif stage.startswith("dpo-"):
                a, b = d["first"], d["last"]
                what = [
                    f"beta {d['beta']}, lr {d['learning_rate']}, {d['steps']} steps: "
                    + ", ".join(f"{k} {a[k]:.2f} -> {b[k]:.2f}" for k in a if k in b)
                ]
            else:
                what = [
                    f"{split}: reward {e['avg_reward']:.1f}, invalid {e['invalid_action_rate']:.1%}, "
                    f"repeated actions {e['repeated_action_rate']:.1%}, {e['reply_words']:.1f} words/reply"
                    for split, e in d.items()
                ]
            rows += [{"seed": seed, "stage": stage, "diagnostics": w} for w in what]
    return rows


def print_diagnostics(diagnostics: dict[str, dict[str, Any]]) -> None:
    from rich.table import Table

    from etokit.cli._console import print_unwrapped

    table = Table(title="What the runs did (etokit.run.report.run_diagnostics)")
    for column in ("seed", "stage", "diagnostics"):
        table.add_column(column)
    for row in diagnostic_rows(diagnostics):
        table.add_row(*row.values())
    print_unwrapped(table)


def print_verdict(verdict: dict[str, Any]) -> None:
    from rich.table import Table

    from etokit.cli._console import print_unwrapped

    level = f"{verdict['confidence']:.0%}"
    table = Table(
        title=f"ETO vs BC over seeds {', '.join(map(str, verdict['seeds']))}: {verdict['unit']}, "
        f"{level} bootstrap intervals over tasks"
    )
    rows = verdict_rows(verdict)
    for column in rows[0] if rows else {"comparison": ""}:
        table.add_column(column, justify="left" if column in ("comparison", "split", "interval") else "right")
    for row in rows:
        table.add_row(*row.values())
    print_unwrapped(table)


if __name__ == "__main__":
    main()
