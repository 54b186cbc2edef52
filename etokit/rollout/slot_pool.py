"""Generation that keeps each episode's KV cache in a slot of its own for the whole episode, and
reads the prefix that episodes share once for all of them (the default engine on CPU).

Why: the in-place engine (etokit/rollout/kv_reuse.py) rebuilds a left-padded batch cache at every
step, copying every row's kept K/V into it; it re-encodes each reply from its text; it pads every
row's new tokens and keys to the longest row's; and at every decoded token each row reads its own
copy of the instruction and 1-shot example. Decoding at an evaluation's contexts is bound by
reading the cache: 32 rows x 2,500 positions x 46 KB per position (SmolLM2-135M) is 3.7 GB per
token step, at about 10 GB/s on this project's CPU.

Here:
- A slot holds its episode's own K/V (``[layers, key|value, kv_heads, capacity, head_dim]``),
  appended in place and kept across steps; a row that ends a reply simply leaves the next forward.
  A step prefills only the tokens past the longest common prefix of its new prompt with what the
  slot holds, and that includes the reply the slot generated: its K/V were computed as each token
  was decoded. Where the chat template's re-tokenization of the reply differs from the sampled
  tokens, only the matching part is kept (the common prefix ends there).
- Episodes that share a prefix (the instruction and the 1-shot example) borrow one read-only copy
  of its K/V: prefilled once when they start together, or copied once from a running episode's
  slot when a new episode starts alone.
- The new tokens of every row run packed in ONE row, without padding, through the projections and
  the MLP; attention runs per episode with PyTorch's fused CPU flash kernel and no mask: the shared
  prefix once per group of rows that borrow it (one read of its K/V for all of them), then each row's
  own keys, the partial results merged by their log-sum-exps (the decomposition flash attention
  itself uses across key blocks; etokit/train/prefix_attention.py does the same for DPO pairs).

Exactness: every query attends to exactly its own tokens at their own positions, as in a full
re-encoding; only the floating-point order differs (blockwise softmax, a reply's K/V from its
decode step rather than a prefill). Greedy trajectories can therefore differ from the other engines'
where two next tokens are within rounding of each other; bench/generate.py counts where they do.
``keep_reply=False`` drops the generated K/V after each reply and prefills the reply again, as the
other engines do. ``ExploreConfig(kv_cache="in-place")`` / ``"concat"`` keep the previous engines.

CPU only (the fused kernel that returns the log-sum-exp is PyTorch's CPU flash attention), for
decoders whose attention is plain causal softmax over one growing cache per layer: see
``slots_unsupported``; elsewhere the in-place engine runs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from etokit.rollout.kv_reuse import Decoder, kv_reuse_unsupported
from etokit.train.prefix_attention import guard_mask, unsupported

ATTN_IMPLEMENTATION = "etokit_slots"
_CPU_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# A new episode borrows a running episode's tokens (a copy made once, then shared) only when they
# share at least this many: below it, prefilling them costs less than the copy and the extra group.
MIN_SHARED = 16


def slots_unsupported(model) -> str | None:
    """Why this model cannot run on the slot engine (None when it can)."""
    reason = kv_reuse_unsupported(model) or unsupported(model.config.get_text_config())
    if reason:
        return reason
    if _CPU_FWD is None:
        return "a PyTorch without the CPU flash-attention kernel"
    if next(model.parameters()).device.type != "cpu":
        return "a model on a GPU (the slot engine uses the CPU flash kernel)"
    return None


class _Store:
    """K/V of a run of positions for every layer, appended in place; grows by doubling."""

    def __init__(self, shape: tuple[int, int, int], capacity: int, dtype, device):
        layers, heads, dim = shape
        self.kv = torch.empty((layers, 2, heads, capacity, dim), dtype=dtype, device=device)
        self.n = 0  # positions filled

    def reserve(self, extra: int) -> None:
        capacity = self.kv.shape[3]
        if self.n + extra > capacity:
            layers, _, heads, _, dim = self.kv.shape
            grown = self.kv.new_empty((layers, 2, heads, max(self.n + extra, 2 * capacity), dim))
            grown[:, :, :, : self.n] = self.kv[:, :, :, : self.n]
            self.kv = grown


@dataclass(eq=False)
class _Prefix:
    """Read-only K/V of ``ids``, borrowed by the episodes that start with them."""

    ids: list[int]
    store: _Store


@dataclass(eq=False)
class _Slot:
    ids: list[int]  # every token the episode's K/V cover: ``prefix.ids[:m]`` then its own tokens
    own: _Store
    prefix: _Prefix | None = None
    m: int = 0  # tokens of the prefix this episode uses
    prompt_len: int = 0  # the last prompt's length (keep_reply=False truncates back to it)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens (``n >= m``)."""
        del self.ids[n:]
        self.own.n = n - self.m


