"""Per-sequence SUM of assistant-token log-probs, the quantity DPO compares (ETO sums, never
averages, over every agent turn including its end-of-turn token).

Four backends compute the same numbers (tests/test_logprob_invariance.py holds them to fp32
tolerance):

- ``padded``: fixed-size micro-batches in data order, right-padded (the usual baseline).
- ``bucketed``: sequences sorted by length and cut into micro-batches under a token budget, so
  little compute goes to padding. Dense SDPA over one packed row costs O(T^2) in the row length
  and measured slower than buckets of similar-length rows.
- ``shared``: DPO pairs only (chosen, rejected, chosen, ...): each pair's common token prefix runs
  once and both continuations attend to it (etokit.train.packing.collate_shared,
  etokit.train.prefix_attention), the pairs of a micro-batch in one row without padding. The CPU
  default; ``bucketed`` gives the same numbers without sharing.
- ``packed``: sequences concatenated into one row, position ids restarting per sequence, no
  attention mask, no KV cache. On CUDA the row runs through flash-attn's varlen kernel
  (``flash_attention_2``) when flash-attn is importable, else FlexAttention with a block mask
  (transformers builds both from the restarting positions). On CPU it runs SDPA under the
  block-diagonal mask transformers derives from the same positions: exact, just not fast.

Only the logits of scored positions are materialised (``logits_to_keep`` with a boolean mask),
so observation and prompt tokens never pay for the vocabulary projection; a shared prefix's scored
positions are projected once for both sequences.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Iterator, Sequence

import torch

from etokit.faults import faultpoint
from etokit.train import prefix_attention
from etokit.train.config import BACKENDS
from etokit.train.packing import (
    Batch,
    Tokenized,
    bucket,
    chunk,
    collate_packed,
    collate_padded,
    collate_shared,
    shared_length,
)


def default_backend(device: torch.device | str, config=None, longest: int | None = None) -> str:
    """``packed`` on CUDA; ``shared`` elsewhere, unless the model ``config`` has an attention
    feature the prefix-tree kernels lack for sequences of up to ``longest`` tokens (then
    ``bucketed``). shared is exact everywhere but was only measured on CPU, so CUDA keeps its
    varlen packed rows."""
    if torch.device(device).type == "cuda":
        return "packed"
    return "bucketed" if config is not None and prefix_attention.unsupported(config, longest) else "shared"


def default_max_tokens(device: torch.device | str) -> int:
    """Token budget of one forward. On CPU, with fused attention kernels a forward's time is about
    linear in its tokens, so a bigger budget buys little speed and costs activation memory
    (bench/dpo_vs_trl.py --quick, bucketed, gradient checkpointing: peak ~245 MiB at 2048, ~320
    MiB at 4096, no faster). A shared pair longer than the budget runs alone, so with ETO's
    1-3k-token trajectories most CPU forwards hold one pair. On CUDA bigger packed rows keep the
    GPU busy."""
    return 16384 if torch.device(device).type == "cuda" else 2048


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown log-prob backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def packed_attn_implementation(device: torch.device | str) -> str | None:
    """The attention implementation the packed backend switches to, or None to keep the model's."""
    if torch.device(device).type != "cuda":
        return None
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "flex_attention"


@contextlib.contextmanager
def attention_for(model, backend: str, device: torch.device | str) -> Iterator[None]:
    """Temporarily switch ``model`` to the attention kernel the backend needs (CUDA packed, and
    shared rows everywhere). With gradient checkpointing, stay inside through ``backward``:
    checkpointed layers re-run their forward there."""
    if backend == "shared":
        wanted = prefix_attention.register()
    else:
        wanted = packed_attn_implementation(device) if backend == "packed" else None
    base = _unwrap(model)
    current = _attn_implementation(base)
    if wanted is None or current == wanted:
        yield
        return
    base.set_attn_implementation(wanted)
    try:
        yield
    finally:
        base.set_attn_implementation(current)


def _attn_implementation(model) -> str | None:
    return getattr(getattr(_unwrap(model), "config", None), "_attn_implementation", None)


def _unwrap(model):
    # DDP / accelerate wrappers expose the HF model as .module; PEFT keeps it reachable too.
    while hasattr(model, "module"):
        model = model.module
    return model


