"""Trajectory and pair data: the records (schema), their files (etokit and official ETO formats),
validation and summaries."""

from etokit.data.eto_format import pair_from_eto, pair_to_eto, trajectory_from_eto, trajectory_to_eto
from etokit.data.io import (
    FORMATS,
    JsonlAppender,
    Records,
    atomic_write,
    from_dataset,
    load_records,
    read_jsonl,
    to_dataset,
    to_eto_rows,
    write_json,
    write_jsonl,
)
from etokit.data.schema import Pair, Trajectory
from etokit.data.stats import pair_stats, reward_histogram, trajectory_stats
from etokit.data.validate import DataError, validate_pair, validate_trajectory

__all__ = [
    "FORMATS",
    "DataError",
    "JsonlAppender",
    "Pair",
    "Records",
    "Trajectory",
    "atomic_write",
    "from_dataset",
    "load_records",
    "pair_from_eto",
    "pair_stats",
    "pair_to_eto",
    "read_jsonl",
    "reward_histogram",
    "to_dataset",
    "to_eto_rows",
    "trajectory_from_eto",
    "trajectory_stats",
    "trajectory_to_eto",
    "validate_pair",
    "validate_trajectory",
    "write_json",
    "write_jsonl",
]