@dataclass
class _Segment:
    """``n`` new tokens of one store, at packed-row offset ``start``, written after its ``past``
    positions; they attend to ``prefix.store[:m]`` (if any) and to the store's first ``past + n``."""

    store: _Store
    past: int
    n: int
    start: int
    prefix: _Prefix | None = None
    m: int = 0


class SlotBatch:
    """What one forward computes: its segments, and the rows grouped by the prefix they borrow.
    Reaches the attention function as the ``slot_batch`` forward kwarg."""

    def __init__(self, segments: list[_Segment]):
        self.segments = segments
        groups: dict[tuple[int, int], tuple[_Prefix, int, list[int]]] = {}
        for i, s in enumerate(segments):
            if s.prefix is not None and s.m:
                groups.setdefault((id(s.prefix), s.m), (s.prefix, s.m, []))[2].append(i)
        self.groups = list(groups.values())


def _merge(a, b):
    """Two attention results over disjoint key sets -> the result over their union."""
    (oa, la), (ob, lb) = a, b
    total = torch.logaddexp(la, lb)
    out = oa.to(total.dtype) * (la - total).exp_().unsqueeze(-1)
    out.addcmul_(ob.to(total.dtype), (lb - total).exp_().unsqueeze(-1))
    return out.to(oa.dtype), total


def _attend(q, k, v, causal: bool, scale):
    """Flash attention of ``q`` ``[1, H, n, D]`` over ``k``/``v`` ``[1, Hkv, L, D]`` -> (output,
    log-sum-exp). Without a causal mask the ``H / Hkv`` query heads that share a K/V head are
    stacked as extra queries of that head, so the kernel reads each K/V head once instead of once
    per query head (decoding is bound by reading the cache)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if causal or heads == kv_heads:
        return _CPU_FWD(q, k, v, 0.0, causal, scale=scale)
    _, _, n, dim = q.shape
    out, lse = _CPU_FWD(q.reshape(1, kv_heads, heads // kv_heads * n, dim), k, v, 0.0, False, scale=scale)
    return out.reshape(1, heads, n, dim), lse.reshape(1, heads, n)


def slot_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention-interface function for one packed row: ``query`` ``[1, H, T, D]``,
    ``key``/``value`` ``[1, Hkv, T, D]`` (the new tokens) -> ``([1, T, H, D], None)``."""
    batch: SlotBatch | None = kwargs.get("slot_batch")
    if batch is None:
        raise RuntimeError(f"attention {ATTN_IMPLEMENTATION!r} needs the slot_batch forward argument")
    if dropout:
        raise ValueError("the slot engine does not implement attention dropout")
    layer = module.layer_idx
    q, k, v = query[0], key[0], value[0]
    for s in batch.segments:  # every new K/V first: rows read a prefix written in this same forward
        s.store.kv[layer, 0, :, s.past : s.past + s.n] = k[:, s.start : s.start + s.n]
        s.store.kv[layer, 1, :, s.past : s.past + s.n] = v[:, s.start : s.start + s.n]
    segments = batch.segments
    shared: list = [None] * len(segments)
    for prefix, m, rows in batch.groups:
        # All the rows that borrow prefix[:m] in one call: the prefix's K/V are read once.
        qs = torch.cat([q[:, segments[i].start : segments[i].start + segments[i].n] for i in rows], 1)
        kv = prefix.store.kv[layer, :, :, :m]
        o, lse = _attend(qs[None], kv[0][None], kv[1][None], False, scaling)
        at = 0
        for i in rows:
            n = segments[i].n
            shared[i] = (o[:, :, at : at + n], lse[:, :, at : at + n])
            at += n
    out = query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))
    for i, s in enumerate(segments):
        qs = q[None, :, s.start : s.start + s.n]
        keys = s.store.kv[layer, 0, :, : s.past + s.n][None]
        values = s.store.kv[layer, 1, :, : s.past + s.n][None]
        if s.n == 1 or s.past == 0:  # one query sees every key; a block from position 0 is causal
            own = _attend(qs, keys, values, s.n > 1, scaling)
        else:  # the kept keys whole, the new block causally (a square: top-left alignment is right)
            old = _attend(qs, keys[:, :, : s.past], values[:, :, : s.past], False, scaling)
            new = _attend(qs, keys[:, :, s.past :], values[:, :, s.past :], True, scaling)
            own = _merge(old, new)
        o = _merge(shared[i], own)[0] if shared[i] is not None else own[0]
        out[0, s.start : s.start + s.n] = o[0].transpose(0, 1)
    return out, None


