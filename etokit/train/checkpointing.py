"""A recipe's durable output: resumable state checkpoints and the final model folder.

Training is killed (preempted, crashed, stopped by hand) and resumed with ``--resume``; every write
here is fsynced and renamed into place so a kill at any instant leaves either the old checkpoint or
the whole new one, and a resumed run sees exactly the state an uninterrupted one would have had."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etokit.durable_io import fsync_dir, fsync_tree, write_synced
from etokit.faults import faultpoint

CHECKPOINTS_DIR = "checkpoints"
_COMPLETE = "COMPLETE"  # marker written last: a state dir without it was cut short by a kill
_resumed_from: Path | None = None  # the checkpoint resume() loaded in this process


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


def save_state_if_due(accelerator, cfg, step: int, total_steps: int) -> None:
    """The every-``cfg.save_steps`` checkpoint; the last step's is :func:`finish`'s."""
    if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
        save_state(accelerator, cfg.output_dir, step, keep=cfg.keep_checkpoints)


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


def finish(accelerator, model, tokenizer, cfg, step: int, *, card: dict[str, Any], commit_message: str) -> None:
    """A recipe's end: the final state checkpoint, the model + tokenizer (safetensors), trackers
    closed; then, with ``cfg.push_to``, the main process pushes the folder as ``cfg.revision``
    with a model card (``card`` plus the base model and the training data from ``cfg``)."""
    save_state(accelerator, cfg.output_dir, step, keep=cfg.keep_checkpoints)
    save_model(accelerator, model, tokenizer, cfg.output_dir)
    accelerator.end_training()
    if not (cfg.push_to and accelerator.is_main_process):
        return
    from etokit.hub.checkpoint import card_datasets, push_checkpoint

    card = {
        "base_model": cfg.model,
        "base_model_revision": cfg.model_revision,
        "datasets": card_datasets([(cfg.data, cfg.data_config, cfg.data_split, cfg.data_revision)]),
        **card,
    }
    sha = push_checkpoint(
        cfg.output_dir, cfg.push_to, cfg.revision, card=card, commit_message=commit_message, private=cfg.private
    )
    accelerator.print(f"pushed {cfg.push_to}@{cfg.revision} ({sha})")
