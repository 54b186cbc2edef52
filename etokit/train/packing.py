"""Turning tokenized sequences into model inputs: padded, length-bucketed or packed.

All three layouts describe the same thing to ``etokit.train.logprobs``: which token belongs to
which sequence (``seq_index``) and which tokens are scored (``targets``). A token is a target
when its loss-mask bit is set AND it is not the first token of its sequence: the first token has
no in-sequence prediction, and in a packed row the logit before it belongs to the previous
sequence, so scoring it would leak across the boundary.

Packed rows restart ``position_ids`` at 0 for every sequence. Transformers splits a row into
sequences wherever consecutive positions do not increase by exactly 1 (so 0 after 0, a
single-token sequence, is a boundary too), but only when no ``attention_mask`` and no KV cache
are passed: packed batches therefore carry ``attention_mask=None`` and the caller must run with
``use_cache=False``. ``cu_seqlens`` / ``max_seqlen`` are the same boundaries in the form
variable-length attention kernels take.

Padded rows carry no ``attention_mask`` either. They are RIGHT-padded, and under the causal mask a
real token only attends to earlier positions, which are all real: the pads after it cannot reach
it, and the pads' own outputs are never scored. Leaving the mask out lets SDPA run ``is_causal``
(PyTorch's fused flash / memory-efficient kernels, on CPU too) instead of the math path with a
materialised ``[B, 1, T, T]`` mask, which is where a padded forward's time and memory went.

Shared rows (:func:`collate_shared`) hold DPO pairs as trees: each pair's common token prefix once,
then the chosen and the rejected continuation, all pairs of a micro-batch in one row with no
padding. A prefix token can be scored for both sequences and the first token of the rejected
suffix is predicted from the prefix's last position, not from its left neighbour, so these rows
describe scoring with explicit ``scores`` (see :meth:`Batch.scoring`) instead of
``targets``/``seq_index``; the attention side is etokit.train.prefix_attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


class Tokenized(Protocol):
    input_ids: list[int]
    loss_mask: list[bool]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    position_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor | None  # always None (see the module docstring); kept for callers that pass it on
    targets: torch.Tensor | None  # [B, T] bool: token t is scored (its log-prob comes from logit t-1); None if shared
    seq_index: torch.Tensor | None  # [B, T] long: the token's sequence in this batch, -1 on padding; None if shared
    num_seqs: int
    num_tokens: int  # real tokens: the sum of the sequences' lengths (a shared prefix counts once per sequence)
    packed: bool
    cu_seqlens: torch.Tensor | None = None  # [num_segments+1] int32 over the flattened rows (packed only)
    max_seqlen: int = 0
    # Shared rows only: (start, prefix, chosen suffix, rejected suffix) lengths of each pair's tree,
    # and the explicit scoring (keep, rows, labels, owners) described in :meth:`scoring`.
    prefix_tree: tuple[tuple[int, int, int, int], ...] | None = None
    scores: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.input_ids),
            move(self.position_ids),
            move(self.attention_mask),
            move(self.targets),
            move(self.seq_index),
            self.num_seqs,
            self.num_tokens,
            self.packed,
            move(self.cu_seqlens),
            self.max_seqlen,
            self.prefix_tree,
            None if self.scores is None else tuple(move(t) for t in self.scores),
        )

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()

    def scoring(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keep, rows, labels, owners)``: ``keep`` ``[B, T]`` bool marks the positions whose
        logits are needed (each once); scored token ``n`` is ``labels[n]``, predicted by kept logit
        ``rows[n]`` (row-major order of ``keep``) and added to sequence ``owners[n]``."""
        if self.scores is not None:
            return self.scores
        keep = torch.zeros_like(self.targets)
        keep[:, :-1] = self.targets[:, 1:]  # logit at t-1 scores token t
        labels = self.input_ids[:, 1:][self.targets[:, 1:]]
        owners = self.seq_index[:, 1:][self.targets[:, 1:]]
        return keep, torch.arange(labels.numel(), device=labels.device), labels, owners


def _check(seqs: Sequence[Tokenized]) -> None:
    for i, s in enumerate(seqs):
        if len(s.input_ids) == 0:
            raise ValueError(f"sequence {i} is empty")
        if len(s.input_ids) != len(s.loss_mask):
            raise ValueError(f"sequence {i}: {len(s.input_ids)} input_ids but {len(s.loss_mask)} loss_mask bits")


