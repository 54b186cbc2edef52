"""Crash injection: named points in the code where a test can make the process die for real.

    ETOKIT_FAULTPOINT="NAME[:N][@RANK][=ACTION]"

arms one point: the N-th time (default 1) this process passes ``faultpoint("NAME")`` it performs
ACTION, only in the process whose ``RANK`` environment variable (torchrun / accelerate; 0 when
unset) equals RANK, when given. Actions:

- ``kill`` (default): SIGKILL this process, no cleanup of any kind (no ``finally``, no atexit);
- ``group``: SIGKILL this process's whole process group (a power cut for a command and its
  children, when the command was started as a group leader);
- ``parent``: SIGKILL the parent process, wait ORPHAN_GRACE_S, then, if still alive, append
  "orphan" to the once-file and carry on (an orphan test: is the child stopped with its parent?);
- ``hang``: sleep forever (a hung call, for timeouts).

Subprocesses inherit the variable, so a point inside a training script or an env worker is armed
from the command that starts them. With ``ETOKIT_FAULTPOINT_ONCE=PATH`` the point fires in at most
one process (the first to create PATH, which then holds "NAME PID"), so a restarted worker or the
other ranks do not fire again; PATH also tells a test that the point was reached.

The variable is read once, at import; when it is unset a point costs one global lookup. Points
are spread over every stage of ``etokit run`` (see tests/test_faults_crash.py for the list).

One point lives in huggingface_hub rather than in etokit: ``hub.uploaded`` fires each time
``HfApi.preupload_lfs_files`` returns, i.e. after a push uploaded its files and before the commit
that would reference them (both ``Dataset.push_to_hub`` and ``create_commit`` go through it). The
wrapper is installed only in a process where that point is armed.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
import time
from dataclasses import dataclass

ENV_VAR = "ETOKIT_FAULTPOINT"
ONCE_VAR = "ETOKIT_FAULTPOINT_ONCE"
ACTIONS = ("kill", "group", "parent", "hang")
ORPHAN_GRACE_S = 15.0  # `parent`: how long the child waits to be stopped along with its parent
_SPEC_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(?::(?P<hit>\d+))?(?:@(?P<rank>\d+))?(?:=(?P<action>\w+))?$")


@dataclass(frozen=True)
class Spec:
    name: str
    hit: int = 1
    rank: int | None = None
    action: str = "kill"


def parse(text: str | None) -> Spec | None:
    """``NAME[:N][@RANK][=ACTION]`` -> Spec; None for an empty value. A malformed value raises:
    a typo must not silently disarm a fault test."""
    if not text:
        return None
    m = _SPEC_RE.match(text.strip())
    if not m or int(m["hit"] or 1) < 1 or (m["action"] or "kill") not in ACTIONS:
        raise ValueError(
            f"{ENV_VAR}={text!r}: expected NAME[:N][@RANK][=ACTION] with N >= 1 and ACTION one of {', '.join(ACTIONS)}"
        )
    return Spec(m["name"], int(m["hit"] or 1), int(m["rank"]) if m["rank"] else None, m["action"] or "kill")


_spec: Spec | None = parse(os.environ.get(ENV_VAR))
_hits = 0
HUB_UPLOADED = "hub.uploaded"


def arm(text: str | None) -> None:
    """Arm (or, with None, disarm) a point in this process; tests that stay in-process use it."""
    global _spec, _hits
    _spec, _hits = parse(text), 0
    if _spec is not None and _spec.name == HUB_UPLOADED:
        _hook_hub_upload()


def _hook_hub_upload() -> None:
    from huggingface_hub import HfApi

    original = HfApi.preupload_lfs_files
    if getattr(original, "_etokit_faultpoint", False):
        return

    @functools.wraps(original)
    def preupload_lfs_files(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        faultpoint(HUB_UPLOADED)
        return result

    preupload_lfs_files._etokit_faultpoint = True
    HfApi.preupload_lfs_files = preupload_lfs_files


def armed(name: str) -> bool:
    """True exactly when this pass over point ``name`` is the one that must fire (it is counted).
    For points that do something first (write half a line) and then call :func:`fire`."""
    global _hits
    spec = _spec
    if spec is None or spec.name != name:
        return False
    _hits += 1
    if _hits != spec.hit:
        return False
    if spec.rank is not None and int(os.environ.get("RANK", "0")) != spec.rank:
        return False
    once = os.environ.get(ONCE_VAR)
    if once:
        try:
            fd = os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        os.write(fd, f"{name} {os.getpid()}\n".encode())
        os.fsync(fd)
        os.close(fd)
    return True


def fire() -> None:
    """Perform the armed action now."""
    action = _spec.action if _spec is not None else "kill"
    try:
        sys.stderr.write(f"etokit faultpoint {_spec.name if _spec else '?'}: {action} (pid {os.getpid()})\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    if action == "hang":
        while True:
            time.sleep(3600)
    if action == "parent":
        os.kill(os.getppid(), signal.SIGKILL)
        # A child that must die with its parent has ORPHAN_GRACE_S to do so; one still alive after
        # it says so in the once-file (for the test to see) and carries on as the orphan it is.
        time.sleep(ORPHAN_GRACE_S)
        once = os.environ.get(ONCE_VAR)
        if once:
            with open(once, "a") as f:
                f.write(f"orphan {os.getpid()} outlived its parent\n")
        return
    if action == "group":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # SIGKILL is asynchronous: never run the code after the point


def faultpoint(name: str) -> None:
    """Die here if ETOKIT_FAULTPOINT names this point (see the module doc)."""
    if _spec is not None and armed(name):
        fire()


if _spec is not None and _spec.name == HUB_UPLOADED:
    _hook_hub_upload()
