"""The pieces of ETO's DPO stage that scripts/train_dpo.py reads top to bottom: the config, pair
loading and tokenization, the deterministic step schedule, and one optimizer step.

Batch semantics: ``batch_size`` is the GLOBAL number of pairs per optimizer step (ETO: 32). Each
process takes an interleaved share, splits it into micro-batches by the log-prob backend's token
budget, and accumulates. Every micro-batch's loss is ``sum(pair losses) * world / batch`` so that
DDP's gradient average over processes equals the mean over the whole batch: 1 process and N
processes (and any micro-batching) take the same step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from etokit.errors import EtokitError
from etokit.train.config import DPOConfig
from etokit.train.dpo_loss import dpo_loss, dpo_metrics
from etokit.train.logprobs import attention_for, batch_logps, collate, plan
from etokit.train.packing import shared_length


# ----------------------------------------------------------------------------------------- data


@dataclass
class PairTokens:
    chosen: list  # Tokenized
    rejected: list
    shared_prefix: list[int]
    truncated: int  # pairs with a truncated side

    def __len__(self) -> int:
        return len(self.chosen)

    def flat(self) -> list:
        """[c0, r0, c1, r1, ...]: the order log-prob tensors use (view(-1, 2))."""
        return [s for pair in zip(self.chosen, self.rejected) for s in pair]


def tokenize_pairs(tokenizer, pairs: Sequence, max_length: int | None, progress: bool = False) -> PairTokens:
    """Tokenize every pair. Truncation keeps whole turns and is counted; a pair left with no
    scored token on a side would train on nothing, so it is an error naming the pair (never a
    silent drop)."""
    from etokit.train.tokenize import tokenize_pair

    chosen, rejected, shared, truncated = [], [], [], 0
    it = pairs
    if progress:
        from rich.progress import track

        it = track(pairs, description="tokenizing pairs")
    for i, p in enumerate(it):
        c, r, s = tokenize_pair(tokenizer, p, max_length=max_length)
        for side, t in (("chosen", c), ("rejected", r)):
            if not any(t.loss_mask[1:]):
                raise EtokitError(
                    f"pair {i} (task_id {p.task_id!r}): no {side} assistant token within max_length={max_length} "
                    "(the prompt alone fills it); raise --max-length or drop the pair from the data"
                )
        truncated += c.truncated or r.truncated
        chosen.append(c)
        rejected.append(r)
        shared.append(s)
    return PairTokens(chosen, rejected, shared, truncated)


# ------------------------------------------------------------------------------------- schedule


def step_batches(num_pairs: int, batch_size: int, num_epochs: int, seed: int, world_size: int = 1) -> list[list[int]]:
    """Global pair indices of every optimizer step: one seeded permutation per epoch, cut into
    batches. A last batch with fewer pairs than processes cannot be shared and is dropped (and
    counted by the caller); any other partial batch is kept."""
    from etokit.train.data import epoch_order

    steps = []
    for epoch in range(num_epochs):
        order = epoch_order(num_pairs, seed, epoch)
        for i in range(0, num_pairs, batch_size):
            b = order[i : i + batch_size]
            if len(b) >= world_size:
                steps.append(b)
    return steps


def micro_batches(tokens: PairTokens, pair_ids: Sequence[int], backend: str, cfg: DPOConfig) -> list[list[int]]:
    """This process's pairs split into forward passes (both sides of a pair always together)."""
    if backend == "bucketed":
        lengths = [2 * max(len(tokens.chosen[i].input_ids), len(tokens.rejected[i].input_ids)) for i in pair_ids]
    elif backend == "shared":
        lengths = [shared_length(tokens.chosen[i], tokens.rejected[i]) for i in pair_ids]
    else:
        lengths = [len(tokens.chosen[i].input_ids) + len(tokens.rejected[i].input_ids) for i in pair_ids]
    groups = plan(lengths, backend, cfg.max_tokens_per_micro_batch, cfg.micro_batch_size)
    return [[pair_ids[j] for j in g] for g in groups]


# ----------------------------------------------------------------------------------------- step


def train_step(
    accelerator,
    model,
    tokens: PairTokens,
    ref_logps: torch.Tensor,
    local_ids: Sequence[int],
    global_count: int,
    backend: str,
    cfg: DPOConfig,
    pad_token_id: int,
) -> dict[str, torch.Tensor]:
    """Forward/backward over this process's pairs of one step (gradients accumulate; the caller
    steps the optimizer). Returns summed metrics (reduce, then divide by ``global_count``)."""
    scale = accelerator.num_processes / global_count
    groups = micro_batches(tokens, list(local_ids), backend, cfg)
    totals: dict[str, torch.Tensor] = {}
    real_tokens = 0
    for k, g in enumerate(groups):
        seqs = [s for i in g for s in (tokens.chosen[i], tokens.rejected[i])]
        batch = collate(seqs, backend, pad_token_id).to(accelerator.device)
        # DDP all-reduces once per step: on the last micro-batch of this process. The backend's
        # kernel (tree attention for shared rows; flash-attn varlen or FlexAttention for packed
        # rows on CUDA) stays on through backward, where checkpointed layers recompute their forward.
        sync = accelerator.no_sync(model) if k < len(groups) - 1 else contextlib.nullcontext()
        with sync, attention_for(model, backend, accelerator.device):
            logps = batch_logps(model, batch).view(-1, 2)
            ref = ref_logps[g].to(logps.device)
            out = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=cfg.beta)
            accelerator.backward(out.losses.sum() * scale)
        for name, v in dpo_metrics(out, logps[:, 0], logps[:, 1]).items():
            totals[name] = totals.get(name, 0) + v.float()
        real_tokens += batch.num_tokens
    totals["num_tokens"] = torch.tensor(float(real_tokens), device=accelerator.device)
    return totals
