"""Training configs: a dataclass, an optional YAML file, command-line flags on top.

``python scripts/train_bc.py --config bc.yaml --learning-rate 1e-5 --no-gradient-checkpointing``
resolves defaults < YAML < flags. Every key is checked against the dataclass: an unknown key, a
value of the wrong type, a negative or NaN number where none makes sense is an
:class:`~etokit.errors.EtokitError` naming the key and where it came from. The resolved config is
written next to the checkpoint (without secrets) so a run can be reproduced from its output.

Field metadata understood here: ``help`` (for ``--help``), ``min`` (inclusive lower bound of a
number; defaults to 0, ``None`` for no bound), ``gt`` (strict lower bound), ``max`` / ``lt``
(inclusive / strict upper bound), ``choices``. A subclass that redeclares a field to change its
default keeps the base field's checks. Names that reach Hub URLs are checked by field name, in
every config class: ``push_to`` and ``dataset_prefix`` must be repo ids NAMESPACE/NAME, fields
ending in ``revision`` valid branch/tag/commit names (no ``..``, no leading ``/``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from etokit.data.names import check_repo_id, check_revision
from etokit.durable_io import write_bytes_atomic
from etokit.errors import EtokitError

CONFIG_FILENAME = "etokit_config.yaml"
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key)$", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


SCHEDULERS = ["constant_with_warmup", "cosine", "linear", "constant"]
# DPO's log-prob layouts (etokit.train.logprobs); named here so that configs load without torch.
BACKENDS = ("padded", "bucketed", "packed", "shared")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """The options every training recipe shares, with the defaults of ETO's SFT script (lr 2e-5,
    cosine, 3% warmup, 3 epochs). A recipe's config subclasses it, adds its own fields and
    redeclares the ones whose default differs (a redeclared field keeps its place); ``kw_only``
    lets a subclass add fields without defaults after these."""

    model: str = dataclasses.field(default="", metadata={"help": "model to train: local folder or Hub repo"})
    data: str = dataclasses.field(default="", metadata={"help": "local .jsonl/.json/.parquet file or Hub dataset repo"})
    output_dir: str = dataclasses.field(
        default="", metadata={"help": "where the model, config, logs and state checkpoints go"}
    )
    model_revision: str | None = None
    data_config: str | None = dataclasses.field(default=None, metadata={"help": "Hub dataset config"})
    data_split: str | None = dataclasses.field(
        default=None, metadata={"help": "Hub dataset split (default: the one split, the --data-env's split, or train)"}
    )
    data_env: str | None = dataclasses.field(
        default=None, metadata={"help": "environment of official ETO rows when no file, config or split name tells it"}
    )
    expert_reward: float | None = dataclasses.field(
        default=None,
        metadata={
            "min": 0,
            "max": 1,
            "help": "reward stated for official expert rows that have none (WebShop's Hub copy)",
        },
    )
    data_revision: str | None = dataclasses.field(
        default=None, metadata={"help": "Hub dataset revision (branch/tag/sha)"}
    )
    max_length: int = dataclasses.field(
        default=4096, metadata={"gt": 0, "help": "tokens per sequence; longer ones lose trailing turns"}
    )
    learning_rate: float = dataclasses.field(default=2e-5, metadata={"gt": 0})
    lr_scheduler: str = dataclasses.field(default="cosine", metadata={"choices": SCHEDULERS})
    warmup_ratio: float = dataclasses.field(default=0.03, metadata={"max": 1, "help": "fraction of steps"})
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_epochs: int = dataclasses.field(default=3, metadata={"gt": 0})
    max_steps: int | None = dataclasses.field(
        default=None, metadata={"gt": 0, "help": "stop (and shorten the schedule) after this many steps"}
    )
    seed: int = 0
    mixed_precision: str = dataclasses.field(default="auto", metadata={"choices": ["auto", "no", "bf16", "fp16"]})
    gradient_checkpointing: bool = False
    attn_implementation: str | None = dataclasses.field(
        default=None, metadata={"help": "sdpa, eager, flash_attention_2, ..."}
    )
    trust_remote_code: bool = False
    lora: bool = False
    lora_r: int = dataclasses.field(default=16, metadata={"gt": 0})
    lora_alpha: int = dataclasses.field(default=32, metadata={"gt": 0})
    lora_dropout: float = dataclasses.field(default=0.05, metadata={"lt": 1})
    lora_target_modules: list[str] = dataclasses.field(default_factory=lambda: ["all-linear"])
    save_steps: int = dataclasses.field(
        default=0, metadata={"help": "accelerate state checkpoint every N steps (0: only at the end)"}
    )
    keep_checkpoints: int = dataclasses.field(default=2, metadata={"help": "newest state checkpoints kept (0: all)"})
    resume: bool = dataclasses.field(
        default=False, metadata={"help": "continue from the newest state checkpoint in output_dir"}
    )
    logging_steps: int = dataclasses.field(default=1, metadata={"gt": 0})
    report_to: str = dataclasses.field(default="tensorboard", metadata={"choices": ["tensorboard", "none"]})
    push_to: str | None = dataclasses.field(default=None, metadata={"help": "Hub model repo NAMESPACE/NAME"})
    revision: str | None = dataclasses.field(
        default=None, metadata={"help": "branch + tag the checkpoint is pushed as"}
    )
    private: bool = False

    def __post_init__(self):
        for name in ("model", "data", "output_dir"):
            if not getattr(self, name):
                raise EtokitError(f"--{name.replace('_', '-')} is required")
        if self.warmup_ratio > 1:
            raise EtokitError(f"warmup_ratio must be within [0, 1], got {self.warmup_ratio}")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise EtokitError(f"--output-dir {self.output_dir} exists and is not a folder")


@dataclasses.dataclass(kw_only=True)
class BCConfig(TrainConfig):
    """`etokit train bc` (etokit.recipes.train_bc): behavioral cloning on expert trajectories."""

    model: str = dataclasses.field(default="", metadata={"help": "base model: local folder or Hub repo"})
    data: str = dataclasses.field(
        default="", metadata={"help": "trajectories: local .jsonl/.json/.parquet or Hub dataset repo"}
    )
    data_config: str | None = dataclasses.field(default=None, metadata={"help": "Hub dataset config (e.g. the env)"})
    per_device_batch_size: int = dataclasses.field(default=4, metadata={"gt": 0})
    gradient_accumulation_steps: int = dataclasses.field(default=1, metadata={"gt": 0})
    revision: str = dataclasses.field(default="bc", metadata={"help": "branch + tag the checkpoint is pushed as"})


@dataclasses.dataclass(kw_only=True)
class DPOConfig(TrainConfig):
    """`etokit train dpo` (etokit.recipes.train_dpo): DPO on contrastive pairs, ETO iteration 1's defaults."""

    model: str = dataclasses.field(
        default="", metadata={"help": "policy to train: local folder or Hub repo (also the reference by default)"}
    )
    data: str = dataclasses.field(
        default="", metadata={"help": "pairs: local .jsonl/.json/.parquet file or Hub dataset repo"}
    )
    ref_model: str | None = dataclasses.field(
        default=None, metadata={"help": "reference if not --model (ETO: the policy that explored)"}
    )
    ref_model_revision: str | None = None
    beta: float = dataclasses.field(default=0.1, metadata={"gt": 0, "help": "ETO: 0.1 at iteration 1, 0.5 later"})
    learning_rate: float = dataclasses.field(
        default=1e-6, metadata={"gt": 0, "help": "ETO: 1e-6 at iteration 1, 5e-7 later"}
    )
    lr_scheduler: str = dataclasses.field(default="constant_with_warmup", metadata={"choices": SCHEDULERS})
    warmup_ratio: float = dataclasses.field(default=0.1, metadata={"help": "fraction of steps"})
    batch_size: int = dataclasses.field(
        default=32, metadata={"gt": 0, "help": "pairs per optimizer step, all processes together"}
    )
    backend: str = dataclasses.field(
        default="auto",
        metadata={
            "choices": ["auto", *BACKENDS],
            "help": "log-prob layout (auto: packed on CUDA, shared on CPU: each "
            "pair's common prefix computed once; bucketed = no sharing)",
        },
    )
    max_tokens_per_micro_batch: int | None = dataclasses.field(
        default=None,
        metadata={
            "gt": 0,
            "help": "token budget of one forward (padded size for bucketed, "
            "prefix counted once for shared); default 2048 on CPU, "
            "16384 on CUDA",
        },
    )
    micro_batch_size: int = dataclasses.field(
        default=2, metadata={"gt": 0, "help": "pairs per forward with --backend padded"}
    )
    lora_dropout: float = 0.0
    ref_cache_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "reference log-prob cache (default $HF_HOME/etokit/ref-logps)"}
    )
    revision: str | None = dataclasses.field(
        default=None, metadata={"help": "branch + tag of the pushed checkpoint, e.g. iter-1"}
    )
    iteration: int | None = dataclasses.field(default=None, metadata={"help": "ETO iteration, for the model card"})

    def __post_init__(self):
        super().__post_init__()
        if self.push_to and not self.revision:
            raise EtokitError("--push-to needs --revision (e.g. iter-1): each ETO iteration is its own revision")


