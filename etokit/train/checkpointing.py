"""Pieces both training recipes (BC and DPO) share: accelerator, data, model, optimizer,
resumable state, logging. The recipes in scripts/ read top to bottom and call these."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from etokit.durable_io import fsync_dir, fsync_tree, write_synced
from etokit.errors import EtokitError
from etokit.faults import faultpoint

CHECKPOINTS_DIR = "checkpoints"
LOG_FILE = "train_log.jsonl"
_COMPLETE = "COMPLETE"  # marker written last: a state dir without it was cut short by a kill
# Set by `etokit run` (etokit.run.DRIVER_PID_ENV) for the scripts it launches: the pid to die with.
DRIVER_PID_ENV = "ETOKIT_DRIVER_PID"
_resumed_from: Path | None = None  # the checkpoint resume() loaded in this process


def run_recipe(main) -> None:
    """A recipe script's entry point: a user error is one ``Error:`` line and its exit code, never
    a traceback."""
    from etokit.train.config import redact

    try:
        main()
    except EtokitError as e:
        print(f"Error: {redact(str(e))}", file=sys.stderr)  # a token typed in the wrong place is not echoed
        sys.exit(e.exit_code)


# --- accelerator ------------------------------------------------------------------------------


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


def init_trackers(accelerator, name: str, config: dict[str, Any]) -> None:
    # TensorBoard's hparams only take scalars.
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items() if v is not None}
    accelerator.init_trackers(name, config=flat)


# --- data -------------------------------------------------------------------------------------


def load_training_records(source: str, kind: str, *, config=None, split=None, revision=None, env=None,
                          expert_reward=None) -> list:
    """Records from a local file or a Hub dataset repo, in etokit's schema or an official ETO format
    (etokit.data.sources)."""
    from etokit.data.sources import load_source, parse_source

    where = parse_source(source, config=config, split=split, revision=revision)
    return list(load_source(where, kind, env=env, expert_reward=expert_reward).records)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of an epoch: a function of (seed, epoch) only, so a resumed run
    sees exactly the batches an uninterrupted one would have."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_schedule(n: int, *, batch_size: int, grad_accum: int, world_size: int, rank: int, seed: int,
                  epochs: int) -> list[list[list[int]]]:
    """For every optimizer step, this process's micro-batches (lists of example indices).

    A step consumes ``batch_size * grad_accum * world_size`` examples; each process takes every
    ``world_size``-th of them. The tail of an epoch forms a smaller last step (examples that would
    leave some process empty-handed are dropped, at most ``world_size - 1``).
    """
    per_step = batch_size * grad_accum * world_size
    steps = []
    for epoch in range(epochs):
        order = epoch_order(n, seed, epoch)
        usable = len(order) - len(order) % world_size
        for start in range(0, usable, per_step):
            mine = order[start:min(start + per_step, usable)][rank::world_size]
            steps.append([mine[i:i + batch_size] for i in range(0, len(mine), batch_size)])
    return steps


def pad_batch(seqs, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 off the loss mask)."""
    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attn[i, :n] = 1
        labels[i, :n] = torch.tensor(s.labels)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose label is not -100 (in float32)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


# --- model ------------------------------------------------------------------------------------


def load_model_and_tokenizer(name: str, *, revision=None, trust_remote_code=False, attn_implementation=None,
                             dtype=None, option="--model"):
    """A causal LM and its tokenizer from a local folder or a Hub repo. Weights load from
    safetensors only (no pickle), and remote code runs only when explicitly allowed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from etokit.models.files import check_model_dir

    check_model_dir(name, option=option, trust_remote_code=trust_remote_code)  # a local folder, from its files
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            name, use_safetensors=True, attn_implementation=attn_implementation, dtype=dtype, **kwargs
        )
    except (OSError, ValueError) as e:  # ValueError: custom code not trusted, unknown model type, bad repo id
        raise EtokitError(f"{option} {name!r}: cannot load model (revision {revision}): {str(e).splitlines()[0]}") from None
    if tokenizer.chat_template is None:
        raise EtokitError(f"{option} {name!r}: the tokenizer has no chat template; etokit trains on rendered conversations")
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, any id will do.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def apply_lora(model, *, r: int, alpha: int, dropout: float, target_modules):
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules and target_modules != ["all-linear"] else "all-linear"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def adapt_for_training(model, cfg):
    """``cfg.lora`` adapters and ``cfg.gradient_checkpointing``, as a recipe's config asks."""
    if cfg.lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model) -> None:
    model.config.use_cache = False
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # LoRA: frozen embeddings would cut the graph


