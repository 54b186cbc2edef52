"""Behavioral cloning (ETO stage 1): supervised fine-tuning on expert agent trajectories.

The loss is next-token cross-entropy on the agent's turns only (each "Thought/Action" turn and its
end-of-turn token); the instruction and the environment's observations are context. It is a
token-level mean over the whole optimizer step, across gradient accumulation and processes.

    accelerate launch -m etokit.recipes.train_bc --model ./tiny --data expert.jsonl --output-dir out/bc
    etokit train bc --accelerate-config ddp --config bc.yaml \\
        --push-to me/agent --revision bc

Defaults follow the official ETO SFT script (lr 2e-5, 3 epochs, 3% warmup, cosine); the paper
reports lr 1e-5. Kill it at any point and rerun with ``--resume``: it continues from the last
state checkpoint with the same loss sequence as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from etokit.errors import EtokitError
from etokit.faults import faultpoint
from etokit.recipes.launch import run_recipe
from etokit.train import checkpointing, data, distributed, metric_logging, model_loading, optimization
from etokit.train.config import BCConfig, parse_config, save_config
from etokit.train.tokenize import tokenize_messages


def main(argv=None) -> None:
    cfg = parse_config(BCConfig, argv)

    # --- setup: processes and seeds (nothing is written before the model and data are checked) ---
    accelerator = distributed.make_accelerator(
        cfg.output_dir, mixed_precision=cfg.mixed_precision, report_to=cfg.report_to, seed=cfg.seed
    )

    # --- model and data -----------------------------------------------------------------------
    model, tokenizer = model_loading.load_model_and_tokenizer(
        cfg.model,
        revision=cfg.model_revision,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
    )
    model = model_loading.adapt_for_training(model, cfg)  # LoRA, gradient checkpointing

    trajectories = data.load_training_records(
        cfg.data,
        "trajectory",
        config=cfg.data_config,
        split=cfg.data_split,
        revision=cfg.data_revision,
        env=cfg.data_env,
        expert_reward=cfg.expert_reward,
    )
    examples = [tokenize_messages(tokenizer, t.messages, max_length=cfg.max_length) for t in trajectories]
    truncated = sum(e.truncated for e in examples)
    examples = [e for e in examples if any(e.loss_mask)]
    if not examples:
        raise EtokitError(f"{cfg.data}: no trajectory has an assistant turn within --max-length {cfg.max_length}")
    if truncated:
        accelerator.print(f"{truncated} trajectories were longer than {cfg.max_length} tokens; trailing turns dropped")
    # The inputs are usable: the output folder starts with the resolved config.
    if accelerator.is_main_process:
        save_config(cfg, cfg.output_dir)

    schedule = data.step_schedule(
        len(examples),
        batch_size=cfg.per_device_batch_size,
        grad_accum=cfg.gradient_accumulation_steps,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        seed=cfg.seed,
        epochs=cfg.num_epochs,
    )
    total_steps = min(len(schedule), cfg.max_steps or len(schedule))

    # --- optimizer, schedule, resumable state -------------------------------------------------
    model, optimizer, scheduler, state, metrics_log = optimization.prepare_training(
        accelerator, model, cfg, total_steps, "train_bc", asdict(cfg)
    )

    # --- training loop --------------------------------------------------------------------------
    model.train()
    throughput = metric_logging.Throughput()
    bar = tqdm(total=total_steps, initial=state.step, desc="BC", disable=not accelerator.is_local_main_process)
    while state.step < total_steps:
        micro_batches = schedule[state.step]
        # Token-level mean over the whole step: every micro-batch on every process divides by the
        # step's total number of trained tokens (DDP then averages gradients over processes).
        step_tokens = distributed.reduce_sum(
            accelerator, sum(sum(examples[i].loss_mask) for mb in micro_batches for i in mb)
        )
        step_loss = 0.0
        for k, indices in enumerate(micro_batches):
            batch = {
                key: v.to(accelerator.device)
                for key, v in data.pad_batch([examples[i] for i in indices], tokenizer.pad_token_id).items()
            }
            sync = k == len(micro_batches) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss_sum = trained_loss_sum(model, batch["input_ids"], batch["labels"])
                accelerator.backward(loss_sum * accelerator.num_processes / step_tokens)
            step_loss += loss_sum.item()
            throughput.add(int(batch["attention_mask"].sum()))
        faultpoint("bc.mid-step")  # crash tests (etokit/faults.py): gradients computed, step not taken
        grad_norm = optimization.optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm)
        state.step += 1
        state.tokens += int(step_tokens)

        if state.step % cfg.logging_steps == 0 or state.step == total_steps:
            loss = distributed.reduce_sum(accelerator, step_loss) / step_tokens
            metrics = {
                "loss": loss,
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": distributed.reduce_sum(accelerator, throughput.rate()),
                "trained_tokens": state.tokens,
            }
            metrics_log.log(metrics, step=state.step)
            bar.set_postfix(loss=f"{loss:.4f}")
        checkpointing.save_state_if_due(accelerator, cfg, state.step, total_steps)
        bar.update(1)
    bar.close()

    # --- output: state, model + tokenizer (safetensors), then the Hub -------------------------
    checkpointing.finish(
        accelerator,
        model,
        tokenizer,
        cfg,
        state.step,
        commit_message=f"BC checkpoint {cfg.revision}",
        card={
            "stage": "behavioral cloning (SFT)",
            "hyperparameters": _card_hyperparameters(cfg, accelerator.num_processes, len(examples), total_steps),
        },
    )


def trained_loss_sum(model, input_ids, labels):
    """Summed next-token cross-entropy over the trained tokens (label != -100) of a RIGHT-padded
    batch, in float32.

    No attention mask: under the causal mask a real token only attends to earlier positions, all
    real, so right padding cannot reach it, and the pads' own predictions are never scored. Without
    a mask SDPA runs its fused ``is_causal`` kernel instead of materialising a ``[B, 1, T, T]`` mask
    (about 1.3x faster per step on CPU). Only positions that predict a trained token get logits
    (``logits_to_keep``), so observations and padding skip the vocabulary projection. The same sum
    as ``causal_lm_loss_sum`` over full logits (tests/test_train_bc.py)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    logits = model(input_ids=input_ids, logits_to_keep=keep).logits
    if logits.dim() == 3:  # a model that ignores a boolean logits_to_keep returns every position
        logits = logits[keep]
    return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]], reduction="sum")


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose label is not -100 (in float32)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def _card_hyperparameters(cfg: BCConfig, world_size: int, n_examples: int, steps: int) -> dict:
    hp = {
        k: v
        for k, v in asdict(cfg).items()
        if k
        in {
            "learning_rate",
            "lr_scheduler",
            "warmup_ratio",
            "num_epochs",
            "max_length",
            "weight_decay",
            "max_grad_norm",
            "seed",
            "gradient_accumulation_steps",
            "per_device_batch_size",
            "lora",
        }
    }
    hp["global_batch_size"] = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world_size
    hp["num_processes"] = world_size
    hp["train_trajectories"] = n_examples
    hp["optimizer_steps"] = steps
    if cfg.lora:
        hp.update(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)
    if cfg.expert_reward is not None:  # stated for official rows without a reward: the card says so
        hp["expert_reward_stated"] = cfg.expert_reward
    return hp


if __name__ == "__main__":
    run_recipe(main)
