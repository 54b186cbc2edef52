"""ETO's DPO stage: train the policy to prefer the better of each contrastive trajectory pair.

    loss = -log sigmoid(beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))])

where a trajectory's log-prob is the SUM over its agent turns (end-of-turn tokens included), the
prompt and the environment's observations being context. No TRL: the reference log-probs are
computed once before training (cached on disk, the reference model is then dropped), and the
policy's log-probs go through a padding-light layout (length buckets on CPU, packed rows with
varlen attention on CUDA).

    accelerate launch -m etokit.recipes.train_dpo --model me/agent --model-revision bc --data me/pairs \\
        --data-revision iter-1 --output-dir out/iter-1 --push-to me/agent --revision iter-1
    etokit train dpo --num-processes 2 --config dpo.yaml

Defaults follow ETO iteration 1 (beta 0.1, lr 1e-6, 3 epochs, 10% warmup, constant_with_warmup,
32 pairs per step); later iterations use beta 0.5, lr 5e-7. Kill it at any point and rerun with
``--resume``: it continues from the last state checkpoint with the same loss sequence.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from etokit.errors import EtokitError
from etokit.faults import faultpoint
from etokit.models.files import check_model_dir
from etokit.recipes.launch import run_recipe
from etokit.train import (
    checkpointing,
    data,
    distributed,
    metric_logging,
    model_loading,
    optimization,
    prefix_attention,
    ref_cache,
)
from etokit.train.config import parse_config, save_config
from etokit.train.dpo import DPOConfig, step_batches, tokenize_pairs, train_step
from etokit.train.logprobs import default_backend, default_max_tokens, sequence_logps


def main(argv=None) -> None:
    cfg = parse_config(DPOConfig, argv)

    # --- setup: processes, trackers, resolved config next to the checkpoint -----------------------
    accelerator = distributed.make_accelerator(
        cfg.output_dir, mixed_precision=cfg.mixed_precision, report_to=cfg.report_to, seed=cfg.seed
    )
    # The budget depends on the device; the written config records the one that ran.
    cfg.max_tokens_per_micro_batch = cfg.max_tokens_per_micro_batch or default_max_tokens(accelerator.device)

    # --- model and pairs ----------------------------------------------------------------------
    model, tokenizer = model_loading.load_model_and_tokenizer(
        cfg.model,
        revision=cfg.model_revision,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
    )
    pairs = data.load_training_records(
        cfg.data, "pair", config=cfg.data_config, split=cfg.data_split, revision=cfg.data_revision, env=cfg.data_env
    )
    tokens = tokenize_pairs(tokenizer, pairs, cfg.max_length, progress=accelerator.is_local_main_process)
    if tokens.truncated:
        accelerator.print(
            f"{tokens.truncated} of {len(tokens)} pairs were longer than {cfg.max_length} tokens; "
            "trailing turns dropped (whole turns only)"
        )
    longest = max(len(s.input_ids) for s in tokens.flat())
    backend = default_backend(accelerator.device, model.config, longest) if cfg.backend == "auto" else cfg.backend
    why_not = prefix_attention.unsupported(model.config, longest)
    if backend == "shared" and why_not:
        raise EtokitError(
            f"--backend shared: model {cfg.model!r} uses {why_not}, which prefix-tree attention does "
            "not implement; use --backend bucketed"
        )
    accelerator.print(
        f"DPO on {accelerator.num_processes} process(es), {accelerator.device}, log-prob backend {backend}"
    )
    if cfg.ref_model:  # checked from its files now, loaded only if the reference cache misses
        check_model_dir(cfg.ref_model, option="--ref-model", trust_remote_code=cfg.trust_remote_code)
    # The inputs are usable: nothing was written before this point.
    if accelerator.is_main_process:
        save_config(cfg, cfg.output_dir)

    # --- reference log-probs: once, cached, before the policy is trained ------------------------
    # Without --ref-model the reference is the policy's starting weights (ETO: the explorer), scored
    # here, before LoRA adapters are attached. A LoRA iteration saves merged weights, so iteration k+1
    # starts from (and is referenced against) the explorer, not the base under disabled adapters.
    ref_name = cfg.ref_model or cfg.model
    ref_revision = cfg.ref_model_revision if cfg.ref_model else cfg.model_revision
    flat = tokens.flat()
    key = ref_cache.cache_key(
        model=ref_cache.model_fingerprint(ref_name, ref_revision),
        sequences=ref_cache.sequences_fingerprint(flat),
        tokenizer=tokenizer.name_or_path,
        max_length=cfg.max_length,
        dtype=f"{model.dtype}/{accelerator.mixed_precision}",
    )
    cache_dir = cfg.ref_cache_dir or ref_cache.default_cache_dir()

    def compute_reference() -> torch.Tensor:
        ref = model
        if cfg.ref_model:
            ref, _ = model_loading.load_model_and_tokenizer(
                cfg.ref_model,
                revision=cfg.ref_model_revision,
                trust_remote_code=cfg.trust_remote_code,
                attn_implementation=cfg.attn_implementation,
                option="--ref-model",
            )
        ref.to(accelerator.device).eval()
        # Every backend gives the same numbers: a reference the tree kernels cannot run goes unshared.
        ref_backend = (
            "bucketed" if backend == "shared" and prefix_attention.unsupported(ref.config, longest) else backend
        )
        with accelerator.autocast():
            out = sequence_logps(
                ref,
                flat,
                ref_backend,
                max_tokens=cfg.max_tokens_per_micro_batch,
                micro_batch_size=2 * cfg.micro_batch_size,
                pad_token_id=tokenizer.pad_token_id,
                device=accelerator.device,
                progress=True,
                description="reference log-probs",
            )
        del ref
        return out.view(-1, 2)

    # One process computes (and caches); the others read its file.
    if accelerator.is_main_process:
        _, hit = ref_cache.cached_reference_logps(cache_dir, key, compute_reference)
        accelerator.print(f"reference log-probs: {'cache hit' if hit else 'computed'} ({cache_dir}/{key['key']})")
    accelerator.wait_for_everyone()
    ref_logps = ref_cache.load(cache_dir, key)
    if ref_logps is None:
        raise EtokitError(
            f"reference log-prob cache {cache_dir} is not readable by every process; "
            "set --ref-cache-dir to a shared folder"
        )

    model = model_loading.adapt_for_training(model, cfg)  # LoRA, gradient checkpointing

    # --- schedule, optimizer, resumable state -------------------------------------------------
    schedule = step_batches(len(tokens), cfg.batch_size, cfg.num_epochs, cfg.seed, accelerator.num_processes)
    total_steps = min(len(schedule), cfg.max_steps or len(schedule))
    model, optimizer, scheduler, state, metrics_log = optimization.prepare_training(
        accelerator, model, cfg, total_steps, "train_dpo", {**asdict(cfg), "resolved_backend": backend}
    )

    # --- training loop --------------------------------------------------------------------------
    model.train()
    throughput = metric_logging.Throughput()
    bar = tqdm(
        total=total_steps, initial=state.step, desc=f"DPO ({backend})", disable=not accelerator.is_local_main_process
    )
    while state.step < total_steps:
        step_pairs = schedule[state.step]
        mine = step_pairs[accelerator.process_index :: accelerator.num_processes]
        sums = train_step(
            accelerator, model, tokens, ref_logps, mine, len(step_pairs), backend, cfg, tokenizer.pad_token_id
        )
        faultpoint("dpo.mid-step")  # crash tests (etokit/faults.py): gradients computed, step not taken
        grad_norm = optimization.optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm)
        state.step += 1
        throughput.add(int(sums["num_tokens"]))

        sums = {
            k: accelerator.reduce(v, reduction="sum") if accelerator.num_processes > 1 else v for k, v in sums.items()
        }
        state.tokens += int(sums.pop("num_tokens"))
        if state.step % cfg.logging_steps == 0 or state.step == total_steps:
            metrics = {k: v.item() / len(step_pairs) for k, v in sums.items()}
            metrics.update(
                learning_rate=scheduler.get_last_lr()[0],
                grad_norm=grad_norm,
                tokens_per_s=distributed.reduce_sum(accelerator, throughput.rate()),
                trained_tokens=state.tokens,
            )
            metrics_log.log(metrics, step=state.step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
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
        commit_message=f"DPO checkpoint {cfg.revision}",
        card={
            "stage": "ETO (DPO on contrastive trajectory pairs)",
            "iteration": cfg.iteration,
            "hyperparameters": {
                **{
                    k: v
                    for k, v in asdict(cfg).items()
                    if k
                    in {
                        "beta",
                        "learning_rate",
                        "lr_scheduler",
                        "warmup_ratio",
                        "num_epochs",
                        "batch_size",
                        "max_length",
                        "weight_decay",
                        "max_grad_norm",
                        "seed",
                        "lora",
                    }
                },
                "reference_model": ref_name,
                "num_processes": accelerator.num_processes,
                "train_pairs": len(tokens),
                "truncated_pairs": tokens.truncated,
                "optimizer_steps": total_steps,
            },
        },
    )


if __name__ == "__main__":
    run_recipe(main)
