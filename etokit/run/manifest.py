"""The run folder's bookkeeping: ``manifest.json`` (the config hash and each completed stage with
its outputs, written atomically), the lock held while a process runs the folder, and the clean-up
of temp files a crash left behind."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from etokit.errors import EtokitError
from etokit.faults import faultpoint

MANIFEST = "manifest.json"
RESULTS = "results.json"
LOCK = ".lock"


class Manifest:
    """``manifest.json``: the config hash and, in order, each completed stage with its outputs."""

    def __init__(self, path: Path, cfg_hash: str):
        self.path = path
        self.data: dict[str, Any] = {"config_hash": cfg_hash, "stages": []}

    @classmethod
    def open(cls, run_dir: Path, cfg_hash: str, resume: bool) -> "Manifest":
        path = run_dir / MANIFEST
        manifest = cls(path, cfg_hash)
        if path.exists():
            if not resume:
                raise EtokitError(
                    f"{run_dir} already holds a run ({MANIFEST}); pass --resume to continue it or "
                    "choose another --run-dir"
                )
            try:
                manifest.data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise EtokitError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
            if manifest.data.get("config_hash") != cfg_hash:
                raise EtokitError(
                    f"--resume: the config differs from the one {run_dir} was started with "
                    f"(hash {cfg_hash} vs {manifest.data.get('config_hash')}); see "
                    f"{run_dir / 'etokit_config.yaml'}"
                )
        return manifest

    def get(self, name: str) -> dict[str, Any] | None:
        return next((s["outputs"] for s in self.data["stages"] if s["name"] == name), None)

    def done(self, name: str, outputs: dict[str, Any], seconds: float) -> None:
        self.data["stages"].append(
            {"name": name, "outputs": outputs, "seconds": round(seconds, 2), "config_hash": self.data["config_hash"]}
        )
        write_json_atomic(self.path, self.data, point="manifest.before-rename")

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.data["stages"]]


def write_json_atomic(path: Path, data: Any, point: str | None = None) -> None:
    """Temp file, fsync, rename, fsync of the folder: a crash leaves the old file or the new one,
    and a recorded stage stays recorded after a power cut. ``point``: a fault point between the
    temp file and the rename."""
    from etokit.data.io import atomic_write

    with atomic_write(path) as f:
        f.write((json.dumps(data, indent=2, sort_keys=False) + "\n").encode())
        if point:
            f.flush()
            faultpoint(point)


_TEMP_NAME = re.compile(r"^\..+\.([0-9a-f]{8}\.tmp|tmp-\d+)$")  # atomic_write's temp files (and older ones)


class _RunLock:
    """An exclusive lock on the run folder for as long as this process runs it: two `etokit run
    --resume` on one folder would both append the same episodes. The kernel drops the lock when
    the process dies, however it dies, so a crash never leaves the folder locked."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self) -> "_RunLock":
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise EtokitError(
                f"{self.path.parent} is in use by another etokit run (pid {holder}); wait for it to "
                "finish or stop it before --resume"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # releases the lock


def _remove_stale_temps(run_dir: Path) -> None:
    """Temp files of atomic writes that a crash left before their rename: never read, only clutter.
    Only called with the run lock held, so no live writer owns them."""
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = [d for d in dirs if d != "checkpoints"]  # the trainers' own business
        for name in files:
            if _TEMP_NAME.match(name):
                Path(root, name).unlink(missing_ok=True)
