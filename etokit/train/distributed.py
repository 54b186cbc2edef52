"""The processes a recipe runs as: one accelerate ``Accelerator`` per process, on GPUs or as gloo
ranks on a CPU host, each of which dies with the `etokit run` driver that started it.

Kept apart from the training steps because the same setup serves `etokit explore` and `etokit eval`
(:func:`process_state`), and because getting it wrong is silent: a CPU launch that accelerate
quietly turns into N single-process runs, or ranks that train on as orphans after their driver is
killed, both write the same files twice."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import torch

# Set by `etokit run` (etokit.run.DRIVER_PID_ENV) for the scripts it launches: the pid to die with.
DRIVER_PID_ENV = "ETOKIT_DRIVER_PID"


def resolve_mixed_precision(mode: str) -> str:
    """``auto`` means bf16 on a GPU that supports it, full precision elsewhere (CPU)."""
    if mode != "auto":
        return mode
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def multi_cpu() -> bool:
    """Launched as several processes on a host without GPUs (`accelerate launch --multi_gpu` or
    torchrun), accelerate silently makes each process a single-process run unless asked for CPU
    (gloo): every rank would then do all the work, and write the same files."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state():
    """accelerate's PartialState, with real ranks on a multi-process CPU launch (see multi_cpu)."""
    from accelerate import PartialState

    return PartialState(cpu=multi_cpu())


def make_accelerator(output_dir, *, mixed_precision="auto", report_to="tensorboard", seed=0):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    stop_with_driver()
    report_to = None if report_to in (None, "none") else report_to
    accelerator = Accelerator(
        cpu=multi_cpu(),
        mixed_precision=resolve_mixed_precision(mixed_precision),
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "runs")),
    )
    set_seed(seed)
    return accelerator


def stop_with_driver() -> None:
    """Under `etokit run`, SIGKILL this process once the driver is gone. A driver killed while it
    waits for training would otherwise leave the ranks training on as orphans, writing the same
    checkpoints as the resumed run that starts a new training. (Polled by a thread, not
    PR_SET_PDEATHSIG: a rank's parent is the launcher, which is not ours to change.)"""
    pid = os.environ.get(DRIVER_PID_ENV)
    if not pid or any(t.name == "etokit-driver-watch" for t in threading.enumerate()):
        return
    import psutil

    try:
        driver = psutil.Process(int(pid))  # remembers the start time: a reused pid is not the driver
    except (psutil.NoSuchProcess, ValueError):
        driver = None

    def watch() -> None:
        while True:
            try:
                alive = driver is not None and driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(1.0)

    threading.Thread(target=watch, name="etokit-driver-watch", daemon=True).start()


def reduce_sum(accelerator, value: float | int) -> float:
    """Sum of a Python number over processes."""
    t = torch.tensor(float(value), device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").item() if accelerator.num_processes > 1 else t.item()
