"""Summaries of trajectory and pair sets, as the paper reports them (average reward, success rate,
average turns; win/tie/lose counts of pair construction)."""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from typing import Iterable

from etokit.data.schema import Pair, Trajectory

HISTOGRAM_BINS = 10


def trajectory_stats(trajs: Iterable[Trajectory]) -> dict:
    """rows, avg_turns (assistant turns), avg_steps, avg_reward, success_rate, a 10-bin reward
    histogram on [0, 1] (last bin closed), and counts per split, env and source."""
    trajs = list(trajs)
    return {
        "rows": len(trajs),
        "avg_turns": _mean(_assistant_turns(t.messages) for t in trajs),
        "avg_steps": _mean(t.num_steps for t in trajs),
        "avg_reward": _mean(t.reward for t in trajs),
        "success_rate": _mean(float(bool(t.success)) for t in trajs),
        "reward_histogram": reward_histogram(t.reward for t in trajs),
        "splits": dict(sorted(Counter(t.split for t in trajs).items())),
        "envs": dict(sorted(Counter(t.env for t in trajs).items())),
        "sources": dict(sorted(Counter(t.source for t in trajs).items())),
        # Rewards no row carried, stated by the user (--expert-reward): value -> rows. The cards say so.
        "expert_reward_stated": {
            str(v): n
            for v, n in sorted(
                Counter(t.extra["expert_reward_stated"] for t in trajs if "expert_reward_stated" in t.extra).items()
            )
        },
    }


def pair_stats(pairs: Iterable[Pair], ties: int | None = None) -> dict:
    """rows, win/lose counts (from each pair's outcome; pairs without one count as unknown), tie
    (dropped pairs are not in the data, so only known when the builder passes the count), average
    chosen/rejected reward over the pairs that have one, and average assistant turns."""
    pairs = list(pairs)
    outcomes = Counter(p.outcome for p in pairs)
    return {
        "rows": len(pairs),
        "win": outcomes["win"],
        "lose": outcomes["lose"],
        "unknown_outcome": outcomes[None],
        "tie": ties,
        "avg_chosen_reward": _mean(p.chosen_reward for p in pairs if p.chosen_reward is not None),
        "avg_rejected_reward": _mean(p.rejected_reward for p in pairs if p.rejected_reward is not None),
        "avg_chosen_turns": _mean(_assistant_turns(p.chosen) for p in pairs),
        "avg_rejected_turns": _mean(_assistant_turns(p.rejected) for p in pairs),
        "envs": dict(sorted(Counter(p.env for p in pairs).items())),
        "modes": dict(sorted(Counter(p.mode for p in pairs).items())),
        # String keys keep the summary JSON-serialisable (it is published next to the dataset).
        "iterations": {
            ("none" if i is None else str(i)): n
            for i, n in sorted(Counter(p.iteration for p in pairs).items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
        },
    }


def reward_histogram(rewards: Iterable[float]) -> dict:
    """Counts in HISTOGRAM_BINS equal bins on [0, 1]; bins are [lo, hi) except the last, [0.9, 1]."""
    # Edges as i/10 (not a cumulative sum) so that e.g. a reward of exactly 0.3 lands in [0.3, 0.4).
    edges = [i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)]
    counts = [0] * HISTOGRAM_BINS
    for r in rewards:
        counts[min(bisect_right(edges, r) - 1, HISTOGRAM_BINS - 1)] += 1
    return {"edges": edges, "counts": counts}


def _assistant_turns(messages: list[dict]) -> int:
    return sum(m["role"] == "assistant" for m in messages)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
