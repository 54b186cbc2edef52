"""What a recipe trains on, step by step: the records, which of them each process takes at each
optimizer step, and the padded tensors they become.

The order is a pure function of (seed, epoch), not of a sampler's state, so a run resumed from a
checkpoint at step k trains on exactly the batches an uninterrupted run would have seen after step k,
on any number of processes, with nothing but the step counter saved."""

from __future__ import annotations

import torch


def load_training_records(
    source: str, kind: str, *, config=None, split=None, revision=None, env=None, expert_reward=None
) -> list:
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


def step_schedule(
    n: int, *, batch_size: int, grad_accum: int, world_size: int, rank: int, seed: int, epochs: int
) -> list[list[list[int]]]:
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
            mine = order[start : min(start + per_step, usable)][rank::world_size]
            steps.append([mine[i : i + batch_size] for i in range(0, len(mine), batch_size)])
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
