"""Error bars for evaluation results: a mean over tasks with its 95% percentile-bootstrap interval,
and the paired difference of two evaluations of the same task panel.

The unit of resampling is the task: an evaluation is one episode per task of a fixed, named panel,
and the question an interval answers is "how much would this mean move on another panel of the
same size drawn from the same tasks?". A comparison of two models on the *same* panel resamples
the per-task differences (a paired bootstrap), so the spread of task difficulty, which both models
share, does not widen the interval of their difference.

Everything is deterministic given ``seed`` and vectorised with numpy: the resamples are drawn as
one index matrix (in row blocks that bound memory), never a Python loop over resamples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Hashable, Iterable, Mapping

import numpy as np

from etokit.errors import EtokitError

# Resample rows per block: keeps the (rows x n) index matrix near 32 MB whatever n is.
_BLOCK_ELEMENTS = 1 << 22


class PanelMismatchError(EtokitError):
    """Two evaluations to compare do not cover the same tasks."""


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap confidence interval ``[lo, hi]`` over ``n`` values."""

    mean: float
    lo: float
    hi: float
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def scaled(self, factor: float) -> "Interval":
        """The same interval in other units (e.g. x100 for the paper's reward scale); a percentile
        interval is equivariant under a positive scale, so this equals re-bootstrapping."""
        if factor < 0:
            raise ValueError("scaled: the factor must be >= 0 (a negative one swaps lo and hi)")
        return Interval(self.mean * factor, self.lo * factor, self.hi * factor, self.n, self.confidence)

    def format(self, digits: int = 1, *, sign: bool = False) -> str:
        """``12.5 [8.1, 17.0]``; with ``sign`` every number carries its sign (for differences)."""
        spec = f"{'+' if sign else ''}.{digits}f"
        return f"{self.mean:{spec}} [{self.lo:{spec}}, {self.hi:{spec}}]"

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class PairedDiff:
    """Mean of ``b - a`` over the tasks both evaluations share, its paired-bootstrap interval, and
    how many tasks went up (b > a), down (b < a) or stayed the same."""

    diff: Interval
    up: int
    down: int
    same: int
    n: int
    missing_in_a: tuple = ()  # tasks only b has (empty unless mismatches were allowed)
    missing_in_b: tuple = ()  # tasks only a has

    @property
    def mean(self) -> float:
        return self.diff.mean

    @property
    def lo(self) -> float:
        return self.diff.lo

    @property
    def hi(self) -> float:
        return self.diff.hi

    def to_dict(self) -> dict:
        return {
            "mean": self.diff.mean,
            "lo": self.diff.lo,
            "hi": self.diff.hi,
            "confidence": self.diff.confidence,
            "n": self.n,
            "up": self.up,
            "down": self.down,
            "same": self.same,
            "missing_in_a": [str(t) for t in self.missing_in_a],
            "missing_in_b": [str(t) for t in self.missing_in_b],
        }

    def scaled(self, factor: float) -> "PairedDiff":
        return PairedDiff(
            self.diff.scaled(factor), self.up, self.down, self.same, self.n, self.missing_in_a, self.missing_in_b
        )

    def format(self, digits: int = 1) -> str:
        """``+3.1 [+0.4, +5.9]  (up 7, down 2, same 41)``."""
        return f"{self.diff.format(digits, sign=True)}  (up {self.up}, down {self.down}, same {self.same})"

    def __str__(self) -> str:
        return self.format()