def make_optimizer_and_scheduler(model, *, learning_rate: float, weight_decay: float, scheduler: str,
                                 warmup_ratio: float, total_steps: int):
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
        model, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, scheduler=cfg.lr_scheduler,
        warmup_ratio=cfg.warmup_ratio, total_steps=total_steps,
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


def save_model(accelerator, model, tokenizer, out_dir, *, merge_lora=True) -> None:
    """save_pretrained (safetensors) + tokenizer into ``out_dir``, from the main process.
    LoRA adapters are merged so the result loads with plain ``from_pretrained``."""
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        if merge_lora and hasattr(unwrapped, "merge_and_unload"):
            unwrapped = unwrapped.merge_and_unload()
            state_dict = None
        unwrapped.config.use_cache = True
        # Written into a hidden folder, fsynced, then renamed file by file: a kill never leaves a
        # torn weight or tokenizer file in out_dir, and the weights move last, so a folder whose
        # weights are new has the config and tokenizer that go with them.
        out, tmp = Path(out_dir), Path(out_dir) / ".save.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        is_weights = lambda f: f.name.endswith((".safetensors", ".safetensors.index.json"))  # noqa: E731
        new = sorted(tmp.iterdir(), key=lambda f: (is_weights(f), f.name))
        for f in new:
            if not is_weights(f):
                os.replace(f, out / f.name)
        faultpoint("train.save-model.between-files")
        names = {f.name for f in new}
        for f in out.iterdir():  # shards of an earlier save that this one does not have
            if f.is_file() and is_weights(f) and f.name not in names:
                f.unlink()
        for f in new:
            if is_weights(f):
                os.replace(f, out / f.name)
        fsync_dir(out)
        tmp.rmdir()
    accelerator.wait_for_everyone()


# --- resumable state --------------------------------------------------------------------------


@dataclass
class TrainState:
    """Counters saved with the accelerator state (model, optimizer, scheduler, RNGs)."""

    step: int = 0
    tokens: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])


def _complete_checkpoints(root: Path) -> list[Path]:
    """checkpoints/step-N folders marked complete, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / _COMPLETE).exists()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(output_dir) -> Path | None:
    done = _complete_checkpoints(Path(output_dir) / CHECKPOINTS_DIR)
    return done[-1] if done else None


def save_state(accelerator, output_dir, step: int, keep: int = 0) -> Path:
    """accelerate ``save_state`` as checkpoints/step-N, atomically: written into a hidden
    ``.step-N.partial`` folder, fsynced, marked COMPLETE, then renamed into place, so a kill at any
    point leaves the step-N of before or the whole new one, never a folder that looks complete
    and is not. Keeps the newest ``keep`` checkpoints (0 = all)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    path = root / f"step-{step}"
    if _resumed_from == path and (path / _COMPLETE).exists():
        return path  # this process resumed from exactly this state (finish() after a kill): nothing new to save
    partial = root / f".step-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a killed save
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_tree(partial)
        faultpoint("train.save-state.before-rename")
        write_synced(partial / _COMPLETE, str(step).encode())
        old = root / f".step-{step}.old"
        if path.exists():  # a fresh (not resumed) run saving over an earlier run's step-N
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(partial, path)
        fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        if keep:
            for stale in _complete_checkpoints(root)[:-keep]:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def resume(accelerator, output_dir, state: TrainState) -> bool:
    """Load the newest complete checkpoint of ``output_dir``; False if there is none."""
    global _resumed_from
    path = latest_checkpoint(output_dir)
    if path is None:
        return False
    accelerator.load_state(str(path))
    _resumed_from = path
    accelerator.print(f"resumed from {path} (step {state.step})")
    return True


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip, step the optimizer and the LR schedule, clear the gradients; returns the grad norm
    before clipping."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def save_state_if_due(accelerator, cfg, step: int, total_steps: int) -> None:
    """The every-``cfg.save_steps`` checkpoint; the last step's is :func:`finish`'s."""
    if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
        save_state(accelerator, cfg.output_dir, step, keep=cfg.keep_checkpoints)


