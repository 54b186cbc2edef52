"""The report's figures, drawn with matplotlib (object API: no pyplot, no global backend), each
rendered both as inline SVG (the HTML report) and as PNG (pushed with every checkpoint).

Rendering is deterministic (fixed SVG id salt, no dates): a checkpoint re-pushed after a crash
holds the same bytes, so the push makes no new commit.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from etokit.report.source import EVAL_SPLITS, RunData

# Colour-blind-safe (Okabe-Ito); the same colours in the HTML viewer's badges.
COLORS = {
    "test-seen": "#0072B2",
    "test-unseen": "#D55E00",
    "win": "#009E73",
    "tie": "#999999",
    "lose": "#E69F00",
    "chosen": "#009E73",
    "rejected": "#CC79A7",
}
ITER_CMAP = "viridis"
_RC = {
    "svg.hashsalt": "etokit",
    "svg.fonttype": "none",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
    "figure.dpi": 100,
}


@dataclass
class Plot:
    name: str  # file stem: report/<name>.png
    title: str
    figure: Any  # matplotlib.figure.Figure

    def svg(self) -> str:
        import matplotlib

        buf = io.StringIO()
        with matplotlib.rc_context(_RC):
            self.figure.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
        text = buf.getvalue()
        return text[text.index("<svg") :]  # drop the XML prolog and doctype: inlined in HTML

    def png(self) -> bytes:
        import matplotlib

        buf = io.BytesIO()
        with matplotlib.rc_context(_RC):
            self.figure.savefig(buf, format="png", dpi=110, metadata={"Software": None})
        return buf.getvalue()


def label(model: str) -> str:
    return "BC" if model == "bc" else model


def make_plots(data: RunData) -> list[Plot]:
    import matplotlib

    with matplotlib.rc_context(_RC):
        plots = [results_plot(data), pairs_plot(data), training_plot(data), per_task_plot(data)]
    return [p for p in plots if p is not None]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def interval(values: list[float]):
    from etokit.stats import mean_ci

    return mean_ci(values, confidence=0.95)


def stage_intervals(stage: dict, split: str) -> dict[str, tuple[float, float | None, float | None]]:
    """(mean, lo, hi) x100 of reward and success; the bounds are None without per-task results."""
    entry = stage.get(split) or {}
    per_task = entry.get("per_task")
    if per_task:
        out = {}
        for i, metric in enumerate(("reward", "success")):
            ci = interval([float(v[i]) for v in per_task.values()])
            out[metric] = (100 * ci.mean, 100 * ci.lo, 100 * ci.hi)
        return out
    return {
        "reward": (entry.get("avg_reward", float("nan")), None, None),
        "success": (100 * entry.get("success_rate", float("nan")), None, None),
    }


def results_plot(data: RunData) -> Plot | None:
    stages = data.summary["stages"]
    if not stages:
        return None
    fig = _figure(7.0, 2.8)
    axes = fig.subplots(1, 2)
    xs = list(range(len(stages)))
    for ax, metric, title in zip(axes, ("reward", "success"), ("Average reward x100", "Success rate (%)")):
        for j, split in enumerate(EVAL_SPLITS):
            points = [stage_intervals(s, split)[metric] for s in stages if split in s]
            if not points:
                continue
            x = [i + (j - 0.5) * 0.08 for i in xs[: len(points)]]
            mean = [p[0] for p in points]
            err = [
                [p[0] - p[1] if p[1] is not None else 0 for p in points],
                [p[2] - p[0] if p[2] is not None else 0 for p in points],
            ]
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, color=COLORS[split], label=split)
        ax.set_xticks(xs, [label(s["model"]) for s in stages])
        ax.set_title(title)
        ax.set_ylim(bottom=0)
    axes[0].legend(loc="best")
    has_ci = any((s.get(split) or {}).get("per_task") for s in stages for split in EVAL_SPLITS)
    if has_ci:
        fig.suptitle("error bars: 95% bootstrap interval over tasks", fontsize=8, color="#555")
    return Plot("results", "Reward and success per stage", fig)


def _pair_counts(data: RunData) -> list[tuple[int, str, dict[str, int]]]:
    """(iteration, mode, {win, tie, lose}) from the recorded pair stats (ties are never rows)."""
    out = []
    for stage in data.summary["stages"]:
        stats = stage.get("pairs")
        if not stats:
            continue
        k = int(stage["model"].split("-")[1])
        by_mode = stats.get("by_mode") or {_single_mode(data, k): stats}
        for mode, s in sorted(by_mode.items()):
            out.append((k, mode, {o: int(s.get(o, 0)) for o in ("win", "tie", "lose")}))
    return out


def _single_mode(data: RunData, k: int) -> str:
    modes = {p.mode for p in data.pairs if p.iteration == k}
    return modes.pop() if len(modes) == 1 else data.summary.get("pairs_mode", "trajectory")


def pairs_plot(data: RunData) -> Plot | None:
    counts = _pair_counts(data)
    if not counts:
        return None
    modes = sorted({m for _, m, _ in counts})
    iterations = sorted({k for k, _, _ in counts})
    fig = _figure(7.0, 2.8)
    ax = fig.subplots()
    width = 0.8 / len(modes)
    hatches = ["", "//", "..", "xx"]
    for k, mode, c in counts:
        j = modes.index(mode)
        x = iterations.index(k) + (j - (len(modes) - 1) / 2) * width
        bottom = 0
        for outcome in ("win", "tie", "lose"):
            ax.bar(
                x,
                c[outcome],
                width * 0.9,
                bottom=bottom,
                color=COLORS[outcome],
                hatch=hatches[j % 4],
                edgecolor="white",
                label=outcome if (k, j) == (iterations[0], 0) else None,
            )
            bottom += c[outcome]
        if len(modes) > 1:
            ax.annotate(mode, (x, bottom), ha="center", va="bottom", fontsize=7, color="#555")
    ax.set_xticks(range(len(iterations)), [f"iter-{k}" for k in iterations])
    ax.set_ylabel("episodes vs expert")
    ax.set_title(
        "Exploration vs expert per iteration: win / tie / lose"
        + ("" if len(modes) > 1 else f" ({modes[0]}-wise pairs)")
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return Plot("pairs", "Pairs per iteration", fig)


# train_log.jsonl keys: scripts/train_dpo.py (etokit.train.dpo_loss.dpo_metrics) and scripts/train_bc.py
_DPO_PANELS = (
    (("loss",), "DPO loss"),
    (("rewards/margins",), "reward margin"),
    (("rewards/accuracies",), "accuracy (margin > 0)"),
    (("logps/chosen", "logps/rejected"), "policy log-probs"),
    (("rewards/chosen", "rewards/rejected"), "implicit rewards"),
)


def training_plot(data: RunData) -> Plot | None:
    import matplotlib

    logs = {stage: rows for stage, rows in data.logs.items() if rows}
    if not logs:
        return None
    fig = _figure(7.0, 4.6)
    axes = fig.subplots(2, 3).flatten()
    bc = logs.get("bc")
    if bc:
        axes[0].plot([r["step"] for r in bc], [r["loss"] for r in bc], color="#444")
    axes[0].set_title("BC loss (per agent token)")
    dpo = {s: rows for s, rows in logs.items() if s != "bc"}
    cmap = matplotlib.colormaps[ITER_CMAP]
    colors = {s: cmap(i / max(1, len(dpo) - 1) * 0.85) for i, s in enumerate(dpo)}
    for ax, (keys, title) in zip(axes[1:], _DPO_PANELS):
        for stage, rows in dpo.items():
            for key, style in zip(keys, ("-", "--")):
                pts = [(r["step"], r[key]) for r in rows if key in r]
                if pts:
                    ax.plot(
                        *zip(*pts),
                        style,
                        color=colors[stage],
                        label=stage if key == keys[0] else None,
                        marker="." if len(pts) < 20 else None,
                    )
        ax.set_title(title)
        if not dpo:
            ax.text(0.5, 0.5, "no DPO step logged", ha="center", va="center", transform=ax.transAxes, color="#777")
    for ax in axes[3:]:
        ax.set_xlabel("optimizer step")
    if dpo:
        axes[1].legend(loc="best", fontsize=7)
        fig.suptitle(
            "per DPO iteration; log-probs and implicit rewards: chosen solid, rejected dashed", fontsize=8, color="#555"
        )
    return Plot("training", "Training curves (BC, DPO)", fig)


def task_changes(data: RunData) -> list[dict[str, Any]]:
    """Per split and iteration: the per-task paired change from BC (tasks evaluated in both)."""
    from etokit.stats import paired_diff

    stages = data.summary["stages"]
    bc = next((s for s in stages if s["model"] == "bc"), None)
    out = []
    if bc is None:
        return out
    for split in EVAL_SPLITS:
        before = (bc.get(split) or {}).get("per_task")
        if not before:
            continue
        a = {t: v[0] for t, v in before.items()}
        for stage in stages:
            after = (stage.get(split) or {}).get("per_task")
            if stage["model"] == "bc" or not after:
                continue
            b = {t: v[0] for t, v in after.items()}
            d = paired_diff(a, b, allow_mismatch=True, names=("BC", stage["model"]))
            deltas = {t: b[t] - a[t] for t in a if t in b}
            out.append({"split": split, "model": stage["model"], "diff": d, "deltas": deltas})
    return out


def per_task_plot(data: RunData) -> Plot | None:
    changes = task_changes(data)
    if not changes:
        return None
    splits = [s for s in EVAL_SPLITS if any(c["split"] == s for c in changes)]
    fig = _figure(7.0, 0.6 + 0.45 * max(sum(c["split"] == s for c in changes) for s in splits) * len(splits) + 0.6)
    axes = fig.subplots(len(splits), 1, squeeze=False)[:, 0]
    for ax, split in zip(axes, splits):
        rows = [c for c in changes if c["split"] == split]
        ys = list(range(len(rows)))[::-1]
        for y, c in zip(ys, rows):
            d = c["diff"]
            ax.barh(y, -d.down, color=COLORS["lose"], height=0.6, label="regressed" if y == ys[0] else None)
            ax.barh(y, d.up, color=COLORS["win"], height=0.6, label="improved" if y == ys[0] else None)
            ax.annotate(
                f"  Δ {d.diff.scaled(100).format(sign=True)}, {d.same} same",
                (max(d.up, 0), y),
                va="center",
                fontsize=8,
                color="#333",
            )
        ax.axvline(0, color="#333", linewidth=0.8)
        ax.set_yticks(ys, [label(c["model"]) for c in rows])
        span = max(max(c["diff"].up, c["diff"].down) for c in rows) or 1
        ax.set_xlim(-span * 1.1, span * 2.4)
        ax.set_title(f"{split}: tasks whose reward rose / fell vs BC (Δ reward x100, 95% interval)")
        ax.set_xlabel("tasks (left: regressed, right: improved)")
        ax.grid(axis="y", visible=False)
    axes[0].legend(loc="lower right", fontsize=7)
    return Plot("per_task", "Per-task change from BC", fig)