def batch_logps(model, batch: Batch) -> torch.Tensor:
    """Sum of target-token log-probs per sequence of ``batch`` -> ``[batch.num_seqs]`` float32.

    Gradients flow when grad mode is on. ``use_cache=False`` is required: with a cache
    transformers does not split a packed row into its sequences. Shared rows need the model
    inside :func:`attention_for` ``(model, "shared", ...)``."""
    keep, rows, labels, owners = batch.scoring()
    kwargs = {}
    attention_mask = batch.attention_mask
    if batch.prefix_tree is not None:
        kwargs = dict(prefix_tree=batch.prefix_tree)
        attention_mask = prefix_attention.guard_mask(batch.input_ids.device)
    elif batch.packed and "flash" in (_attn_implementation(model) or ""):
        # The varlen kernels take the boundaries directly instead of re-deriving them per layer;
        # FlexAttention (and SDPA) build their block mask from the restarting position ids.
        cu = batch.cu_seqlens.to(torch.int32)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)
    out = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=attention_mask,
        use_cache=False,
        logits_to_keep=keep,
        **kwargs,
    )
    logits = out.logits
    if logits.dim() == 3:  # a model that ignores boolean logits_to_keep returns every position
        logits = logits[keep] if logits.shape[1] == keep.shape[1] else logits.flatten(0, 1)
    if logits.shape[0] != int(keep.sum()):
        raise RuntimeError(f"expected {int(keep.sum())} scored logits, model returned {tuple(out.logits.shape)}")
    logits = logits.float()
    # One log-sum-exp per kept position, however many sequences score it (a shared prefix's tokens).
    token_logps = logits[rows, labels] - torch.logsumexp(logits, dim=-1)[rows]
    return torch.zeros(batch.num_seqs, dtype=torch.float32, device=token_logps.device).index_add(0, owners, token_logps)


def collate(seqs: Sequence[Tokenized], backend: str, pad_token_id: int = 0) -> Batch:
    """One micro-batch in the backend's layout. ``shared`` takes pairs flattened as chosen,
    rejected, chosen, ... (an even number of sequences)."""
    if check_backend(backend) == "packed":
        return collate_packed(seqs, pad_token_id=pad_token_id)
    if backend == "shared":
        return collate_shared(_pairs(seqs))
    return collate_padded(seqs, pad_token_id=pad_token_id)


def _pairs(seqs: Sequence[Tokenized]) -> list[tuple[Tokenized, Tokenized]]:
    if len(seqs) % 2:
        raise ValueError(f"the shared backend takes (chosen, rejected) pairs: got {len(seqs)} sequences")
    return list(zip(seqs[0::2], seqs[1::2]))


def plan(lengths: Sequence[int], backend: str, max_tokens: int, micro_batch_size: int) -> list[list[int]]:
    """Micro-batches (index groups) of items with the given lengths, for one backend.

    ``padded``: ``micro_batch_size`` items in order. ``bucketed``: length-sorted groups whose
    padded size fits ``max_tokens``. ``packed`` and ``shared`` (lengths are then the pairs' shared
    lengths): in-order groups whose total length fits ``max_tokens`` (an item longer than the
    budget goes alone)."""
    check_backend(backend)
    if backend == "padded":
        return chunk(len(lengths), micro_batch_size)
    if backend == "bucketed":
        return bucket(lengths, max_tokens)
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if groups and used + n <= max_tokens:
            groups[-1].append(i)
            used += n
        else:
            groups.append([i])
            used = n
    return groups


def sequence_logps(
    model,
    seqs: Sequence[Tokenized],
    backend: str = "bucketed",
    *,
    max_tokens: int = 8192,
    micro_batch_size: int = 4,
    pad_token_id: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    description: str = "log-probs",
) -> torch.Tensor:
    """Log-prob sums of every sequence (no gradient), in input order -> ``[len(seqs)]`` float32.
    With ``shared``, ``seqs`` are pairs flattened as chosen, rejected, chosen, ..."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if check_backend(backend) == "shared":
        # Planned over pairs; pair k of a group is then sequences 2k and 2k + 1.
        groups = plan([shared_length(c, r) for c, r in _pairs(seqs)], backend, max_tokens, micro_batch_size)
        groups = [[2 * k + side for k in g for side in (0, 1)] for g in groups]
    else:
        groups = plan([len(s.input_ids) for s in seqs], backend, max_tokens, micro_batch_size)
    out = torch.empty(len(seqs), dtype=torch.float32)
    bar = _progress(progress, description, len(seqs))
    # inference_mode, not no_grad: no version counters or view tracking on a pass that never backprops.
    with torch.inference_mode(), attention_for(model, backend, device), bar as p:
        task = p.add_task(description, total=len(seqs)) if p else None
        for g in groups:
            batch = collate([seqs[i] for i in g], backend, pad_token_id).to(device)
            out[g] = batch_logps(model, batch).cpu()
            faultpoint("dpo.ref-logps")  # crash tests (etokit/faults.py): mid reference pass
            if p:
                p.advance(task, len(g))
    return out


def _progress(enabled: bool, description: str, total: int):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