def finish(accelerator, model, tokenizer, cfg, step: int, *, card: dict[str, Any], commit_message: str) -> None:
    """A recipe's end: the final state checkpoint, the model + tokenizer (safetensors), trackers
    closed; then, with ``cfg.push_to``, the main process pushes the folder as ``cfg.revision``
    with a model card (``card`` plus the base model and the training data from ``cfg``)."""
    save_state(accelerator, cfg.output_dir, step, keep=cfg.keep_checkpoints)
    save_model(accelerator, model, tokenizer, cfg.output_dir)
    accelerator.end_training()
    if not (cfg.push_to and accelerator.is_main_process):
        return
    from etokit.hub.checkpoint import push_checkpoint

    card = {"base_model": cfg.model, "base_model_revision": cfg.model_revision,
            "datasets": card_datasets([(cfg.data, cfg.data_config, cfg.data_split, cfg.data_revision)]), **card}
    sha = push_checkpoint(cfg.output_dir, cfg.push_to, cfg.revision, card=card, commit_message=commit_message,
                          private=cfg.private)
    accelerator.print(f"pushed {cfg.push_to}@{cfg.revision} ({sha})")


# --- logging ----------------------------------------------------------------------------------


class MetricsLog:
    """Metrics to the accelerate trackers and to ``train_log.jsonl`` (one line per logged step,
    appended, so a resumed run continues the file)."""

    def __init__(self, accelerator, output_dir, *, resumed_at: int = 0):
        self.accelerator = accelerator
        self.path = Path(output_dir) / LOG_FILE
        if accelerator.is_main_process and self.path.exists():
            # Drop lines a killed run logged after its last checkpoint (they are about to be redone)
            # and a line it was killed in the middle of; rewritten atomically.
            from etokit.data.io import atomic_write

            kept = [line for line, row in _log_rows(self.path) if row["step"] <= resumed_at]
            with atomic_write(self.path) as f:
                f.write("".join(line + "\n" for line in kept).encode())

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.accelerator.log(metrics, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
                f.flush()
                os.fsync(f.fileno())


def read_log(output_dir) -> list[dict[str, float]]:
    path = Path(output_dir) / LOG_FILE
    return [row for _, row in _log_rows(path)] if path.exists() else []


def _log_rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of the metrics log; a torn last line (a kill mid-append) is left out."""
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise EtokitError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


class Throughput:
    """Tokens per second over the steps since the last call."""

    def __init__(self):
        self.t, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t, 1e-9)
        self.t, self.tokens = now, 0
        return rate


def reduce_sum(accelerator, value: float | int) -> float:
    """Sum of a Python number over processes."""
    t = torch.tensor(float(value), device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").item() if accelerator.num_processes > 1 else t.item()


def card_datasets(entries: Iterable[tuple[str, str | None, str | None, str | None]]) -> list[dict]:
    """Model-card data rows from (source, config, split, revision); local files are marked local."""
    return [
        {"repo": src, "config": cfg, "split": split, "revision": rev, "local": Path(src).exists()}
        for src, cfg, split, rev in entries
    ]
