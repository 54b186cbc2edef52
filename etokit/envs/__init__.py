"""Environments: the :class:`Env` protocol, the registry, and subprocess workers."""

from etokit.envs.base import SPLITS, Env, Reset, Step
from etokit.envs.registry import ENV_CLASSES, available, env_class, make
from etokit.envs.worker import EnvWorker, EnvWorkerError, WorkerPool

__all__ = [
    "SPLITS",
    "Env",
    "Reset",
    "Step",
    "ENV_CLASSES",
    "available",
    "env_class",
    "make",
    "EnvWorker",
    "EnvWorkerError",
    "WorkerPool",
]
