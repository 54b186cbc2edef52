"""Training configs: defaults < YAML < flags, strict keys and types, resolved config on disk."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import yaml

from etokit.errors import EtokitError
from etokit.train.config import load_config, parse_config, save_config

from tests.conftest import HF_TEST_TOKEN


@dataclass
class Cfg:
    model: str = "base"
    learning_rate: float = field(default=2e-5, metadata={"gt": 0})
    num_epochs: int = 3
    warmup_ratio: float = 0.03
    lora: bool = False
    gradient_checkpointing: bool = True
    targets: list[str] = field(default_factory=lambda: ["q_proj"])
    max_steps: int | None = None
    offset: float = field(default=0.0, metadata={"min": None})
    scheduler: str = field(default="cosine", metadata={"choices": ["cosine", "constant"]})
    hub_token: str | None = None


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_defaults_then_yaml_then_flags(tmp_path):
    path = write(
        tmp_path, {"learning_rate": "1e-5", "num_epochs": 5, "lora": True, "targets": ["a", "b"], "model": "from-yaml"}
    )
    cfg = parse_config(
        Cfg,
        [
            "--config",
            path,
            "--num-epochs",
            "7",
            "--no-lora",
            "--targets",
            "x",
            "y",
            "z",
            "--max_steps=4",
            "--offset",
            "-1.5",
        ],
    )
    assert cfg.model == "from-yaml"  # YAML over default
    assert cfg.learning_rate == 1e-5  # YAML's `1e-5` string read as a float
    assert cfg.num_epochs == 7  # flag over YAML
    assert cfg.lora is False  # --no-flag over YAML true
    assert cfg.targets == ["x", "y", "z"]
    assert cfg.max_steps == 4 and cfg.offset == -1.5
    assert cfg.warmup_ratio == 0.03 and cfg.gradient_checkpointing is True  # untouched defaults
    assert parse_config(Cfg, ["--lora"]).lora is True
    assert parse_config(Cfg, ["--gradient-checkpointing", "false"]).gradient_checkpointing is False
    assert parse_config(Cfg, ["--max-steps", "none"]).max_steps is None


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--learning-rat", "1e-5"], r"unknown config key --learning-rat .*did you mean --learning-rate"),
        (["--num-epochs", "three"], r"--num-epochs.*must be an integer.*'three'"),
        (["--num-epochs", "2.5"], r"--num-epochs.*must be an integer"),
        (["--learning-rate", "nan"], r"--learning-rate.*finite"),
        (["--learning-rate", "0"], r"--learning-rate.*must be > 0"),
        (["--warmup-ratio", "-0.1"], r"--warmup-ratio.*>= 0"),
        (["--scheduler", "linear"], r"--scheduler.*one of cosine, constant"),
        (["--no-model"], r"only applies to a boolean"),
        (["--model"], r"--model needs a value"),
        (["stray"], r"unexpected argument 'stray'"),
    ],
)
def test_bad_flags_name_the_key(argv, match):
    with pytest.raises(EtokitError, match=match):
        parse_config(Cfg, argv)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"epochs": 3}, r"unknown config key 'epochs' in .*c.yaml"),
        ({"num_epochs": "3"}, r"'num_epochs' in .*c.yaml must be an integer"),
        ({"lora": "yes please"}, r"'lora' in .*c.yaml must be true or false"),
        ({"targets": "q_proj"}, r"'targets' in .*c.yaml must be a list"),
        ({"learning_rate": float("nan")}, r"'learning_rate'.*finite"),
        ("- just\n- a list\n", r"must hold a mapping"),
        ("key: [unclosed\n", r"not valid YAML"),
    ],
)
def test_bad_yaml_names_the_key_and_file(tmp_path, data, match):
    with pytest.raises(EtokitError, match=match):
        parse_config(Cfg, ["--config", write(tmp_path, data)])


def test_missing_config_file(tmp_path):
    with pytest.raises(EtokitError, match="does not exist"):
        parse_config(Cfg, ["--config", str(tmp_path / "nope.yaml")])


def test_resolved_config_round_trips_without_secrets(tmp_path):
    cfg = parse_config(Cfg, ["--num-epochs", "9", "--hub-token", HF_TEST_TOKEN, "--model", f"path/{HF_TEST_TOKEN}"])
    path = save_config(cfg, tmp_path / "out")
    text = path.read_text()
    assert HF_TEST_TOKEN not in text and "hub_token" not in text
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp file left behind
    again = load_config(Cfg, path)
    assert again.num_epochs == 9 and again.targets == cfg.targets and again.learning_rate == cfg.learning_rate


def test_help_lists_fields(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--learning-rate" in out and "--gradient-checkpointing" in out


@dataclass
class Outer:
    """A config with a section (a field holding a config class) and a key that was renamed."""

    name: str = "run"
    train: Cfg = field(default_factory=Cfg)
    RENAMED: ClassVar[dict[str, str]] = {"train_learning_rate": "train.learning_rate", "train_args": "train.*"}


def test_sections_take_yaml_mappings_and_dotted_flags(tmp_path):
    path = write(tmp_path, {"name": "x", "train": {"learning_rate": "1e-5", "num_epochs": 5, "lora": True}})
    cfg = parse_config(
        Outer,
        [
            "--config",
            path,
            "--train.num-epochs",
            "7",
            "--train.no-lora",
            "--train.targets",
            "a",
            "b",
            "--train.max_steps=4",
        ],
    )
    assert isinstance(cfg.train, Cfg) and cfg.name == "x"
    assert cfg.train.learning_rate == 1e-5  # YAML over the section's default
    assert cfg.train.num_epochs == 7  # flag over YAML, the YAML's other keys kept
    assert cfg.train.lora is False and cfg.train.targets == ["a", "b"] and cfg.train.max_steps == 4
    assert cfg.train.warmup_ratio == 0.03 and cfg.train.model == "base"  # untouched defaults
    assert parse_config(Outer, []).train == Cfg()
    # the resolved config round-trips, section included
    assert load_config(Outer, save_config(cfg, tmp_path / "out")) == cfg


@pytest.mark.parametrize(
    "argv, data, match",
    [
        (
            ["--train.learning-rat", "1e-5"],
            None,
            r"unknown config key --train.learning-rat .*did you mean --train.learning-rate",
        ),
        (["--train.num-epochs", "2.5"], None, r"--train.num-epochs.*must be an integer"),
        (["--train.learning-rate", "0"], None, r"--train.learning-rate.*must be > 0"),
        (["--train", "1"], None, r"--train is a section: set its keys as --train.NAME VALUE"),
        (["--train.no-model"], None, r"--train.no-model only applies to a boolean"),
        ([], {"train": {"epochs": 3}}, r"unknown config key 'train.epochs' in .*c.yaml"),
        ([], {"train": {"scheduler": "linear"}}, r"'train.scheduler' in .*c.yaml must be one of cosine, constant"),
        ([], {"train": 3}, r"'train' in .*c.yaml must be a mapping of Cfg keys"),
        # keys that were renamed name their new place
        (
            [],
            {"train_learning_rate": 1e-5},
            r"'train_learning_rate' in .*c.yaml is now 'train.learning_rate' "
            r"\(YAML `train: \{learning_rate: ...\}`\)",
        ),
        (
            ["--train-learning-rate", "1e-5"],
            None,
            r"--train-learning-rate on the command line is now --train.learning-rate",
        ),
        (
            [],
            {"train_args": ["--lora"]},
            r"'train_args' in .*c.yaml was removed: every option of that recipe is a key of "
            r"the 'train' section",
        ),
    ],
)
def test_bad_section_keys_name_the_key(tmp_path, argv, data, match):
    with pytest.raises(EtokitError, match=match):
        parse_config(Outer, (["--config", write(tmp_path, data)] if data is not None else []) + argv)
