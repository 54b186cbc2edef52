"""Batched decoding that keeps each episode's KV cache from one step to the next, in a batch cache
rebuilt at every step (``kv_cache="in-place"`` / ``"concat"``). On CPU the default engine is
etokit/rollout/slot_pool.py, which keeps each episode's K/V in a slot of its own instead; this one
runs where that one cannot (GPUs, models its attention does not cover) and is its reference.

An agent's conversation only grows: the prompt of step t is the prompt of step t-1 followed by the
reply, the observation and the next generation prompt. Re-encoding it at every step costs the sum of
all its lengths (quadratic in the number of steps); on a CPU with a 135M model this prefill was most
of an evaluation's time. Here every row's prompt K/V is kept after its prefill, keyed by its episode,
and the next step prefills only the tokens past the longest common prefix with what is kept. A new
episode borrows the longest prefix any kept row shares with it: the instruction and the 1-shot
example are the same for every task.

Why it is exact: a token's K/V depend only on the tokens before it and its position, so a kept prefix
is what a full prefill would compute. The reply is kept as the chat template renders it (it is
prefilled again next step), not as it was sampled, because re-tokenizing a text need not give the
sampled tokens back. Rows are laid out with left padding in both the kept and the new part; a 4D mask
and explicit position ids give every row exactly its own tokens at its own positions (pad queries see
themselves only, so no row of the softmax is empty).

The cache of a batch is preallocated for its prompt and replies and written in place
(etokit/rollout/slot_cache.py): transformers' DynamicCache grows by concatenation, which copies every
layer's whole cache at every decoded token (``in_place=False`` keeps that path as the reference).
Episodes that start together with nothing kept to borrow prefill their common prefix once.
Sampling draws each row from its own generator, seeded per reply by the caller (``seeds``).

Models whose cache is not one growing tensor per layer (sliding-window layers, encoder-decoders) or
whose attention takes no 4D mask (flash-attn) use ``model.generate`` instead: see ``kv_reuse_unsupported``.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence


@dataclass
class _Kept:
    ids: list[int]
    keys: list  # per layer, [heads, len(ids), head_dim]
    values: list


def kv_reuse_unsupported(model) -> str | None:
    """Why this model cannot keep its cache across steps here, or None when it can."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "layers other than full attention"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return f"attention {config._attn_implementation!r} (4D masks need sdpa or eager)"
    return None


def pick_tokens(logits, rngs, temperature: float, top_p: float):
    """The next token of each row: greedy at temperature 0, else sampled (nucleus ``top_p``)
    from each row's own generator."""
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Keep the smallest set whose mass reaches top_p (the top token always).
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.cat([torch.multinomial(p, 1, generator=rng) for p, rng in zip(probs, rngs)])


class Decoder:
    """What the KV-reuse engines share (this module's and etokit/rollout/slot_pool.py's): the
    options, the counters bench/generate.py reads, and the decode loop. ``generate(prompts, keys)``
    -> generated token ids per row (EOS excluded), stopping a row at EOS, at ``max_new_tokens`` or
    when ``stopped(ids, checked)`` says its text holds a stop string (``ids[:checked]`` held none)."""

    def __init__(
        self,
        model,
        *,
        pad_id: int,
        eos_ids: Sequence[int],
        max_new_tokens: int,
        stopped: Callable[[list[int], int], bool],
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ):
        self.model, self.pad_id, self.eos = model, pad_id, set(eos_ids)
        self.max_new_tokens, self.stopped = max_new_tokens, stopped
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.prefilled = 0  # tokens run through prefill, for the benchmark and tests
        self.reused = 0  # prompt tokens whose K/V were already held
        self.prefill_s = self.decode_s = 0.0  # seconds in prefill / decode forwards (bench/generate.py)
        self.decoded = 0  # tokens run through decode forwards

    def _rngs(self, seeds: Sequence[int] | None, batch: int):
        """One generator per row when sampling, seeded with the row's seed (None when greedy)."""
        import torch

        if self.temperature <= 0:
            return None
        seeds = seeds if seeds is not None else [self.seed + i for i in range(batch)]
        return [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]

    def _decode(self, logits, rngs, forward: Callable[[list[int], list[int], list[int], int], object]):
        """Pick, record and feed tokens until every row stops. ``forward(keep, rows, tokens, step)``
        runs the picked ``tokens`` of the rows still generating (``rows``, batch indices; ``keep``,
        their places in the previous call's rows) and returns their next logits. A row's last token
        (stop string or ``max_new_tokens``) is recorded but never fed; an EOS is neither."""
        out: list[list[int]] = [[] for _ in range(logits.shape[0])]
        rows = list(range(logits.shape[0]))  # the rows still generating
        for step in range(self.max_new_tokens):
            tokens = pick_tokens(logits, rngs, self.temperature, self.top_p).tolist()
            keep = []
            for j, (row, token) in enumerate(zip(rows, tokens)):
                if token in self.eos:
                    continue
                out[row].append(token)
                if not self.stopped(out[row], len(out[row]) - 1):  # checked before, but for the new token
                    keep.append(j)
            if not keep or step == self.max_new_tokens - 1:
                break
            rows, tokens = [rows[j] for j in keep], [tokens[j] for j in keep]
            rngs = rngs and [rngs[j] for j in keep]
            start = time.perf_counter()
            logits = forward(keep, rows, tokens, step)
            self.decode_s += time.perf_counter() - start
            self.decoded += len(tokens)
        return out