def _check_confidence(confidence: float, n_boot: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def bootstrap_means(values: np.ndarray, *, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` means of resamples of ``values`` drawn with replacement, each the size of
    ``values`` (the percentile bootstrap's distribution of the mean)."""
    n = len(values)
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    rows = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, n_boot, rows):  # blocks of resamples, each drawn and averaged at once
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def _as_array(values: Iterable[float], what: str) -> np.ndarray:
    arr = np.asarray(list(values), dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a flat list of numbers, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{what}: value {bad[0]} is {arr[bad[0]]} (every value must be a finite number)")
    return arr


def _interval(values: np.ndarray, confidence: float, n_boot: int, seed: int) -> Interval:
    means = bootstrap_means(values, n_boot=n_boot, seed=seed)
    alpha = 1 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(values.mean()), float(lo), float(hi), len(values), confidence)


def mean_ci(values: Iterable[float], *, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> Interval:
    """Mean of ``values`` with its percentile-bootstrap interval (resampling the values, i.e. the
    tasks, with replacement). One value gives a zero-width interval; no values is an error."""
    _check_confidence(confidence, n_boot)
    arr = _as_array(values, "mean_ci")
    if arr.size == 0:
        raise ValueError("mean_ci: no values (an evaluation with no scored tasks has no mean)")
    return _interval(arr, confidence, n_boot, seed)


def panel_mismatch(a: Iterable[Hashable], b: Iterable[Hashable]) -> tuple[list, list]:
    """Tasks only in ``b`` and tasks only in ``a`` (sorted by their text)."""
    a, b = set(a), set(b)
    return sorted(b - a, key=str), sorted(a - b, key=str)


def _describe(tasks: list, limit: int = 5) -> str:
    shown = ", ".join(str(t) for t in tasks[:limit])
    return shown + (f" and {len(tasks) - limit} more" if len(tasks) > limit else "")


def paired_diff(
    a: Mapping[Hashable, float],
    b: Mapping[Hashable, float],
    *,
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
    allow_mismatch: bool = False,
    names: tuple[str, str] = ("A", "B"),
) -> PairedDiff:
    """Mean of ``b[t] - a[t]`` over the tasks ``t`` of both panels, with its paired-bootstrap
    interval (the same resampled tasks for both) and the up / down / same counts.

    Two panels that differ raise PanelMismatchError naming the tasks, unless ``allow_mismatch``
    (then only the common tasks count, and the PairedDiff lists the others)."""
    _check_confidence(confidence, n_boot)
    only_b, only_a = panel_mismatch(a, b)
    if (only_a or only_b) and not allow_mismatch:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} task(s) only in {names[0]}: {_describe(only_a)}")
        if only_b:
            parts.append(f"{len(only_b)} task(s) only in {names[1]}: {_describe(only_b)}")
        raise PanelMismatchError(
            f"{names[0]} and {names[1]} were evaluated on different task panels ({'; '.join(parts)}); "
            "a paired comparison needs the same tasks in both"
        )
    common = sorted((t for t in a if t in b), key=str)  # the same resamples whatever order the mappings have
    if not common:
        raise PanelMismatchError(f"{names[0]} and {names[1]} have no task in common")
    d = _as_array((float(b[t]) - float(a[t]) for t in common), "paired_diff")
    return PairedDiff(
        diff=_interval(d, confidence, n_boot, seed),
        up=int((d > 0).sum()),
        down=int((d < 0).sum()),
        same=int((d == 0).sum()),
        n=len(d),
        missing_in_a=tuple(only_b),
        missing_in_b=tuple(only_a),
    )


def seed_averaged_diff(
    runs: Iterable[tuple[Mapping[Hashable, float], Mapping[Hashable, float]]],
    *,
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
    names: tuple[str, str] = ("A", "B"),
) -> PairedDiff:
    """``b - a`` over several training seeds evaluated on one task panel: each task's difference
    averaged over the seeds, then the paired bootstrap over tasks (`paired_diff` of the averages).

    Averaging first makes the unit of resampling the task, as in one comparison: the interval says
    how much the seed-averaged gain would move on another panel of the same size. It does not
    resample the seeds (three are too few to bootstrap); their spread is shown by the per-seed
    differences, reported next to this one. Every seed must have evaluated the same tasks."""
    runs = list(runs)
    if not runs:
        raise ValueError("seed_averaged_diff: no runs")
    tasks = set(runs[0][0])
    for i, (a, b) in enumerate(runs):
        for which, rewards in ((names[0], a), (names[1], b)):
            only_here, only_first = panel_mismatch(tasks, rewards)
            if only_here or only_first:
                raise PanelMismatchError(
                    f"seed run {i}: {which} was evaluated on another task panel than the first run's "
                    f"({len(only_here)} task(s) more: {_describe(only_here)}; {len(only_first)} fewer: "
                    f"{_describe(only_first)}); seeds are averaged task by task"
                )
    mean = lambda side: {t: sum(float(r[side][t]) for r in runs) / len(runs) for t in tasks}  # noqa: E731
    return paired_diff(mean(0), mean(1), confidence=confidence, n_boot=n_boot, seed=seed, names=names)
