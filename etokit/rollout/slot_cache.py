"""A KV cache written in place: preallocated buffers instead of a tensor grown by concatenation.

Imported only where a model runs (it subclasses transformers' cache layer).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One layer's K/V for a batch, preallocated to ``capacity`` positions and written in place.

    transformers' DynamicLayer grows by ``torch.cat`` at every forward: each decode step copies the
    whole cache of every layer (86% of the CPU time of a SmolLM2 decode step at batch 32). Here a
    step writes its new positions into the buffer and returns a view of the filled part, so a step
    costs what it computes. The filled part is the same for every row (rows are left-padded to one
    layout), so one length ``n`` describes the layer.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, capacity: int):
        self.capacity, self.n = capacity, 0
        self.buf_k = self.buf_v = None
        self.is_initialized = False

    def lazy_initialization(self, key_states, value_states) -> None:
        b, h, _, d = key_states.shape
        self.allocate(b, h, d, key_states.dtype, key_states.device)

    def allocate(self, batch: int, heads: int, head_dim: int, dtype, device) -> None:
        shape = (batch, heads, self.capacity, head_dim)
        self.buf_k = torch.empty(shape, dtype=dtype, device=device)
        self.buf_v = torch.empty(shape, dtype=dtype, device=device)
        self.is_initialized = True

    @property
    def keys(self):
        return self.buf_k[:, :, : self.n]

    @property
    def values(self):
        return self.buf_v[:, :, : self.n]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.n + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV slot cache overflow: {end} positions for a capacity of {self.capacity}")
        self.buf_k[:, :, self.n : end] = key_states
        self.buf_v[:, :, self.n : end] = value_states
        self.n = end
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def batch_select_indices(self, indices) -> None:
        # Only the filled part moves; the rest of the new buffer is written by the steps to come.
        for name in ("buf_k", "buf_v"):
            old = getattr(self, name)
            new = old.new_empty((len(indices),) + old.shape[1:])
            new[:, :, : self.n] = old[indices, :, : self.n]
            setattr(self, name, new)


def slot_cache(num_layers: int, capacity: int) -> Cache:
    return Cache(layers=[SlotLayer(capacity) for _ in range(num_layers)])
