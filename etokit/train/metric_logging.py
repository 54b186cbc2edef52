"""A recipe's metrics: to accelerate's trackers (TensorBoard by default) and to ``train_log.jsonl``
in the output folder, which the run report (etokit.report) and the tests read back.

The JSONL log follows the checkpoints: a resumed run first drops the lines logged after the
checkpoint it resumes from (they are about to be logged again), so the file of a killed and resumed
run reads like that of an uninterrupted one, with each line fsynced as it is written."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from etokit.errors import EtokitError

LOG_FILE = "train_log.jsonl"


def init_trackers(accelerator, name: str, config: dict[str, Any]) -> None:
    # TensorBoard's hparams only take scalars.
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items() if v is not None}
    accelerator.init_trackers(name, config=flat)


class MetricsLog:
    """Metrics to the accelerate trackers and to ``train_log.jsonl`` (one line per logged step,
    appended, so a resumed run continues the file)."""

    def __init__(self, accelerator, output_dir, *, resumed_at: int = 0):
        self.accelerator = accelerator
        self.path = Path(output_dir) / LOG_FILE
        if accelerator.is_main_process and self.path.exists():
            # Drop lines a killed run logged after its last checkpoint (they are about to be redone)
            # and a line it was killed in the middle of; rewritten atomically.
            from etokit.data.io import atomic_write

            kept = [line for line, row in _log_rows(self.path) if row["step"] <= resumed_at]
            with atomic_write(self.path) as f:
                f.write("".join(line + "\n" for line in kept).encode())

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.accelerator.log(metrics, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
                f.flush()
                os.fsync(f.fileno())


def read_log(output_dir) -> list[dict[str, float]]:
    path = Path(output_dir) / LOG_FILE
    return [row for _, row in _log_rows(path)] if path.exists() else []


def _log_rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of the metrics log; a torn last line (a kill mid-append) is left out."""
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise EtokitError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


class Throughput:
    """Tokens per second over the steps since the last call."""

    def __init__(self):
        self.t, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t, 1e-9)
        self.t, self.tokens = now, 0
        return rate
