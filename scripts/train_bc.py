"""Behavioral cloning (ETO stage 1): supervised fine-tuning on expert agent trajectories.

The loss is next-token cross-entropy on the agent's turns only (each "Thought/Action" turn and its
end-of-turn token); the instruction and the environment's observations are context. It is a
token-level mean over the whole optimizer step, across gradient accumulation and processes.

    accelerate launch scripts/train_bc.py --model ./tiny --data expert.jsonl --output-dir out/bc
    accelerate launch --config_file scripts/accelerate/ddp.yaml scripts/train_bc.py --config bc.yaml \\
        --push-to me/agent --revision bc

Defaults follow the official ETO SFT script (lr 2e-5, 3 epochs, 3% warmup, cosine); the paper
reports lr 1e-5. Kill it at any point and rerun with ``--resume``: it continues from the last
state checkpoint with the same loss sequence as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from etokit.errors import EtokitError
from etokit.train import common
from etokit.train.config import parse_config, save_config
from etokit.train.tokenize import tokenize_messages


@dataclass
class BCConfig:
    model: str = field(default="", metadata={"help": "base model: local folder or Hub repo"})
    data: str = field(default="", metadata={"help": "trajectories: local .jsonl/.json/.parquet or Hub dataset repo"})
    output_dir: str = field(default="", metadata={"help": "where the model, config, logs and state checkpoints go"})
    model_revision: str | None = None
    data_config: str | None = field(default=None, metadata={"help": "Hub dataset config (e.g. the env)"})
    data_split: str = "train"
    data_revision: str | None = None
    max_length: int = field(default=4096, metadata={"gt": 0, "help": "tokens; longer trajectories lose trailing turns"})
    per_device_batch_size: int = field(default=4, metadata={"gt": 0})
    gradient_accumulation_steps: int = field(default=1, metadata={"gt": 0})
    learning_rate: float = field(default=2e-5, metadata={"gt": 0})
    weight_decay: float = 0.0
    lr_scheduler: str = field(default="cosine", metadata={"choices": ["cosine", "linear", "constant", "constant_with_warmup"]})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps"})
    num_epochs: int = field(default=3, metadata={"gt": 0})
    max_steps: int | None = field(default=None, metadata={"gt": 0, "help": "stop (and shorten the schedule) after this many steps"})
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = field(default="auto", metadata={"choices": ["auto", "no", "bf16", "fp16"]})
    gradient_checkpointing: bool = False
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, eager, flash_attention_2, ..."})
    trust_remote_code: bool = False
    lora: bool = False
    lora_r: int = field(default=16, metadata={"gt": 0})
    lora_alpha: int = field(default=32, metadata={"gt": 0})
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    save_steps: int = field(default=0, metadata={"help": "accelerate state checkpoint every N steps (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest state checkpoints kept (0: all)"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest state checkpoint in output_dir"})
    logging_steps: int = field(default=1, metadata={"gt": 0})
    report_to: str = field(default="tensorboard", metadata={"choices": ["tensorboard", "none"]})
    push_to: str | None = field(default=None, metadata={"help": "Hub model repo NAMESPACE/NAME"})
    revision: str = field(default="bc", metadata={"help": "branch + tag the checkpoint is pushed as"})
    private: bool = False

    def __post_init__(self):
        for name in ("model", "data", "output_dir"):
            if not getattr(self, name):
                raise EtokitError(f"--{name.replace('_', '-')} is required")
        if self.warmup_ratio > 1:
            raise EtokitError(f"warmup_ratio must be within [0, 1], got {self.warmup_ratio}")


def main(argv=None) -> None:
    cfg = parse_config(BCConfig, argv)

    # --- setup: processes, trackers, resolved config next to the checkpoint -----------------------
    accelerator = common.make_accelerator(cfg.output_dir, mixed_precision=cfg.mixed_precision,
                                          report_to=cfg.report_to, seed=cfg.seed)
    if accelerator.is_main_process:
        save_config(cfg, cfg.output_dir)

    # --- model and data -----------------------------------------------------------------------
    model, tokenizer = common.load_model_and_tokenizer(
        cfg.model, revision=cfg.model_revision, trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
    )
    if cfg.lora:
        model = common.apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                  target_modules=cfg.lora_target_modules)
    if cfg.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)

    trajectories = common.load_training_records(cfg.data, "trajectory", config=cfg.data_config,
                                                split=cfg.data_split, revision=cfg.data_revision)
    examples = [tokenize_messages(tokenizer, t.messages, max_length=cfg.max_length) for t in trajectories]
    truncated = sum(e.truncated for e in examples)
    examples = [e for e in examples if any(e.loss_mask)]
    if not examples:
        raise EtokitError(f"{cfg.data}: no trajectory has an assistant turn within --max-length {cfg.max_length}")
    if truncated:
        accelerator.print(f"{truncated} trajectories were longer than {cfg.max_length} tokens; trailing turns dropped")

    schedule = common.step_schedule(
        len(examples), batch_size=cfg.per_device_batch_size, grad_accum=cfg.gradient_accumulation_steps,
        world_size=accelerator.num_processes, rank=accelerator.process_index, seed=cfg.seed, epochs=cfg.num_epochs,
    )
    total_steps = min(len(schedule), cfg.max_steps or len(schedule))

    # --- optimizer, schedule, resumable state -------------------------------------------------
    optimizer, scheduler = common.make_optimizer_and_scheduler(
        model, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, scheduler=cfg.lr_scheduler,
        warmup_ratio=cfg.warmup_ratio, total_steps=total_steps,
    )
    # The scheduler stays unwrapped: accelerate's wrapper would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    state = common.TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    if cfg.resume and not common.resume(accelerator, cfg.output_dir, state):
        accelerator.print(f"--resume: no checkpoint in {cfg.output_dir}, starting from scratch")
    metrics_log = common.MetricsLog(accelerator, cfg.output_dir, resumed_at=state.step)
    common.init_trackers(accelerator, "train_bc", asdict(cfg))

    # --- training loop --------------------------------------------------------------------------
    model.train()
    throughput = common.Throughput()
    bar = tqdm(total=total_steps, initial=state.step, desc="BC", disable=not accelerator.is_local_main_process)
    while state.step < total_steps:
        micro_batches = schedule[state.step]
        # Token-level mean over the whole step: every micro-batch on every process divides by the
        # step's total number of trained tokens (DDP then averages gradients over processes).
        step_tokens = common.reduce_sum(accelerator, sum(sum(examples[i].loss_mask) for mb in micro_batches for i in mb))
        step_loss = 0.0
        for k, indices in enumerate(micro_batches):
            batch = {key: v.to(accelerator.device) for key, v in
                     common.pad_batch([examples[i] for i in indices], tokenizer.pad_token_id).items()}
            sync = k == len(micro_batches) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss_sum = common.causal_lm_loss_sum(logits, batch["labels"])
                accelerator.backward(loss_sum * accelerator.num_processes / step_tokens)
            step_loss += loss_sum.item()
            throughput.add(int(batch["attention_mask"].sum()))
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += int(step_tokens)

        if state.step % cfg.logging_steps == 0 or state.step == total_steps:
            loss = common.reduce_sum(accelerator, step_loss) / step_tokens
            metrics = {"loss": loss, "learning_rate": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm), "tokens_per_s": common.reduce_sum(accelerator, throughput.rate()),
                       "trained_tokens": state.tokens}
            metrics_log.log(metrics, step=state.step)
            bar.set_postfix(loss=f"{loss:.4f}")
        if cfg.save_steps and state.step % cfg.save_steps == 0 and state.step < total_steps:
            common.save_state(accelerator, cfg.output_dir, state.step, keep=cfg.keep_checkpoints)
        bar.update(1)
    bar.close()

    # --- output: model + tokenizer (safetensors), then the Hub --------------------------------
    common.save_state(accelerator, cfg.output_dir, state.step, keep=cfg.keep_checkpoints)
    common.save_model(accelerator, model, tokenizer, cfg.output_dir)
    accelerator.end_training()
    if cfg.push_to and accelerator.is_main_process:
        from etokit.hub.checkpoint import push_checkpoint

        sha = push_checkpoint(
            cfg.output_dir, cfg.push_to, cfg.revision,
            card={
                "stage": "behavioral cloning (SFT)",
                "base_model": cfg.model,
                "base_model_revision": cfg.model_revision,
                "datasets": common.card_datasets([(cfg.data, cfg.data_config, cfg.data_split, cfg.data_revision)]),
                "hyperparameters": _card_hyperparameters(cfg, accelerator.num_processes, len(examples), total_steps),
            },
            commit_message=f"BC checkpoint {cfg.revision}",
            private=cfg.private,
        )
        accelerator.print(f"pushed {cfg.push_to}@{cfg.revision} ({sha})")


def _card_hyperparameters(cfg: BCConfig, world_size: int, n_examples: int, steps: int) -> dict:
    hp = {k: v for k, v in asdict(cfg).items() if k in {
        "learning_rate", "lr_scheduler", "warmup_ratio", "num_epochs", "max_length", "weight_decay",
        "max_grad_norm", "seed", "gradient_accumulation_steps", "per_device_batch_size", "lora"}}
    hp["global_batch_size"] = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world_size
    hp["num_processes"] = world_size
    hp["train_trajectories"] = n_examples
    hp["optimizer_steps"] = steps
    if cfg.lora:
        hp.update(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)
    return hp


if __name__ == "__main__":
    try:
        main()
    except EtokitError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
