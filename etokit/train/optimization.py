"""The optimizer side of a recipe: AdamW with weight decay on matrices only, the LR schedule, one
optimizer step, and :func:`prepare_training`, which assembles them with the resumable state.

Both recipes take their steps through :func:`optimizer_step`, so a step means the same thing in BC
and DPO (clip, step, schedule, clear) and tests can watch every step a recipe takes by wrapping
that one function."""

from __future__ import annotations

import math
from typing import Any

import torch

from etokit.train.checkpointing import TrainState, resume
from etokit.train.metric_logging import MetricsLog, init_trackers


def make_optimizer_and_scheduler(
    model, *, learning_rate: float, weight_decay: float, scheduler: str, warmup_ratio: float, total_steps: int
):
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms and biases
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate,
    )
    lr_scheduler = get_scheduler(
        scheduler, optimizer, num_warmup_steps=math.ceil(warmup_ratio * total_steps), num_training_steps=total_steps
    )
    return optimizer, lr_scheduler


def prepare_training(accelerator, model, cfg, total_steps: int, tracker: str, tracker_config: dict[str, Any]):
    """AdamW + the LR schedule over ``total_steps``, wrapped by accelerate, the resumable
    :class:`TrainState` (restored from the newest checkpoint with ``cfg.resume``), the metrics log
    and the trackers. Returns ``(model, optimizer, scheduler, state, metrics_log)``."""
    optimizer, scheduler = make_optimizer_and_scheduler(
        model,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        scheduler=cfg.lr_scheduler,
        warmup_ratio=cfg.warmup_ratio,
        total_steps=total_steps,
    )
    # The scheduler stays unwrapped: accelerate's wrapper would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    if cfg.resume and not resume(accelerator, cfg.output_dir, state):
        accelerator.print(f"--resume: no checkpoint in {cfg.output_dir}, starting from scratch")
    metrics_log = MetricsLog(accelerator, cfg.output_dir, resumed_at=state.step)
    init_trackers(accelerator, tracker, tracker_config)
    return model, optimizer, scheduler, state, metrics_log


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip, step the optimizer and the LR schedule, clear the gradients; returns the grad norm
    before clipping."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)