class SlotDecoder(Decoder):
    """The slot engine (see the module docstring); ``keys`` name each row's episode."""

    def __init__(self, model, *, keep_reply: bool = True, **options):
        from transformers import AttentionInterface

        super().__init__(model, **options)
        AttentionInterface.register(ATTN_IMPLEMENTATION, slot_attention)
        self.keep_reply = keep_reply
        text = model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.shape = (text.num_hidden_layers, kv_heads, head_dim)
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
        self.slots: dict[Hashable, _Slot] = {}
        self.prefixes: list[_Prefix] = []

    # ---------------------------------------------------------------------------------- placing rows

    def _store(self, positions: int) -> _Store:
        return _Store(self.shape, positions, self.dtype, self.device)

    def _place(self, prompts: Sequence[list[int]], keys: Sequence[Hashable]) -> list[tuple[_Segment, list[int]]]:
        """Each row's slot trimmed to what its prompt shares with it (a new slot for a new
        episode), and the prefill forward: (segment, its tokens) for each shared prefix to compute,
        then one per row, in row order."""
        self.slots = {k: self.slots[k] for k in keys if k in self.slots}  # episodes that ended are freed
        segments: list[tuple[_Segment, list[int]]] = []
        fresh = []
        for i, (ids, key) in enumerate(zip(prompts, keys)):
            slot = self.slots.get(key)
            if slot is not None:
                # At least one token of each prompt is prefilled: its logits give the first new token.
                keep = min(len(os.path.commonprefix([slot.ids, ids])), len(ids) - 1)
                if keep >= slot.m:
                    slot.truncate(keep)
                    continue
                del self.slots[key]  # diverged inside the borrowed prefix: start the episode over
            fresh.append(i)
        self._borrow([prompts[i] for i in fresh], [keys[i] for i in fresh], segments)
        for ids, key in zip(prompts, keys):
            slot = self.slots[key]
            new = ids[len(slot.ids) :]
            self.reused += len(slot.ids)
            slot.own.reserve(len(new) + self.max_new_tokens)
            segments.append((_Segment(slot.own, slot.own.n, len(new), 0, slot.prefix, slot.m), new))
            slot.ids.extend(new)
            self.prefilled += len(new)
            slot.prompt_len = len(ids)
        return segments

    def _borrow(self, prompts: list[list[int]], keys: list[Hashable], segments: list) -> None:
        """New slots for new episodes, each borrowing the longest shared prefix it can: a kept
        prefix, one it shares with the episodes starting with it (prefilled once, in this forward),
        or a copy of a running episode's tokens."""
        if not prompts:
            return
        live = {id(s.prefix) for s in self.slots.values()}
        # The prefixes running episodes borrow, and the latest (the next new episodes may share it).
        self.prefixes = [p for p in self.prefixes[:-1] if id(p) in live] + self.prefixes[-1:]
        donors = list(self.slots.values())  # running episodes only: every token of theirs has its K/V

        def best_prefix(ids):
            found = max(
                ((len(os.path.commonprefix([p.ids, ids])), p) for p in self.prefixes),
                default=(0, None),
                key=lambda x: x[0],  # on a tie the first kept prefix (prefixes themselves do not compare)
            )
            return found if found[0] else (0, None)

        if len(prompts) > 1:
            common = os.path.commonprefix(prompts)
            common = common[: min(map(len, prompts)) - 1]
            if len(common) >= MIN_SHARED and len(common) > max(best_prefix(ids)[0] for ids in prompts):
                prefix = _Prefix(list(common), self._store(len(common)))
                segments.append((_Segment(prefix.store, 0, len(common), 0), prefix.ids))
                self.prefilled += len(common)
                self.prefixes.append(prefix)
        for ids, key in zip(prompts, keys):
            n, prefix = best_prefix(ids)
            donor_n, donor = max(
                ((len(os.path.commonprefix([s.ids, ids])), s) for s in donors),
                default=(0, None),
                key=lambda x: x[0],
            )
            if donor is not None and donor_n >= max(n + MIN_SHARED, MIN_SHARED):
                prefix, n = self._freeze(donor, min(donor_n, len(ids) - 1)), min(donor_n, len(ids) - 1)
            n = min(n, len(ids) - 1)
            own = self._store(len(ids) - n + self.max_new_tokens)
            self.slots[key] = _Slot(ids=list(ids[:n]), own=own, prefix=prefix if n else None, m=n)

    def _freeze(self, slot: _Slot, n: int) -> _Prefix:
        """A read-only copy of a running episode's first ``n`` tokens, for new episodes to share."""
        store = self._store(n)
        m = min(n, slot.m)
        if m:
            store.kv[:, :, :, :m] = slot.prefix.store.kv[:, :, :, :m]
        store.kv[:, :, :, m:n] = slot.own.kv[:, :, :, : n - m]
        store.n = n
        prefix = _Prefix(list(slot.ids[:n]), store)
        self.prefixes.append(prefix)
        return prefix

    # ---------------------------------------------------------------------------------- forwards

    def _forward(self, segments: list[_Segment], tokens: list[list[int]]) -> torch.Tensor:
        """One packed forward of ``tokens[i]`` for ``segments[i]``; logits at each segment's last
        token (a segment with no logits wanted is a shared prefix: listed, and ignored by callers)."""
        ids, positions, last, at = [], [], [], 0
        for s, t in zip(segments, tokens):
            s.start = at
            base = s.m + s.past  # positions continue after the borrowed prefix and the kept tokens
            ids.extend(t)
            positions.extend(range(base, base + s.n))
            at += s.n
            last.append(at - 1)
        batch = SlotBatch(segments)
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            attention_mask=guard_mask(self.device),
            use_cache=False,
            logits_to_keep=torch.tensor(last, device=self.device),
            slot_batch=batch,
        )
        for s in segments:
            s.store.n = s.past + s.n
        return out.logits[0].float()

    def generate(
        self, prompts: Sequence[list[int]], keys: Sequence[Hashable], seeds: Sequence[int] | None = None
    ) -> list[list[int]]:
        """``seeds`` (sampling only): one per row. A row's draws come from its own generator seeded
        with it, so what it samples does not depend on the other rows of the batch."""
        if len(set(keys)) != len(keys):
            raise ValueError("generate: each row needs its own key (one episode per row)")
        current = self.base.config._attn_implementation
        self.base.set_attn_implementation(ATTN_IMPLEMENTATION)
        try:
            with torch.inference_mode():
                return self._generate(prompts, keys, seeds)
        finally:
            self.base.set_attn_implementation(current)

    def _generate(self, prompts, keys, seeds) -> list[list[int]]:
        placed = self._place(prompts, keys)
        rows = [self.slots[k] for k in keys]
        shared = len(placed) - len(rows)  # shared prefixes computed in this forward come first
        start = time.perf_counter()
        logits = self._forward([s for s, _ in placed], [t for _, t in placed])[shared:]
        self.prefill_s += time.perf_counter() - start

        def forward(keep, live, tokens, step):
            segments = []
            for row, token in zip(live, tokens):  # a row that stopped simply leaves the forward
                slot = rows[row]
                segments.append(_Segment(slot.own, slot.own.n, 1, 0, slot.prefix, slot.m))
                slot.ids.append(token)
            return self._forward(segments, [[t] for t in tokens])

        out = self._decode(logits, self._rngs(seeds, len(rows)), forward)
        if not self.keep_reply:
            for slot in rows:
                slot.truncate(slot.prompt_len)
        return out