class KVReuseDecoder(Decoder):
    """The batch-cache engines (``in_place``: preallocated and written in place; else transformers'
    DynamicCache grown by concatenation)."""

    def __init__(self, model, *, in_place: bool = True, **options):
        super().__init__(model, **options)
        # True: the KV cache is preallocated and written in place (etokit/rollout/slot_cache.py); False: transformers'
        # DynamicCache, grown by concatenation at every forward (the engine before; kept as the reference).
        self.in_place = in_place
        self.num_layers = model.config.get_text_config().num_hidden_layers
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
        # transformers 5.24 renamed past_key_values to cache (the old name warns, and goes in 5.40).
        self.cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self.bool_mask = getattr(model.config, "_attn_implementation", "sdpa") == "sdpa"
        self.kept: dict[Hashable, _Kept] = {}

    def generate(
        self, prompts: Sequence[list[int]], keys: Sequence[Hashable], seeds: Sequence[int] | None = None
    ) -> list[list[int]]:
        """``seeds`` (sampling only): one per row. A row's draws come from its own generator seeded
        with it, so what it samples does not depend on the other rows of the batch."""
        import torch
        from transformers import DynamicCache

        starts = [self._donor(ids, key) for ids, key in zip(prompts, keys)]
        if self.in_place:
            shared = self._shared_prefix(prompts, starts)
            if shared is not None:
                starts = [
                    (shared, len(shared.ids))
                    if n < len(shared.ids) and ids[: len(shared.ids)] == shared.ids
                    else (d, n)
                    for ids, (d, n) in zip(prompts, starts)
                ]
        # At least one token of each prompt is prefilled: its logits give the first new token.
        reuse = [min(n, len(ids) - 1) for ids, (_, n) in zip(prompts, starts)]
        new = [ids[r:] for ids, r in zip(prompts, reuse)]
        batch, past, width = len(prompts), max(reuse), max(map(len, new))
        self.prefilled += sum(map(len, new))
        self.reused += sum(reuse)

        if self.in_place:
            from etokit.rollout.slot_cache import slot_cache

            cache = slot_cache(self.num_layers, past + width + self.max_new_tokens)
            if past:
                donor = next(d for d, _ in starts if d is not None)
                for layer, (lay, k0) in enumerate(zip(cache.layers, donor.keys)):
                    lay.allocate(batch, k0.shape[0], k0.shape[-1], k0.dtype, k0.device)
                    for i, ((d, _), r) in enumerate(zip(starts, reuse)):
                        # Pads are masked out, but a masked score times a NaN of torch.empty is NaN.
                        lay.buf_k[i, :, : past - r].zero_()
                        lay.buf_v[i, :, : past - r].zero_()
                        if r:
                            lay.buf_k[i, :, past - r : past] = d.keys[layer][:, :r]
                            lay.buf_v[i, :, past - r : past] = d.values[layer][:, :r]
                    lay.n = past
        else:
            cache = DynamicCache()
        if past and not self.in_place:
            donor = next(d for d, _ in starts if d is not None)
            for layer, (k0, v0) in enumerate(zip(donor.keys, donor.values)):
                k = k0.new_zeros(batch, k0.shape[0], past, k0.shape[-1])
                v = v0.new_zeros(batch, v0.shape[0], past, v0.shape[-1])
                for i, ((d, _), r) in enumerate(zip(starts, reuse)):
                    if r:
                        k[i, :, past - r :] = d.keys[layer][:, :r]
                        v[i, :, past - r :] = d.values[layer][:, :r]
                cache.update(k, v, layer)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((batch, width), dtype=torch.long)
        valid = torch.zeros((batch, past + width), dtype=torch.bool)
        for i, (r, n) in enumerate(zip(reuse, new)):
            input_ids[i, width - len(n) :] = torch.tensor(n)
            positions[i, width - len(n) :] = torch.arange(r, r + len(n))
            valid[i, past - r : past] = True
            valid[i, past + width - len(n) :] = True
        query = torch.arange(width)[:, None] + past
        allowed = valid[:, None, :] & (torch.arange(past + width)[None, :] <= query)[None]
        allowed[:, torch.arange(width), query[:, 0]] = True  # a pad query sees itself: no empty softmax row
        with torch.inference_mode():
            start = time.perf_counter()
            logits = self._forward(input_ids, positions, allowed, cache)
            self.prefill_s += time.perf_counter() - start
            self.kept = {}
            for i, (key, ids, r, n) in enumerate(zip(keys, prompts, reuse, new)):
                self.kept[key] = _Kept(
                    ids=list(ids),
                    keys=[
                        torch.cat([lay.keys[i, :, past - r : past], lay.keys[i, :, past + width - len(n) :]], 1)
                        for lay in cache.layers
                    ],
                    values=[
                        torch.cat([lay.values[i, :, past - r : past], lay.values[i, :, past + width - len(n) :]], 1)
                        for lay in cache.layers
                    ],
                )
            lengths = torch.tensor([len(ids) for ids in prompts])
            state = {"valid": valid, "lengths": lengths}

            def forward(keep, rows, tokens, step):
                if len(keep) < state["valid"].shape[0]:  # finished rows leave the batch
                    index = torch.tensor(keep)
                    cache.batch_select_indices(index.to(self.device))
                    state["valid"], state["lengths"] = state["valid"][index], state["lengths"][index]
                state["valid"] = torch.cat([state["valid"], torch.ones((len(rows), 1), dtype=torch.bool)], 1)
                positions = (state["lengths"] + step)[:, None]
                return self._forward(torch.tensor(tokens)[:, None], positions, state["valid"][:, None, :], cache)

            return self._decode(logits, self._rngs(seeds, batch), forward)

    def _shared_prefix(self, prompts: Sequence[list[int]], starts) -> _Kept | None:
        """New episodes that start together have nothing kept to borrow, yet share the instruction
        and the 1-shot example: prefill that common prefix once, alone, and let them all borrow it
        (at an evaluation's first step this is most of every prompt)."""
        import torch

        fresh = [(ids, n) for ids, (_, n) in zip(prompts, starts) if n < len(ids) // 2]
        if len(fresh) < 2:
            return None
        common = os.path.commonprefix([ids for ids, _ in fresh])
        common = common[: min(len(ids) for ids, _ in fresh) - 1]  # each row prefills at least its last token
        if len(common) < max(16, 2 * max(n for _, n in fresh)):  # not worth a forward of its own
            return None
        from etokit.rollout.slot_cache import slot_cache

        cache = slot_cache(self.num_layers, len(common))
        n = len(common)
        causal = torch.ones((1, n, n), dtype=torch.bool).tril()
        with torch.inference_mode():
            start = time.perf_counter()
            self._forward(torch.tensor([common]), torch.arange(n)[None], causal, cache)
            self.prefill_s += time.perf_counter() - start
        self.prefilled += n
        return _Kept(
            ids=list(common), keys=[lay.keys[0] for lay in cache.layers], values=[lay.values[0] for lay in cache.layers]
        )

    def _donor(self, ids: list[int], key: Hashable) -> tuple[_Kept | None, int]:
        """The kept row sharing the longest prefix with ``ids`` (its own first) and that length."""
        best, best_n = None, 0
        own = self.kept.get(key)
        for kept in ([own] if own is not None else []) + [k for k in self.kept.values() if k is not own]:
            n = len(os.path.commonprefix([kept.ids, ids]))
            if n > best_n:
                best, best_n = kept, n
            if kept is own and n >= len(own.ids):  # the episode's whole kept prompt: nothing is longer
                break
        return best, best_n

    def _forward(self, input_ids, positions, allowed, cache):
        import torch

        if self.bool_mask:  # SDPA takes the boolean mask itself: a quarter of a float32 mask's memory
            mask = allowed
        else:  # eager attention adds the mask to the scores
            mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
        out = self.model(
            input_ids=input_ids.to(self.device),
            position_ids=positions.to(self.device),
            attention_mask=mask[:, None].to(self.device),
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_arg: cache},
        )
        return out.logits[:, -1].float()
