"""Environment registry: names to classes, imported lazily (each pulls a heavy simulator)."""

from __future__ import annotations

import importlib

from etokit.envs.base import Env
from etokit.errors import EtokitError

ENV_CLASSES = {
    "webshop": "etokit.envs.webshop:WebShopEnv",
    "scienceworld": "etokit.envs.scienceworld:ScienceWorldEnv",
    "alfworld": "etokit.envs.alfworld:AlfWorldEnv",
    "textworld-express": "etokit.envs.twx:TextWorldExpressEnv",
}


def env_class(name: str) -> type:
    """The class of a registered env, or of a ``"package.module:Class"`` path (plugins, tests)."""
    path = ENV_CLASSES.get(name)
    if path is None:
        if ":" not in name:
            raise EtokitError(f"unknown environment {name!r}; valid names: {', '.join(ENV_CLASSES)}")
        path = name
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise EtokitError(f"environment {name!r}: cannot import {path} ({e})") from e


def make(name: str, **options) -> Env:
    """Construct an environment by registry name (``"textworld-express"``, ...) with its options."""
    cls = env_class(name)
    try:
        return cls(**options)
    except TypeError as e:
        raise EtokitError(f"environment {name!r}: bad options {sorted(options)} ({e})") from e


def available() -> dict[str, tuple[bool, str]]:
    """For each registered env: whether it can run here, and a detail or the install hint."""
    out = {}
    for name in ENV_CLASSES:
        try:
            out[name] = env_class(name).check()
        except EtokitError as e:
            out[name] = (False, str(e))
    return out