def collate_padded(seqs: Sequence[Tokenized], pad_token_id: int = 0) -> Batch:
    """One row per sequence, right-padded to the longest, positions 0..T-1, no attention mask
    (right padding is invisible to real tokens under the causal mask; see the module docstring)."""
    _check(seqs)
    width = max(len(s.input_ids) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    position_ids = torch.arange(width).repeat(n, 1)
    targets = torch.zeros((n, width), dtype=torch.bool)
    seq_index = torch.full((n, width), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        L = len(s.input_ids)
        input_ids[i, :L] = torch.tensor(s.input_ids)
        targets[i, 1:L] = torch.tensor(s.loss_mask[1:], dtype=torch.bool)
        seq_index[i, :L] = i
    return Batch(
        input_ids, position_ids, None, targets, seq_index, n, sum(len(s.input_ids) for s in seqs), packed=False
    )


def collate_packed(
    seqs: Sequence[Tokenized], rows: Sequence[Sequence[int]] | None = None, pad_token_id: int = 0
) -> Batch:
    """Concatenate sequences into rows (default: all in one row) with restarting position ids.

    ``rows`` lists, per row, indices into ``seqs`` (see :func:`pack`). Rows shorter than the
    longest are padded at the end with a separate dummy segment (positions restart at 0), so the
    padding is its own sequence and is never attended to by a real token.
    """
    _check(seqs)
    rows = [list(range(len(seqs)))] if rows is None else [list(r) for r in rows]
    used = sorted(i for r in rows for i in r)
    if used != list(range(len(seqs))):
        raise ValueError("rows must use every sequence exactly once")
    lengths = [sum(len(seqs[i].input_ids) for i in r) for r in rows]
    width = max(lengths)
    B = len(rows)
    input_ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    targets = torch.zeros((B, width), dtype=torch.bool)
    seq_index = torch.full((B, width), -1, dtype=torch.long)
    seg_lens: list[int] = []
    for b, r in enumerate(rows):
        o = 0
        for i in r:
            s = seqs[i]
            L = len(s.input_ids)
            input_ids[b, o : o + L] = torch.tensor(s.input_ids)
            position_ids[b, o : o + L] = torch.arange(L)
            targets[b, o + 1 : o + L] = torch.tensor(s.loss_mask[1:], dtype=torch.bool)
            seq_index[b, o : o + L] = i
            seg_lens.append(L)
            o += L
        if o < width:
            position_ids[b, o:] = torch.arange(width - o)
            seg_lens.append(width - o)
    cu = torch.zeros(len(seg_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seg_lens, dtype=torch.int32), 0)
    return Batch(
        input_ids,
        position_ids,
        None,
        targets,
        seq_index,
        len(seqs),
        sum(len(s.input_ids) for s in seqs),
        packed=True,
        cu_seqlens=cu,
        max_seqlen=max(seg_lens),
    )


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    diff = (torch.tensor(a[:n]) != torch.tensor(b[:n])).nonzero()
    return int(diff[0]) if len(diff) else n


def shared_length(chosen: Tokenized, rejected: Tokenized) -> int:
    """Tokens a pair occupies in a shared row: the common prefix once, then both suffixes."""
    return len(chosen.input_ids) + len(rejected.input_ids) - common_prefix(chosen.input_ids, rejected.input_ids)


def collate_shared(pairs: Sequence[tuple[Tokenized, Tokenized]]) -> Batch:
    """One row holding every pair as ``[prefix | chosen suffix | rejected suffix]``, no padding.

    The prefix is the pair's longest common token prefix (at least the prompt; in ETO often the
    agent's first turns too). Positions continue from the prefix into each suffix, so every token
    has the position it has in its own sequence. Sequence ``2i`` is pair i's chosen, ``2i + 1`` its
    rejected (the order of :meth:`~etokit.train.dpo.PairTokens.flat`). A scored token inside the
    prefix has the same log-prob in both sequences: its logit is computed once and its log-prob
    counts in each sequence whose loss mask selects it (ETO sums over every agent token of a
    trajectory, shared or not). Attention: etokit.train.prefix_attention.
    """
    flat = [s for pair in pairs for s in pair]
    _check(flat)
    ids, pos, trees = [], [], []
    e_pos, e_lab, e_own = [], [], []
    start = 0
    for i, (a, b) in enumerate(pairs):
        p = common_prefix(a.input_ids, b.input_ids)
        c, r = len(a.input_ids) - p, len(b.input_ids) - p
        ta, tb = torch.tensor(a.input_ids), torch.tensor(b.input_ids)
        ids += [ta, tb[p:]]
        pos += [torch.arange(p + c), torch.arange(p, p + r)]
        for tokens, mask, owner, skip in ((ta, a.loss_mask, 2 * i, 0), (tb, b.loss_mask, 2 * i + 1, c)):
            t = torch.tensor(mask[1:], dtype=torch.bool).nonzero().flatten() + 1  # scored tokens (never the first)
            prev = t - 1
            # The logit before token t sits at row start + t - 1, past the chosen suffix for a
            # rejected token whose predecessor is itself in the rejected suffix.
            e_pos.append(start + prev + (prev >= p) * skip)
            e_lab.append(tokens[t])
            e_own.append(torch.full_like(t, owner))
        trees.append((start, p, c, r))
        start += p + c + r
    input_ids = torch.cat(ids)[None]
    position_ids = torch.cat(pos)[None]
    entry_pos = torch.cat(e_pos)
    keep = torch.zeros(start, dtype=torch.bool)
    keep[entry_pos] = True
    rows = (keep.cumsum(0) - 1)[entry_pos]
    scores = (keep[None], rows, torch.cat(e_lab), torch.cat(e_own))
    return Batch(
        input_ids,
        position_ids,
        None,
        None,
        None,
        len(flat),
        sum(len(s.input_ids) for s in flat),
        packed=True,
        prefix_tree=tuple(trees),
        scores=scores,
    )


def pack(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sequence indices into rows of at most ``max_tokens``
    tokens (a longer sequence gets a row of its own). Deterministic: ties keep input order."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(max(0, max_tokens - lengths[i]))
    return rows


def bucket(lengths: Sequence[int], max_tokens: int, max_size: int | None = None) -> list[list[int]]:
    """Group indices into micro-batches of similar length: sort by length (longest first) and cut
    whenever ``len(group) * longest`` (the padded size) would exceed ``max_tokens``.

    Longest first so an out-of-memory error, if any, happens at the first micro-batch."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        # Sorted descending, so the group's first element is its longest.
        if g and (len(g) + 1) * lengths[g[0]] <= max_tokens and (max_size is None or len(g) < max_size):
            g.append(i)
        else:
            groups.append([i])
    return groups


def chunk(n: int, size: int) -> list[list[int]]:
    """Fixed-size groups in order: the plain padded baseline's micro-batches."""
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]