def parse_config(cls, argv=None):
    """Build a ``cls`` instance from ``--config FILE`` (YAML) and ``--field value`` flags.

    Flags accept ``--name`` or ``--name_with_underscores``, and ``--name=value``. Booleans:
    ``--flag`` / ``--no-flag`` / ``--flag false``. Lists: ``--items a b c``. ``-h`` prints the fields.
    A field that holds a config dataclass is a section: a YAML mapping of that class's keys, and
    flags ``--section.name value`` (``--section.no-flag``), each key checked like a top-level one.
    ``cls.RENAMED`` (optional) maps keys that are gone to their new name, for the error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    fields, hints = _schema(cls)
    if "-h" in argv or "--help" in argv:
        print(_help(cls, fields, hints))
        raise SystemExit(0)

    renamed = getattr(cls, "RENAMED", {})
    flags = _split_flags(argv, fields, hints, renamed)
    values: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    config_file = flags.pop("config", None)
    if config_file is not None:
        path = Path(config_file[0] if isinstance(config_file, list) else config_file)
        for key, value in _read_yaml(path).items():
            name = str(key).replace("-", "_")
            _check_known(name, fields, f"in {path}", renamed=renamed)
            section = section_class(hints[name])
            if section is None:
                values[name] = _check_name(
                    name, _coerce(value, hints[name], fields[name], f"{name!r} in {path}"), f" (in {path})"
                )
                continue
            if not isinstance(value, dict):
                raise EtokitError(
                    f"config key {name!r} in {path} must be a mapping of {section.__name__} keys, got {value!r}"
                )
            sub_fields, sub_hints = _schema(section)
            for sub_key, sub_value in value.items():
                sub = str(sub_key).replace("-", "_")
                _check_known(sub, sub_fields, f"in {path}", prefix=f"{name}.")
                sections.setdefault(name, {})[sub] = _check_name(
                    sub,
                    _coerce(sub_value, sub_hints[sub], sub_fields[sub], f"'{name}.{sub}' in {path}"),
                    f" (in {path})",
                )
    for name, raw in flags.items():
        section, dot, sub = name.partition(".")
        if dot:
            sub_fields, sub_hints = _schema(section_class(hints[section]))
            sections.setdefault(section, {})[sub] = _check_name(
                sub, _coerce_flag(raw, sub_hints[sub], sub_fields[sub], f"--{name.replace('_', '-')}")
            )
        else:
            values[name] = _check_name(
                name, _coerce_flag(raw, hints[name], fields[name], f"--{name.replace('_', '-')}")
            )
    for name, section_values in sections.items():
        values[name] = _build(section_class(hints[name]), section_values)
    return _build(cls, values)


def _build(cls, values: dict[str, Any]):
    try:
        return cls(**values)
    except TypeError as e:  # a required field with no default, missing from both sources
        raise EtokitError(f"{cls.__name__}: {e}") from None


def _schema(cls) -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
    """The fields of config class ``cls`` (with their base classes' checks) and their types."""
    return {f.name: _with_base_checks(cls, f) for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)


def section_class(tp):
    """The config class a field of type ``tp`` holds (a section), or None for a plain value."""
    tp, _ = _optional(tp)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def save_config(cfg, out_dir) -> Path:
    """Write the resolved config as YAML in ``out_dir`` (atomically); secrets are left out."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_config(cfg, out_dir / CONFIG_FILENAME)


def write_config(cfg, path) -> Path:
    """Write ``cfg`` as the YAML file ``path`` (atomically, secrets left out): what ``--config``
    reads back into the same config."""
    path = Path(path)
    data = redact(dataclasses.asdict(cfg))
    write_bytes_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode("utf-8"))
    return path


def load_config(cls, path):
    """Read a config written by :func:`save_config` (or any YAML) back into ``cls``."""
    return parse_config(cls, ["--config", str(path)])


def redact(data):
    """Copy of ``data`` (nested dicts/lists) without secret-named keys or token-shaped strings."""
    env_token = os.environ.get("HF_TOKEN") or None
    if isinstance(data, dict):
        return {k: redact(v) for k, v in data.items() if not (_SECRET_KEY.search(str(k)) and isinstance(v, str))}
    if isinstance(data, (list, tuple)):
        return [redact(v) for v in data]
    if isinstance(data, str):
        if env_token and env_token in data:
            data = data.replace(env_token, "***")
        return _SECRET_VALUE.sub("***", data)
    return data


# --- parsing helpers -------------------------------------------------------------------------


def _split_flags(argv, fields, hints, renamed=None) -> dict[str, Any]:
    """Group argv into {field: raw value} (a section's fields as ``section.name``); raw is a str, a
    list of str (lists), or a bool."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise EtokitError(f"unexpected argument {token!r} (options look like --name value)")
        key, eq, inline = token[2:].partition("=")
        name, negated, hint = key.replace("-", "_"), False, str
        if name != "config":
            name, negated, hint = _flag_field(name, fields, hints, renamed)
        i += 1
        kind = _base_type(hint)
        if negated:
            if kind is not bool or eq:
                raise EtokitError(f"--{key} only applies to a boolean option")
            out[name] = False
        elif eq:
            out[name] = inline
        elif kind is bool:
            if i < len(argv) and argv[i].lower() in _TRUE | _FALSE:
                out[name] = argv[i]
                i += 1
            else:
                out[name] = True
        elif kind is list:
            items = []
            while i < len(argv) and not argv[i].startswith("--"):
                items.append(argv[i])
                i += 1
            out[name] = items
        else:
            if i >= len(argv) or (argv[i].startswith("--") and not _is_number(argv[i])):
                raise EtokitError(f"option --{key} needs a value")
            out[name] = argv[i]
            i += 1
    return out


def _with_base_checks(cls, f):
    """``f`` with the metadata of the same field in the base classes underneath its own (a recipe
    that redeclares ``lora_dropout`` only to change its default keeps its bounds)."""
    metadata: dict[str, Any] = {}
    for base in reversed(cls.__mro__):
        base_field = getattr(base, "__dataclass_fields__", {}).get(f.name)
        if base_field is not None:
            metadata.update(base_field.metadata)
    if metadata == dict(f.metadata):
        return f
    merged = dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=metadata)
    merged.name, merged.type = f.name, f.type
    return merged


def _check_name(name: str, value, source: str = ""):
    """Repo ids and revisions reach Hub URLs and cache paths: refuse traversal and malformed names.
    The error names the option as a flag, plus the file it came from (``source``)."""
    check = (
        check_repo_id
        if name in ("push_to", "dataset_prefix")
        else check_revision
        if name.endswith("revision")
        else None
    )
    if value is None or check is None:
        return value
    try:
        return check(value, f"--{name.replace('_', '-')}")
    except EtokitError as e:
        raise EtokitError(f"{e}{source}") from None


def _flag_field(name, fields, hints, renamed) -> tuple[str, bool, Any]:
    """(field name, negated, type) of flag ``--name``: ``--no-name`` negates a boolean, and
    ``--section.name`` / ``--section.no-name`` name a field of a section."""
    section, dot, sub = name.partition(".")
    if dot and section in fields and section_class(hints[section]) is not None:
        sub_fields, sub_hints = _schema(section_class(hints[section]))
        negated = sub not in sub_fields and sub.startswith("no_") and sub[3:] in sub_fields
        sub = sub[3:] if negated else sub
        _check_known(sub, sub_fields, "on the command line", flag=True, prefix=f"{section}.")
        return f"{section}.{sub}", negated, sub_hints[sub]
    negated = name not in fields and name.startswith("no_") and name[3:] in fields
    name = name[3:] if negated else name
    _check_known(name, fields, "on the command line", flag=True, renamed=renamed)
    if section_class(hints[name]) is not None:
        raise EtokitError(
            f"--{name.replace('_', '-')} is a section: set its keys as --{name.replace('_', '-')}.NAME VALUE"
        )
    return name, negated, hints[name]


def _check_known(name, fields, where, flag=False, renamed=None, prefix="") -> None:
    if name in fields:
        return
    show = (lambda key: f"--{key.replace('_', '-')}") if flag else repr
    new = (renamed or {}).get(name)
    if new is not None and new.endswith(".*"):
        section = new[:-2]
        raise EtokitError(
            f"config key {show(prefix + name)} {where} was removed: every option of that recipe is a key "
            f"of the {section!r} section now (YAML `{section}: {{save_steps: 1}}`, flag "
            f"--{section}.save-steps 1)"
        )
    if new is not None:
        section, _, sub = new.partition(".")
        raise EtokitError(
            f"config key {show(prefix + name)} {where} is now {show(new)} (YAML `{section}: {{{sub}: ...}}`)"
        )
    close = difflib.get_close_matches(name, list(fields), n=1)
    hint = f" (did you mean {show(prefix + close[0])}?)" if close else ""
    raise EtokitError(f"unknown config key {show(prefix + name)} {where}{hint}")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise EtokitError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise EtokitError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EtokitError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def _optional(tp) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _base_type(tp):
    tp, _ = _optional(tp)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return list
    if origin is Literal:
        return str
    return tp


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _coerce_flag(raw, tp, field, where):
    """Flags arrive as strings; turn them into YAML-like values, then check them like YAML."""
    inner, optional = _optional(tp)
    if isinstance(raw, bool):
        return _coerce(raw, tp, field, where)
    if typing.get_origin(inner) in (list, tuple):
        items = raw if isinstance(raw, list) else [s for s in raw.split(",") if s]
        (item_tp,) = typing.get_args(inner)[:1] or (str,)
        return [_coerce(_scalar_from_text(s, item_tp), item_tp, field, where) for s in items]
    if optional and raw.lower() in ("none", "null"):
        return None
    return _coerce(_scalar_from_text(raw, inner), tp, field, where)


def _scalar_from_text(text: str, tp):
    if tp is bool:
        low = text.lower()
        return True if low in _TRUE else False if low in _FALSE else text
    if tp is int:
        try:
            return int(text)
        except ValueError:
            return text
    if tp is float:
        try:
            return float(text)
        except ValueError:
            return text
    return text


def _coerce(value, tp, field, where):
    inner, optional = _optional(tp)
    if value is None:
        if optional:
            return None
        raise EtokitError(f"config key {where} cannot be null")
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise EtokitError(f"config key {where} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise EtokitError(f"config key {where} must be a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(inner)[:1] or (str,)
        return [_coerce(v, item_tp, field, where) for v in value]
    if inner is bool:
        if not isinstance(value, bool):
            raise EtokitError(f"config key {where} must be true or false, got {value!r}")
        return value
    if inner in (int, float):
        if isinstance(value, str) and inner is float:
            # YAML 1.1 reads `2e-5` (no dot) as a string.
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, int) if inner is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            raise EtokitError(
                f"config key {where} must be {'an integer' if inner is int else 'a number'}, got {value!r}"
            )
        value = inner(value)
        _check_range(value, field, where)
        return value
    if inner is str:
        if not isinstance(value, str):
            raise EtokitError(f"config key {where} must be a string, got {value!r}")
        choices = field.metadata.get("choices")
        if choices and value not in choices:
            raise EtokitError(f"config key {where} must be one of {', '.join(choices)}; got {value!r}")
        return value
    if inner is dict or typing.get_origin(inner) is dict:
        if not isinstance(value, dict):
            raise EtokitError(f"config key {where} must be a mapping, got {value!r}")
        return value
    return value


def _check_range(value, field, where) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise EtokitError(f"config key {where} must be a finite number, got {value}")
    # A strict bound replaces the default one, so -1 for a `gt: 0` key reads "must be > 0".
    lo = field.metadata.get("min", None if "gt" in field.metadata else 0)
    if lo is not None and value < lo:
        raise EtokitError(f"config key {where} must be >= {lo}, got {value}")
    gt = field.metadata.get("gt")
    if gt is not None and value <= gt:
        raise EtokitError(f"config key {where} must be > {gt}, got {value}")
    hi = field.metadata.get("max")
    if hi is not None and value > hi:
        raise EtokitError(f"config key {where} must be <= {hi}, got {value}")
    lt = field.metadata.get("lt")
    if lt is not None and value >= lt:
        raise EtokitError(f"config key {where} must be < {lt}, got {value}")


def _help(cls, fields, hints) -> str:
    lines = [
        f"{cls.__name__} options (defaults < --config FILE.yaml < flags):",
        "  --config FILE  YAML file of the options below",
    ]
    for name, f in fields.items():
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        )
        tp = getattr(hints[name], "__name__", str(hints[name]))
        lines.append(f"  --{name.replace('_', '-')} ({tp}, default {default!r})  {f.metadata.get('help', '')}".rstrip())
    return "\n".join(lines)
