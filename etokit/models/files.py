"""What a local model folder must hold before etokit loads it, checked from its files alone.

etokit loads weights from safetensors only (a pickle checkpoint can run code when unpickled) and
runs a model's own Python code (``auto_map``) only when the user opts in with
``trust_remote_code``. A folder is checked before anything is loaded or written, so a training
run or an `etokit run` stage fails at once with the folder and the missing piece, not minutes in.
"""

from __future__ import annotations

import json
from pathlib import Path

from etokit.errors import EtokitError

PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Where transformers looks for a chat template, besides tokenizer_config.json's `chat_template`.
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def check_model_dir(path: str | Path, *, option: str = "--model", trust_remote_code: bool = False) -> None:
    """Raise EtokitError naming ``option`` and the folder unless it holds a config, safetensors
    weights, a tokenizer with a chat template, and no custom code (unless ``trust_remote_code``).
    A path that is not a local folder (a Hub repo id) is left to ``from_pretrained``."""
    path = Path(path)
    if not path.is_dir():
        if path.exists():
            raise EtokitError(f"{option} {path}: expected a model folder, got a file")
        return
    config = _read_json(path / "config.json", option)
    if config is None:
        raise EtokitError(f"{option} {path}: not a model folder (no config.json)")
    if not list(path.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickles:
            raise EtokitError(
                f"{option} {path}: weights only in pickle format ({', '.join(pickles[:3])}); etokit loads "
                "safetensors only: re-save them with save_pretrained(..., safe_serialization=True)"
            )
        raise EtokitError(f"{option} {path}: no model weights (no *.safetensors file)")
    if config.get("auto_map") and not trust_remote_code and config.get("model_type") not in _builtin_model_types():
        # A built-in model_type loads with transformers' own class and the auto_map is ignored.
        raise EtokitError(
            f"{option} {path}: model type {config.get('model_type')!r} needs the folder's own code "
            f"(auto_map {sorted(config['auto_map'])}); etokit runs it only with --trust-remote-code"
        )
    tokenizer_config = _read_json(path / "tokenizer_config.json", option)
    if tokenizer_config is None and not (path / "tokenizer.json").exists():
        raise EtokitError(f"{option} {path}: no tokenizer (tokenizer.json / tokenizer_config.json)")
    tokenizer_config = tokenizer_config or {}
    if not (
        tokenizer_config.get("chat_template")
        or any((path / f).exists() for f in _TEMPLATE_FILES)
        or (path / "additional_chat_templates").is_dir()
    ):
        raise EtokitError(
            f"{option} {path}: the tokenizer has no chat template; etokit renders conversations with "
            "it (set tokenizer.chat_template and save the tokenizer again)"
        )


def _builtin_model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


def _read_json(path: Path, option: str) -> dict | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EtokitError(f"{option} {path.parent}: {path.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EtokitError(f"{option} {path.parent}: {path.name} must hold a JSON object")
    return data
