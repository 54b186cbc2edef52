"""Writing files so that a crash (a kill, a power cut) leaves the old content or the new, never a
torn file: the one implementation every writer in etokit uses.

A file is written to a temp file beside it, flushed and fsynced, renamed over the target, and the
folder is fsynced so that the rename itself is on disk. Folders (saved models, state checkpoints)
are fsynced file by file with ``fsync_tree`` before the rename that publishes them.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

from etokit.faults import faultpoint


@contextlib.contextmanager
def atomic_write(path: str | Path, *, point: str | None = "io.atomic-write.before-rename") -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` only when the block completes (temp + fsync + rename +
    fsync of the folder). ``point``: the fault point the crash tests kill at, between the fsync and
    the rename (None for writers outside the pipeline, e.g. the embedded Hub's storage)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if point is not None:
            faultpoint(point)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes, *, point: str | None = "io.atomic-write.before-rename") -> None:
    with atomic_write(path, point=point) as f:
        f.write(data)


def write_synced(path: str | Path, data: bytes) -> None:
    """Write ``path`` in place and fsync it: for files inside a folder that is published as a whole
    by a rename afterwards (the folder, not the file, is what appears atomically)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under ``folder`` and the folders themselves: the rename that publishes
    them must not reach the disk before their contents do."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where the platform or filesystem cannot."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
