"""Configs shipped with etokit: `etokit run` configs per environment and for the demos, and
accelerate launcher configs (`accelerate/`). They are package data, so an installed wheel has them:
`etokit run --config scienceworld` and `etokit train bc --accelerate-config ddp` name them without
a path. A path that exists always wins over a shipped name."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from etokit.errors import EtokitError

_KINDS = {"run": "", "accelerate": "accelerate"}


def shipped(kind: str = "run") -> dict[str, Path]:
    """Name -> file of the shipped configs of ``kind`` ("run" or "accelerate")."""
    folder = resources.files(__name__).joinpath(_KINDS[kind]) if _KINDS[kind] else resources.files(__name__)
    return {Path(f.name).stem: Path(str(f)) for f in folder.iterdir() if f.name.endswith(".yaml")}


def resolve(name_or_path: str, kind: str = "run") -> Path:
    """A config file: ``name_or_path`` itself when it exists, else the shipped config of that name
    (``scienceworld``, ``scienceworld.yaml`` and ``configs/scienceworld.yaml`` all name it)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    known = shipped(kind)
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if name in known and (len(path.parts) == 1 or path.parent.name in ("configs", "accelerate")):
        return known[name]
    raise EtokitError(
        f"config {name_or_path!r}: no such file, and etokit ships no {kind} config of that name "
        f"(shipped: {', '.join(sorted(known))})"
    )
