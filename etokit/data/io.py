"""Reading, writing and converting trajectory and pair files.

Every reader validates every row and raises the FIRST problem as a DataError naming the file, the
row (0-based) or line (1-based, for JSON syntax), the record id and the field. Writers are atomic
(temp file in the same directory, fsync, rename), so a crash never leaves a half-written file in
place of a good one; JsonlAppender appends one fsynced line per record so long stages can resume.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from etokit.data.eto_format import pair_from_eto, pair_to_eto, trajectory_from_eto, trajectory_to_eto
from etokit.data.schema import (
    PAIR_COLUMNS,
    SCHEMA_VERSION,
    TRAJECTORY_COLUMNS,
    Pair,
    RecordKind,
    Trajectory,
    pair_features,
    trajectory_features,
)
from etokit.data.validate import (
    DataError,
    Loc,
    _check_messages,
    _check_reward,
    _is_int,
    validate_pair,
    validate_trajectory,
)
from etokit.durable_io import atomic_write  # noqa: F401 - re-exported: etokit.data.atomic_write
from etokit.faults import armed, faultpoint, fire

logger = logging.getLogger(__name__)

EXTENSIONS = (".jsonl", ".json", ".parquet")
KINDS = ("trajectory", "pair")
# format name -> (kind, what identifies it, for error messages)
FORMATS = {
    "etokit-trajectory": ("trajectory", "task_id, env, messages [{role, content}], reward"),
    "etokit-pair": ("pair", "task_id, env, prompt, chosen, rejected as [{role, content}]"),
    "eto-sft": ("trajectory", "id, conversations [{from: human|gpt, value}]"),
    "eto-pairs": ("pair", "id, prompt, chosen, rejected as [{from, value}]"),
}
_CLASSES = {"trajectory": Trajectory, "pair": Pair}
_COLUMNS = {"trajectory": TRAJECTORY_COLUMNS, "pair": PAIR_COLUMNS}
_PLURAL = {"trajectory": "trajectories", "pair": "pairs"}
_REQUIRED = {
    "trajectory": ("task_id", "env", "messages", "reward"),
    "pair": ("task_id", "env", "prompt", "chosen", "rejected"),
}


@dataclass
class Records:
    """The records of one file, with the format they were read from."""

    kind: RecordKind
    records: list[Trajectory] | list[Pair]
    format: str
    path: Path

    def __len__(self) -> int:
        return len(self.records)


# ----------------------------------------------------------------------------------------- reading


def load_records(
    path: str | Path,
    kind: RecordKind | None = None,
    *,
    env: str | None = None,
    split: str = "train",
    formats: Iterable[str] | None = None,
    expert_reward: float | None = None,
) -> Records:
    """Read an etokit or official ETO file (.jsonl, .json or .parquet), auto-detecting the format.

    ``kind`` and ``formats`` (names from FORMATS) assert what the file must hold. Official rows have
    no env column: pass ``env``, or let it be inferred (see ``infer_env``: the file name, then rows
    with ``game_file``, which are ALFWorld). For etokit rows ``env`` is a check: every row must be
    of that env. ``split`` only applies to official SFT rows (etokit rows carry their own), and so
    does ``expert_reward``: the reward stated for official rows that have none (WebShop's Hub copy).
    """
    path = Path(path)
    return records_from_rows(
        _read_rows(path),
        path,
        kind,
        env=env,
        split=split,
        formats=formats,
        names=(path.stem,),
        expert_reward=expert_reward,
    )


def records_from_rows(
    rows: list[Any],
    where: Path,
    kind: RecordKind | None = None,
    *,
    env: str | None = None,
    split: str = "train",
    formats: Iterable[str] | None = None,
    names: Iterable[str] = (),
    expert_reward: float | None = None,
) -> Records:
    """Validated records of ``rows`` read from ``where`` (a file, or a Hub dataset's label), in
    whichever format the first row has; ``names`` (file stem, Hub config and split) tell an official
    file's environment when ``env`` does not."""
    if kind is not None and kind not in KINDS:
        raise DataError(f"unknown kind {kind!r}, expected one of {', '.join(KINDS)}", path=where)
    if not rows:
        raise DataError("no rows", path=where)
    fmt = _detect(rows[0])
    if fmt is None:
        raise _no_format(rows[0], where, 0)
    file_kind = FORMATS[fmt][0]
    formats = tuple(formats) if formats is not None else tuple(FORMATS)
    if fmt not in formats:
        raise DataError(f"is in format {fmt}, expected {' or '.join(formats)}", path=where)
    if kind is not None and kind != file_kind:
        raise DataError(f"holds {_PLURAL[file_kind]} (format {fmt}), expected {_PLURAL[kind]}", path=where)
    if fmt.startswith("eto-"):
        env = env or infer_env(rows, where, names)
    records = [
        _parse_row(row, fmt, i, where, env=env, split=split, expert_reward=expert_reward) for i, row in enumerate(rows)
    ]
    return Records(kind=file_kind, records=records, format=fmt, path=where)


def read_jsonl(path: str | Path, kind: RecordKind) -> list[Trajectory] | list[Pair]:
    """Strictly read an etokit JSONL file written by write_jsonl/JsonlAppender; an empty file is []."""
    path = Path(path)
    _check_exists(path, (".jsonl",))
    return _parse_jsonl(path.read_bytes(), path, kind)


def _read_rows(path: Path) -> list[Any]:
    _check_exists(path, EXTENSIONS)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt/non-Parquet file
            raise DataError(f"not a readable Parquet file ({e})", path=path) from e
    data = path.read_bytes()
    if path.suffix == ".jsonl":
        return [row for _, row in _jsonl_rows(data, path)]
    text = _decode(data, path)
    if not text.strip():
        return []
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise _json_error(e, text, path) from None
    if not isinstance(rows, list):
        raise DataError(
            f"expected a JSON list of rows at the top level, got {_kind_of(rows)} "
            "(one row per line belongs in a .jsonl file)",
            path=path,
        )
    return rows


def _check_exists(path: Path, extensions: tuple[str, ...]) -> None:
    if path.suffix not in extensions:
        raise DataError(
            f"unknown file extension {path.suffix or '(none)'!r}, expected {', '.join(extensions)}", path=path
        )
    if not path.exists():
        raise DataError("file does not exist", path=path)
    if not path.is_file():
        raise DataError("not a file", path=path)


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"not UTF-8 text: invalid byte 0x{data[e.start]:02x} at byte offset {e.start} (line {line})", path=path
        ) from None


def _json_error(e: json.JSONDecodeError, text: str, path: Path) -> DataError:
    at = f"line {e.lineno}, column {e.colno} (char {e.pos})"
    # A string left open or a parse error at the very end both mean the input stopped early.
    if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
        return DataError(
            f"truncated JSON: the file ends (after {len(text)} chars) before the value at {at} is complete", path=path
        )
    return DataError(f"not valid JSON at {at}: {e.msg}", path=path)


def _jsonl_rows(data: bytes, path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line."""
    text = _decode(data, path)
    lines = text.split("\n")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            last = n == len(lines) and not text.endswith("\n")
            why = "truncated (the file does not end with a newline)" if last else f"not valid JSON ({e.msg})"
            raise DataError(f"line {n} is {why}; each line must be one JSON object", path=path) from None
        if not isinstance(row, dict):
            raise DataError(f"line {n} is {_kind_of(row)}, expected a JSON object", path=path)
        yield n, row


def _parse_jsonl(data: bytes, path: Path, kind: RecordKind) -> list:
    fmt = f"etokit-{kind}"
    records = []
    for i, (_, row) in enumerate(_jsonl_rows(data, path)):
        found = _detect(row)
        if found != fmt:
            if found is None:
                raise _no_format(row, path, i)
            raise DataError(f"is in format {found}, expected {fmt}", path=path, row=i, record_id=_row_id(row))
        records.append(_parse_row(row, fmt, i, path))
    return records


def _detect(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    if "conversations" in row:
        return "eto-sft"
    if "messages" in row:
        return "etokit-trajectory"
    if not {"prompt", "chosen", "rejected"} & set(row):
        return None
    # Pairs: the turn shape decides; the id column decides when there are no turns to look at.
    for side in ("prompt", "chosen", "rejected"):
        turns = row.get(side)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            if "from" in turns[0] and "task_id" not in row:
                return "eto-pairs"
            if "role" in turns[0] or "task_id" in row:
                return "etokit-pair"
    return "etokit-pair" if "task_id" in row else "eto-pairs" if "id" in row else None


def _no_format(row: Any, path: Path, i: int) -> DataError:
    shape = f"keys {', '.join(map(repr, row))}" if isinstance(row, dict) else _kind_of(row)
    known = "; ".join(f"{name} ({what})" for name, (_, what) in FORMATS.items())
    return DataError(
        f"matches no known format ({shape}); expected one of: {known}", path=path, row=i, record_id=_row_id(row)
    )


# Names the official files, configs and splits use for each environment (data/sciworld_sft.json,
# split "scienceworld" of agent-eto/eto-sft-trajectory).
_ENV_NAME_WORDS = {
    "webshop": "webshop",
    "scienceworld": "scienceworld",
    "sciworld": "scienceworld",
    "alfworld": "alfworld",
}


def env_from_names(names: Iterable[str | None]) -> str | None:
    """The environment a file stem, Hub config or split names (``sciworld_sft``, ``scienceworld``), if
    exactly one is named."""
    found = {
        env
        for name in names
        if name
        for word in re.split(r"[^a-z]+", name.lower())
        for key, env in _ENV_NAME_WORDS.items()
        if word == key
    }
    return found.pop() if len(found) == 1 else None


def infer_env(rows: list, where: Path, names: Iterable[str | None] = ()) -> str:
    """The environment of official rows, which do not record it: from the file/config/split name,
    else ALFWorld when every row has a ``game_file``."""
    names = list(names)
    env = env_from_names(names)
    if env is not None:
        return env
    if all(isinstance(r, dict) and r.get("game_file") for r in rows):
        return "alfworld"
    named = ", ".join(repr(n) for n in names if n)
    raise DataError(
        "official ETO rows do not say which environment they come from, and "
        f"{'neither of ' + named + ' names one' if named else 'no name tells it'}: --env is needed "
        "(e.g. --env webshop or --env scienceworld; rows with game_file are inferred as alfworld)",
        path=where,
    )


def _parse_row(
    row: Any,
    fmt: str,
    i: int,
    path: Path,
    *,
    env: str | None = None,
    split: str = "train",
    expert_reward: float | None = None,
):
    loc = Loc(path=path, row=i, record_id=_row_id(row))
    found = _detect(row)
    if found != fmt:
        if found is None:
            raise _no_format(row, path, i)
        raise loc.error(f"is in format {found} but the file's first row is {fmt}; a file holds one format")
    if fmt == "eto-sft":
        return trajectory_from_eto(row, env=env, split=split, where=loc, expert_reward=expert_reward)
    if fmt == "eto-pairs":
        return pair_from_eto(row, env=env, where=loc)
    kind = FORMATS[fmt][0]
    record = _from_etokit_row(row, kind, loc)
    if env is not None and record.env != env:
        raise loc.error(f"env is {record.env!r}, expected {env!r} (from --env)", "env")
    return record


def _from_etokit_row(row: dict, kind: RecordKind, loc: Loc):
    missing = [k for k in _REQUIRED[kind] if k not in row]
    if missing:
        raise loc.error(f"missing required field(s) {', '.join(map(repr, missing))}")
    version = row.get("schema_version", SCHEMA_VERSION)
    if not _is_int(version) or version != SCHEMA_VERSION:
        raise loc.error(
            f"data schema version {version!r}, this etokit reads version {SCHEMA_VERSION} "
            "(a file from a newer etokit needs that etokit, or a conversion)",
            "schema_version",
        )
    unknown = [k for k in row if k not in _COLUMNS[kind] and k != "schema_version"]
    if unknown:
        raise loc.error(
            f"unknown column(s) {', '.join(map(repr, unknown))}; a {kind} row has only {', '.join(_COLUMNS[kind])}"
        )
    row = {k: v for k, v in row.items() if k != "schema_version"}
    for name in ("task_id", "env"):
        if not isinstance(row[name], str) or not row[name]:
            raise loc.error(f"expected a non-empty string, got {row[name]!r}", name)
    if isinstance(row.get("extra"), str):
        try:
            row["extra"] = json.loads(row["extra"])
        except json.JSONDecodeError as e:
            raise loc.error(f"not a valid JSON string ({e.msg})", "extra") from None
    if kind == "trajectory":
        # Trajectory() derives success/num_steps from these, so they must be sound first.
        _check_messages(row["messages"], "messages", loc)
        _check_reward(row["reward"], "reward", loc, optional=False)
        record = Trajectory.from_row(row)
        validate_trajectory(record, where=loc)
    else:
        record = Pair.from_row(row)
        validate_pair(record, where=loc)
    return record


def _row_id(row: Any) -> Any:
    if isinstance(row, dict):
        return row.get("task_id", row.get("id"))
    return None


def _kind_of(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------- datasets.Dataset


def to_dataset(records: Records | Iterable[Trajectory | Pair]):
    """A datasets.Dataset with the explicit schema of schema.py (stable across pushes)."""
    from datasets import Dataset

    records = list(records.records if isinstance(records, Records) else records)
    if not records:
        raise DataError("no rows to convert to a dataset")
    kind = _kind_of_record(records[0])
    if any(_kind_of_record(r) != kind for r in records):
        raise DataError("cannot mix trajectories and pairs in one dataset")
    features = trajectory_features() if kind == "trajectory" else pair_features()
    return Dataset.from_list([r.to_row() for r in records], features=features)


def from_dataset(ds, kind: RecordKind) -> list:
    """Records from a Dataset of etokit rows (e.g. loaded from the Hub), validated row by row."""
    if kind not in KINDS:
        raise DataError(f"unknown kind {kind!r}, expected one of {', '.join(KINDS)}")
    missing = [c for c in _REQUIRED[kind] if c not in ds.column_names]
    if missing:
        raise DataError(
            f"dataset has no column(s) {', '.join(map(repr, missing))} of a {kind} dataset "
            f"(columns: {', '.join(ds.column_names)})"
        )
    return [_from_etokit_row(row, kind, Loc(text=f"dataset row {i}")) for i, row in enumerate(ds)]


def _kind_of_record(record: Any) -> RecordKind:
    if isinstance(record, Trajectory):
        return "trajectory"
    if isinstance(record, Pair):
        return "pair"
    raise TypeError(f"expected a Trajectory or Pair, got {type(record).__name__}")


# ----------------------------------------------------------------------------------------- writing


def write_jsonl(path: str | Path, records: Records | Iterable[Trajectory | Pair]) -> None:
    """Write records as etokit JSONL atomically; each record is validated as it is written."""
    records = records.records if isinstance(records, Records) else records
    with atomic_write(path) as f:
        for i, record in enumerate(records):
            f.write(_jsonl_line(record, Loc(text=f"record {i}")))
            faultpoint("io.write-jsonl.record")


def write_json(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write plain rows as one JSON list (the official ETO file layout) atomically."""
    with atomic_write(path) as f:
        f.write(json.dumps(rows, ensure_ascii=False, indent=4).encode("utf-8"))
        f.write(b"\n")


def to_eto_rows(records: Records | Iterable[Trajectory | Pair]) -> list[dict[str, Any]]:
    """The official rows of ``records``; a record the official format cannot hold is an error
    naming its file and row."""
    path = records.path if isinstance(records, Records) else None
    records = records.records if isinstance(records, Records) else records
    rows = []
    for i, r in enumerate(records):
        try:
            rows.append(trajectory_to_eto(r) if _kind_of_record(r) == "trajectory" else pair_to_eto(r))
        except DataError as e:
            raise DataError(e.problem, path=path, row=i, record_id=r.task_id, field=e.field) from None
    return rows


def _jsonl_line(record: Trajectory | Pair, loc: Loc) -> bytes:
    if _kind_of_record(record) == "trajectory":
        validate_trajectory(record, where=loc)
    else:
        validate_pair(record, where=loc)
    try:
        line = json.dumps(record.to_row(), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise loc.error(f"cannot be written as JSON ({e})", "extra") from e
    return (line + "\n").encode("utf-8")


class JsonlAppender:
    """Appends records to an etokit JSONL file, one fsynced line each, so a stage can resume.

    Opening an existing file drops a torn last line (a crash mid-append leaves a line without its
    newline) and reads the records already there: ``existing_ids`` are the task ids present at open,
    ``ids`` also those appended since, ``existing`` the records themselves.
    """

    def __init__(self, path: str | Path, kind: RecordKind):
        if kind not in KINDS:
            raise DataError(f"unknown kind {kind!r}, expected one of {', '.join(KINDS)}")
        self.path = Path(path)
        self.kind = kind
        self.repaired_bytes = 0
        self.existing: list = []
        if self.path.exists():
            _check_exists(self.path, (".jsonl",))
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1 if data and not data.endswith(b"\n") else len(data)
            # The complete lines are validated before the torn one is dropped: a file that is not a
            # `kind` file (a wrong --out) is reported and left byte for byte as it was.
            self.existing = _parse_jsonl(data[:keep], self.path, kind)
            if keep < len(data):
                self.repaired_bytes = len(data) - keep
                with open(self.path, "r+b") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())
                logger.warning(
                    "%s: dropped a torn last line (%d bytes) left by an interrupted run", self.path, self.repaired_bytes
                )
        else:
            _prepare_new_jsonl(self.path)
        self.existing_ids = frozenset(r.task_id for r in self.existing)
        self.ids = set(self.existing_ids)
        self.count = len(self.existing)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def append(self, record: Trajectory | Pair) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: appender is closed")
        if _kind_of_record(record) != self.kind:
            raise TypeError(f"{self.path} holds {_PLURAL[self.kind]}, got a {type(record).__name__}")
        data = _jsonl_line(record, Loc(path=self.path, row=self.count, record_id=record.task_id))
        view = memoryview(data)
        if armed("io.append.torn"):  # a crash inside the write: half a line, no newline
            os.write(self._fd, view[: len(view) // 2])
            fire()
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)
        self.ids.add(record.task_id)
        self.count += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prepare_new_jsonl(path: Path) -> None:
    if path.suffix != ".jsonl":
        raise DataError(f"unknown file extension {path.suffix or '(none)'!r}, expected .jsonl", path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
