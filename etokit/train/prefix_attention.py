"""Attention for "shared" rows: a DPO pair's common prefix computed once, both continuations on it.

Chosen and rejected start with the same tokens (the prompt, often the first agent turns too). A
causal model's hidden states at those positions are the same in both sequences, so a pair can run
as ONE row ``[prefix P | chosen suffix C | rejected suffix R]`` with positions ``0..p-1, p..p+c-1,
p..p+r-1``: every per-token op (projections, MLP, norms, rotary) sees each token once, and only
attention needs the tree structure -- P attends causally to P, C to all of P and causally to C,
R to all of P and causally to R (never to C).

On CPU the tree is computed blockwise with PyTorch's fused flash-attention kernel, which also
returns each row's log-sum-exp: ``(P,P)`` causal, ``(C+R, P)`` full and ``(C,C)``, ``(R,R)``
causal, the two partial results of a suffix row merged by their log-sum-exps. Backward is the
same kernel's backward per block, fed the MERGED output and log-sum-exp (flash attention's own
decomposition over key blocks), so gradients are exact and nothing is materialised beyond what
SDPA saves. A single masked SDPA over ``[P, C]`` keys would be simpler, but the CPU kernel
computes every masked block and measured slower than no sharing at all. Elsewhere (CUDA, or a
torch without the CPU kernel) the tree runs as plain SDPA calls with a lower-right causal mask:
exact, never measured on a GPU.

The layout reaches the attention function as the ``prefix_tree`` forward kwarg, which transformers
passes down to every attention call (gradient-checkpoint recomputation included). It only works
while the model's attention implementation is :data:`ATTN_IMPLEMENTATION`
(``etokit.train.logprobs.attention_for`` switches it, and must stay entered through backward when
layers are checkpointed). Shared batches also carry a zero-size 4D attention mask: transformers
passes a 4D mask through untouched, and if anything ever ran these rows through another kernel
(e.g. a checkpoint recomputation outside the switch) SDPA would fail on the mask's shape instead
of silently attending across the tree.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "etokit_prefix_tree"
# (start, p, c, r): a tree's first row index, then the prefix / chosen / rejected suffix lengths.
Tree = tuple[int, int, int, int]

_CPU_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def guard_mask(device) -> torch.Tensor:
    """The zero-size 4D attention mask shared batches pass (see the module docstring)."""
    return torch.zeros((1, 1, 0, 0), dtype=torch.bool, device=device)


def unsupported(config, longest: int | None = None) -> str | None:
    """Why a model's attention cannot run as prefix trees (None if it can): the tree kernels
    implement plain causal softmax attention, without logit soft-capping, attention dropout or a
    sliding window shorter than the sequences (``longest`` tokens; unknown: any window)."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout"
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    sliding = "sliding_attention" in layer_types if layer_types else getattr(config, "use_sliding_window", True)
    if window and sliding and (longest is None or longest > window):
        return f"sliding-window attention ({window} tokens)"
    return None


