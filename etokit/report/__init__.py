"""Run reports: what an ETO run did, as one offline HTML page and as PNGs in each checkpoint.

- ``etokit report RUN_DIR_OR_REPO --out report.html`` (:func:`build_report`): results per stage with
  95% intervals, pairs won/tied/lost, DPO and BC training curves, per-task change from BC, and a
  viewer of the contrastive pairs; from a run folder or the Hub repos of a run.
- ``etokit run`` calls :func:`publish_report` before it pushes each checkpoint: the run's
  ``report.html`` is rewritten, and the checkpoint folder gets the figures as ``report/*.png`` and
  the results so far as ``eto_results.json`` (how a report of the Hub repo gets its per-task
  results); the returned entries go into the model card (figures, ``model-index``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from etokit.report.source import EVAL_SPLITS, SUMMARY_FILE, RunData, load_local, load_run

REPORT_FILE = "report.html"
PLOTS_DIR = "report"

__all__ = ["REPORT_FILE", "RunData", "build_report", "eval_results", "load_run", "publish_report"]


def build_report(source: str | Path, out: str | Path) -> Path:
    from etokit.report.html import write_report

    return write_report(load_run(source), out)


def publish_report(run_dir: Path, checkpoint: Path, *, upto: str) -> dict[str, Any]:
    """Write ``<run_dir>/report.html`` and the checkpoint's ``report/*.png`` + ``eto_results.json``
    (results up to stage ``upto``). Returns model-card keys: ``plots`` and ``eval_results``."""
    from etokit.data.io import atomic_write
    from etokit.report.html import write_report
    from etokit.report.plots import make_plots

    data = load_local(run_dir, upto=upto)
    plots = make_plots(data)
    write_report(data, run_dir / REPORT_FILE, plots)
    for plot in plots:
        with atomic_write(checkpoint / PLOTS_DIR / f"{plot.name}.png") as f:
            f.write(plot.png())
    with atomic_write(checkpoint / SUMMARY_FILE) as f:
        f.write((json.dumps(data.summary, indent=1, sort_keys=True) + "\n").encode())
    return {
        "plots": [{"title": p.title, "path": f"{PLOTS_DIR}/{p.name}.png"} for p in plots],
        "eval_results": eval_results(data.summary, upto),
    }


def eval_results(summary: dict[str, Any], model: str) -> list[dict[str, Any]]:
    """The ``model-index`` entries of checkpoint ``model`` (huggingface_hub ``EvalResult`` fields):
    its average reward x100 and success rate on each test split."""
    stage = next((s for s in summary["stages"] if s["model"] == model), None)
    if stage is None:
        return []
    env = summary.get("env") or "eto"
    out = []
    for split in EVAL_SPLITS:
        if split not in stage:
            continue
        for metric, name, value in (
            ("reward", "Average reward x100", stage[split]["avg_reward"]),
            ("accuracy", "Success rate", stage[split]["success_rate"]),
        ):
            out.append(
                {
                    "task_type": "text-generation",
                    "task_name": "LLM agent (ETO)",
                    "dataset_type": env,
                    "dataset_name": f"{env} {split}",
                    "dataset_split": split,
                    "metric_type": metric,
                    "metric_name": name,
                    "metric_value": round(float(value), 4),
                }
            )
    return out