def register() -> str:
    """Register the tree attention with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_tree_attention)
    return ATTN_IMPLEMENTATION


def prefix_tree_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    prefix_tree: Sequence[Tree] | None = None,
    **kwargs,
):
    """transformers attention-interface function: ``query`` ``[1, H, T, D]``, ``key``/``value``
    ``[1, Hkv, T, D]`` -> ``([1, T, H, D], None)``."""
    if prefix_tree is None:
        raise RuntimeError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} needs the prefix_tree forward argument "
            "(etokit.train.packing.collate_shared rows only)"
        )
    if query.shape[0] != 1:
        raise ValueError(f"shared rows have batch size 1, got {query.shape[0]}")
    if dropout:
        raise ValueError("prefix-tree attention does not implement attention dropout; set attention_dropout=0")
    for feature in ("softcap", "s_aux"):
        if kwargs.get(feature) is not None:
            raise ValueError(
                f"prefix-tree attention does not implement {feature}; "
                "use an unshared backend (--backend bucketed) for this model"
            )
    if not getattr(module, "is_causal", True):
        raise ValueError("prefix-tree attention is for causal decoders")
    trees = tuple(tuple(int(x) for x in t) for t in prefix_tree)
    window = kwargs.get("sliding_window")
    # A token attends to the `window` latest positions: no effect while every sequence fits in it.
    if window is not None and max(p + max(c, r) for _, p, c, r in trees) > window:
        raise ValueError(
            f"prefix-tree attention does not implement a sliding window ({window} tokens) shorter than "
            "the sequences; use an unshared backend (--backend bucketed) for this model"
        )
    if sum(p + c + r for _, p, c, r in trees) != query.shape[2]:
        raise ValueError(
            f"prefix_tree covers {sum(p + c + r for _, p, c, r in trees)} tokens, row has {query.shape[2]}"
        )
    device = query.device.type
    if torch.is_autocast_enabled(device):
        # What autocast does for SDPA, which a custom autograd Function does not get: under mixed
        # precision the rotary-embedded query/key arrive in float32 and the value in bf16.
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if device == "cpu" and _CPU_FWD is not None and _CPU_BWD is not None:
        out = _TreeFlashCPU.apply(query, key, value, trees, scaling)
    else:
        out = tree_attention_sdpa(query, key, value, trees, scaling)
    return out.transpose(1, 2).contiguous(), None


def tree_attention_sdpa(query, key, value, trees: Sequence[Tree], scaling=None) -> torch.Tensor:
    """The tree with plain SDPA calls (autograd does the backward): the portable path and the
    reference the blockwise kernel is tested against. -> ``[1, H, T, D]``."""
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for start, p, c, r in trees:
        P = slice(start, start + p)
        if p:
            outs.append(
                F.scaled_dot_product_attention(
                    query[:, :, P], key[:, :, P], value[:, :, P], is_causal=True, scale=scaling, enable_gqa=gqa
                )
            )
        for s0, n in ((start + p, c), (start + p + c, r)):
            if not n:
                continue
            S = slice(s0, s0 + n)
            k = torch.cat([key[:, :, P], key[:, :, S]], 2)
            v = torch.cat([value[:, :, P], value[:, :, S]], 2)
            # Suffix query i sees the whole prefix and suffix keys 0..i: causal aligned bottom-right.
            mask = torch.ones(n, p + n, dtype=torch.bool, device=query.device).tril(p)
            outs.append(
                F.scaled_dot_product_attention(query[:, :, S], k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
            )
    return torch.cat(outs, 2)


class _TreeFlashCPU(torch.autograd.Function):
    """Blockwise flash attention over the trees of one row (CPU fused kernel, exact gradients)."""

    @staticmethod
    def forward(ctx, q, k, v, trees, scale):
        B, H, T, D = q.shape
        # [B, T, H, D] memory, the layout the caller transposes to: its .contiguous() is then free.
        out = q.new_empty((B, T, H, D)).transpose(1, 2)
        # The kernel's log-sum-exp is float32 for half-precision inputs, the input dtype otherwise.
        lse = q.new_empty((B, H, T), dtype=torch.float32 if q.element_size() < 4 else q.dtype)
        for start, p, c, r in trees:
            P, S = slice(start, start + p), slice(start + p, start + p + c + r)
            if p:
                o, l = _CPU_FWD(q[:, :, P], k[:, :, P], v[:, :, P], 0.0, True, scale=scale)
                out[:, :, P], lse[:, :, P] = o, l
            if c + r:
                oa, la = _CPU_FWD(q[:, :, S], k[:, :, P], v[:, :, P], 0.0, False, scale=scale) if p else (None, None)
                for s0, n in ((start + p, c), (start + p + c, r)):
                    if not n:
                        continue
                    X = slice(s0, s0 + n)
                    ob, lb = _CPU_FWD(q[:, :, X], k[:, :, X], v[:, :, X], 0.0, True, scale=scale)
                    if oa is None:
                        out[:, :, X], lse[:, :, X] = ob, lb
                        continue
                    A = slice(s0 - start - p, s0 - start - p + n)  # rows of this suffix within oa / la
                    l_a, l_b = la[:, :, A], lb
                    L = torch.logaddexp(l_a, l_b)
                    # Merged in the log-sum-exp's precision (float32 at least), then stored in q's dtype.
                    merged = oa[:, :, A].to(L.dtype) * (l_a - L).exp_().unsqueeze(-1)
                    merged.addcmul_(ob.to(L.dtype), (l_b - L).exp_().unsqueeze(-1))
                    out[:, :, X], lse[:, :, X] = merged, L
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.trees, ctx.scale = trees, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        scale = ctx.scale
        g = grad_out
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

        def bwd(Q, K, causal):
            # Partial gradients of one (query block, key block): the kernel recomputes the block's
            # probabilities from the MERGED log-sum-exp and uses the merged output, so the pieces add up.
            return _CPU_BWD(
                g[:, :, Q], q[:, :, Q], k[:, :, K], v[:, :, K], out[:, :, Q], lse[:, :, Q], 0.0, causal, scale=scale
            )

        for start, p, c, r in ctx.trees:
            P, S = slice(start, start + p), slice(start + p, start + p + c + r)
            if p:
                dq[:, :, P], dk[:, :, P], dv[:, :, P] = bwd(P, P, True)
            if p and c + r:
                dq_s, dk_p, dv_p = bwd(S, P, False)
                dq[:, :, S] = dq_s
                dk[:, :, P] += dk_p
                dv[:, :, P] += dv_p
            for s0, n in ((start + p, c), (start + p + c, r)):
                if not n:
                    continue
                X = slice(s0, s0 + n)
                dq_x, dk[:, :, X], dv[:, :, X] = bwd(X, X, True)
                if p:
                    dq[:, :, X] += dq_x
                else:
                    dq[:, :, X] = dq_x
        return dq, dk, dv, None, None
