"""padded == bucketed == packed == shared, per sequence and through DPO training (TRL's invariance
tests are the model). A tiny Llama in fp32 on random tokens with random assistant masks."""

from __future__ import annotations

import copy
import itertools
import math
import shutil
from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from etokit.train import prefix_attention
from etokit.train.model_loading import enable_gradient_checkpointing
from etokit.train.dpo_loss import dpo_loss
from etokit.train.logprobs import BACKENDS, attention_for, batch_logps, collate, plan, sequence_logps
from etokit.train.packing import collate_packed, collate_shared

RTOL, ATOL = 1e-5, 1e-5


@dataclass
class Seq:
    input_ids: list[int]
    loss_mask: list[bool]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def random_seqs(n, seed, lengths=None):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [1, 1, 2] + torch.randint(3, 90, (n - 3,), generator=g).tolist()
    return [
        Seq(torch.randint(1, 97, (L,), generator=g).tolist(), (torch.rand(L, generator=g) < 0.6).tolist())
        for L in lengths
    ]


def direct_logps(model, seqs):
    """The formula, one unpadded sequence at a time, from full logits."""
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s.input_ids])
            logp = model(ids, use_cache=False).logits.float().log_softmax(-1)[0]
            total = torch.tensor(0.0)
            for t in range(1, len(s.input_ids)):
                if s.loss_mask[t]:
                    total = total + logp[t - 1, s.input_ids[t]]
            out.append(total)
    return torch.stack(out)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def seqs():
    return random_seqs(24, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_equal_direct_formula(model, seqs, backend):
    expected = direct_logps(model, seqs)
    got = sequence_logps(model, seqs, backend, max_tokens=300, micro_batch_size=5)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert got[0] == 0 and got[1] == 0  # single-token sequences have nothing to score


@pytest.mark.parametrize("backend", ["padded", "bucketed"])
def test_right_padding_without_mask_ignores_pad_content(model, seqs, backend):
    """Padded layouts pass no attention_mask: whatever the pad token is, no real token sees it."""
    a = sequence_logps(model, seqs, backend, max_tokens=300, micro_batch_size=5, pad_token_id=0)
    b = sequence_logps(model, seqs, backend, max_tokens=300, micro_batch_size=5, pad_token_id=96)
    assert torch.equal(a, b)
    assert collate(seqs[:4], backend).attention_mask is None


def test_one_packed_row_of_everything(model, seqs):
    # all 24 sequences (incl. adjacent single-token ones: position 0 right after position 0) in ONE row
    b = collate_packed(seqs)
    assert b.input_ids.shape[0] == 1 and b.position_ids[0, :3].tolist() == [0, 0, 0]
    with torch.no_grad():
        got = batch_logps(model, b)
    torch.testing.assert_close(got, direct_logps(model, seqs), rtol=RTOL, atol=ATOL)


def test_editing_one_sequence_changes_no_other(model, seqs):
    edited = copy.deepcopy(seqs)
    i = 7
    edited[i].input_ids = [(t * 5 + 3) % 96 + 1 for t in edited[i].input_ids]
    with torch.no_grad():
        a = batch_logps(model, collate_packed(seqs))
        b = batch_logps(model, collate_packed(edited))
    others = [j for j in range(len(seqs)) if j != i]
    assert torch.equal(a[others], b[others]) or torch.allclose(a[others], b[others], rtol=1e-6, atol=1e-6)
    assert not torch.isclose(a[i], b[i])


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="FlexAttention on CPU compiles its kernel with a C++ compiler",
)
def test_packed_rows_through_flex_attention(monkeypatch):
    """The route a CUDA host without flash-attn takes (``packed`` -> FlexAttention, block mask
    built by transformers from the restarting positions), forward only: FlexAttention has no CPU
    backward. No GPU is lent to CI, so this is what checks that route isolates the sequences."""
    from etokit.train import logprobs

    model = tiny_llama(seed=2)
    # adjacent single-token sequences: position 0 right after position 0
    seqs = random_seqs(8, seed=6, lengths=[17, 1, 1, 40, 5, 1, 33, 12])
    expected = direct_logps(model, seqs)
    monkeypatch.setattr(logprobs, "packed_attn_implementation", lambda device: "flex_attention")
    got = sequence_logps(model, seqs, "packed", max_tokens=1000)  # one row
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert model.config._attn_implementation == "sdpa"  # switched back afterwards
    edited = copy.deepcopy(seqs)
    edited[3].input_ids[20] = edited[3].input_ids[20] % 96 + 1
    changed = ~torch.isclose(sequence_logps(model, edited, "packed", max_tokens=1000), got, rtol=1e-6, atol=1e-6)
    assert changed.nonzero().flatten().tolist() == [3]


def test_first_label_of_each_packed_sequence_is_ignored(model):
    base = random_seqs(6, seed=3, lengths=[5, 8, 1, 6, 4, 9])
    flipped = [Seq(s.input_ids, [not s.loss_mask[0]] + s.loss_mask[1:]) for s in base]
    with torch.no_grad():
        a = batch_logps(model, collate_packed(base))
        b = batch_logps(model, collate_packed(flipped))
    assert torch.equal(a, b)


def test_isolation_traps_are_real(model, seqs):
    """What goes wrong without the rules in packing.py: an attention_mask or a KV cache turns
    off transformers' packed-sequence detection and sequences attend across boundaries."""
    b = collate_packed(seqs)
    expected = direct_logps(model, seqs)
    keep = torch.zeros_like(b.targets)
    keep[:, :-1] = b.targets[:, 1:]
    labels = b.input_ids[:, 1:][b.targets[:, 1:]]
    owner = b.seq_index[:, 1:][b.targets[:, 1:]]

    def sums(**kw):
        with torch.no_grad():
            logits = model(input_ids=b.input_ids, position_ids=b.position_ids, logits_to_keep=keep, **kw).logits
        lp = logits.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
        return torch.zeros(b.num_seqs).index_add(0, owner, lp)

    torch.testing.assert_close(sums(use_cache=False), expected, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(sums(use_cache=True), expected, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(
        sums(use_cache=False, attention_mask=torch.ones_like(b.input_ids)), expected, rtol=1e-3, atol=1e-3
    )


def shared_pairs(seed):
    """(chosen, rejected) pairs whose common token prefix takes every shape the shared layout must
    get right, in a fixed order (see the assertion in test_shared_rows_equal_direct_formula)."""
    g = torch.Generator().manual_seed(seed)

    def rand(n, first=None):
        s = random_seqs(1, int(torch.randint(0, 10**6, (1,), generator=g)), lengths=[n])[0]
        if first is not None:  # a suffix starting with a token the other side does not have there
            s.input_ids[0] = first
        return s

    def join(*parts):
        return Seq([t for q in parts for t in q.input_ids], [m for q in parts for m in q.loss_mask])

    def masks_differ(s):  # same tokens, its own loss mask (the prefix's scored tokens differ by side)
        return Seq(list(s.input_ids), (torch.rand(len(s.input_ids), generator=g) < 0.5).tolist())

    pairs = []
    pre = rand(30)
    pairs.append((join(pre, rand(20, 5)), join(pre, rand(35, 6))))  # prefix ending mid-turn (random masks)
    pre = rand(15)
    pairs.append((join(pre, rand(9, 5)), join(masks_differ(pre), rand(12, 6))))
    pairs.append((rand(25, 5), rand(18, 6)))  # nothing in common
    pre = rand(22)
    pairs.append((join(pre, rand(1, 5)), join(pre, rand(1, 6))))  # single-token suffixes
    whole = rand(28)
    pairs.append((whole, join(whole, rand(10))))  # chosen = a prefix of rejected: empty chosen suffix
    pairs.append((join(whole, rand(4)), whole))  # and the other way round
    pairs.append((whole, whole))  # identical
    pairs.append((rand(1, 5), rand(1, 6)))  # single tokens
    pre = rand(1)
    pairs.append((join(pre, rand(8, 5)), join(pre, rand(3, 6))))  # one common token
    return pairs


def flatten(pairs):
    return [s for pair in pairs for s in pair]


@pytest.mark.parametrize("kernel", ["cpu-flash-blocks", "sdpa-masks"])
def test_shared_rows_equal_direct_formula(model, kernel, monkeypatch):
    pairs = shared_pairs(seed=4)
    trees = collate_shared(pairs).prefix_tree
    assert [(p, c, r) for _, p, c, r in trees] == [
        (30, 20, 35),
        (15, 9, 12),
        (0, 25, 18),
        (22, 1, 1),
        (28, 0, 10),
        (28, 4, 0),
        (28, 0, 0),
        (0, 1, 1),
        (1, 8, 3),
    ]
    if kernel == "sdpa-masks":  # the portable path (CUDA, or a torch without the CPU kernel)
        monkeypatch.setattr(prefix_attention, "_CPU_FWD", None)
    flat = flatten(pairs)
    expected = direct_logps(model, flat)
    # a budget that puts several pairs in one row and a long pair alone
    got = sequence_logps(model, flat, "shared", max_tokens=90)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got, sequence_logps(model, flat, "bucketed", max_tokens=300), rtol=RTOL, atol=ATOL)
    assert got[12] == got[13]  # identical sequences: one computation, the same sum on both sides


def test_shared_rows_under_bf16_autocast():
    """``--mixed-precision bf16`` on CPU: autocast hands the attention function a float32 query/key
    (rotary) and a bf16 value; the tree kernel gets them cast as SDPA would. Log-probs and
    gradients match the unshared layout to bf16 precision."""
    model = tiny_llama(seed=3).train()
    flat = flatten(shared_pairs(seed=4))
    w = torch.linspace(-1, 1, len(flat))

    def run(backend):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), attention_for(model, backend, "cpu"):
            logps = torch.cat([batch_logps(model, collate(flat[i : i + 6], backend)) for i in range(0, len(flat), 6)])
            (logps * w).sum().backward()
        return logps.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (a, ga), (b, gb) = run("shared"), run("bucketed")
    expected = direct_logps(model, flat)
    torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(a, expected, rtol=2e-2, atol=1e-2)
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.999
    torch.testing.assert_close(ga, gb, rtol=0.1, atol=0.02 * gb.abs().max().item())


def test_tree_attention_kernel_matches_masked_sdpa():
    """The blockwise CPU kernel (merged log-sum-exps, per-block backward) against plain masked SDPA,
    output and all three gradients, with grouped-query heads and several trees in one row."""
    g = torch.Generator().manual_seed(0)
    trees = ((0, 37, 50, 23), (110, 0, 5, 7), (122, 10, 0, 9), (141, 12, 1, 1), (155, 3, 0, 0), (158, 1, 1, 0))
    q, k, v = (
        torch.randn(1, 160, h, 16, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_() for h in (8, 4, 4)
    )
    a = prefix_attention._TreeFlashCPU.apply(q, k, v, trees, None)
    b = prefix_attention.tree_attention_sdpa(q, k, v, trees)
    w = torch.randn(a.shape, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((a * w).sum(), (q, k, v))
    gb = torch.autograd.grad((b * w).sum(), (q, k, v))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_shared_rows_isolate_suffixes_and_pairs(model):
    """Editing a rejected suffix changes that sequence only (not its own chosen side, which shares
    the row); editing a prefix token changes both sides of that pair and nothing else."""
    pairs = shared_pairs(seed=5)
    flat = flatten(pairs)

    def logps(seqs):
        with torch.no_grad(), attention_for(model, "shared", "cpu"):
            return batch_logps(model, collate(seqs, "shared"))

    base = logps(flat)
    edited = copy.deepcopy(flat)
    edited[1].input_ids[40] = edited[1].input_ids[40] % 96 + 1  # pair 0's rejected suffix (prefix 30)
    changed = ~torch.isclose(logps(edited), base, rtol=1e-6, atol=1e-6)
    assert changed.nonzero().flatten().tolist() == [1]
    edited = copy.deepcopy(flat)
    for s in edited[2:4]:  # pair 1's prefix, on both sides
        s.input_ids[3] = s.input_ids[3] % 96 + 1
    changed = ~torch.isclose(logps(edited), base, rtol=1e-6, atol=1e-6)
    assert changed.nonzero().flatten().tolist() == [2, 3]


def _dpo_grads(model, pairs, backend, ref):
    model.zero_grad()
    with attention_for(model, backend, "cpu"):
        logps = batch_logps(model, collate(flatten(pairs), backend)).view(-1, 2)
        loss = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=0.5).losses.sum()
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_shared_gradients_equal_unshared_with_checkpointing():
    pairs = shared_pairs(seed=6)
    ref = sequence_logps(tiny_llama(seed=8), flatten(pairs), "padded", micro_batch_size=4).view(-1, 2)
    plain = tiny_llama(seed=7).train()
    loss_b, grads_b = _dpo_grads(plain, pairs, "bucketed", ref)
    checkpointed = tiny_llama(seed=7).train()
    enable_gradient_checkpointing(checkpointed)
    loss_s, grads_s = _dpo_grads(checkpointed, pairs, "shared", ref)
    torch.testing.assert_close(loss_s, loss_b, rtol=RTOL, atol=ATOL)
    assert any(g.abs().sum() > 0 for g in grads_b.values())
    for name, grad in grads_b.items():
        torch.testing.assert_close(grads_s[name], grad, rtol=1e-4, atol=1e-6)

    # A checkpointed layer recomputed outside the attention switch would attend across the tree;
    # the shared batch's guard mask makes that an error, never a silently wrong gradient.
    with attention_for(checkpointed, "shared", "cpu"):
        logps = batch_logps(checkpointed, collate(flatten(pairs), "shared"))
    with pytest.raises(RuntimeError):
        logps.sum().backward()


def _train(backend, pairs, steps=3, beta=0.5):
    """A few SGD steps of DPO with one backend; returns losses, first-step gradients, final weights.

    SGD, not AdamW: Adam divides by the gradient's own magnitude, so a coordinate whose true
    gradient is ~0 takes a full +-lr step whose sign is fp32 summation noise, and two layouts (any
    two, shared or not) then differ by a whole step there. SGD keeps weight differences at lr times
    the gradient differences, so the final weights can be compared tightly."""
    model = tiny_llama(seed=5).train()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    flat = [s for c, r in pairs for s in (c, r)]
    ref = sequence_logps(tiny_llama(seed=6), flat, "padded", micro_batch_size=8).view(-1, 2)
    losses, first_grads = [], None
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        groups = plan(
            [len(c.input_ids) + len(r.input_ids) for c, r in pairs], backend, max_tokens=250, micro_batch_size=3
        )
        assert len(groups) > 1  # gradient accumulation over several micro-batches is exercised
        for g in groups:
            batch = collate([s for i in g for s in pairs[i]], backend)
            with attention_for(model, backend, "cpu"):
                logps = batch_logps(model, batch).view(-1, 2)
                out = dpo_loss(logps[:, 0], logps[:, 1], ref[g, 0], ref[g, 1], beta=beta)
                loss = out.losses.sum() / len(pairs)
                loss.backward()
            total += loss.item()
        first_grads = first_grads or {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(total)
    return losses, first_grads, model.state_dict()


def test_dpo_training_identical_across_backends():
    seqs = random_seqs(20, seed=11)
    # half the pairs share a prefix (what the shared backend computes once), half share nothing
    pairs = [
        (
            seqs[2 * i],
            seqs[2 * i + 1]
            if i % 2
            else Seq(
                seqs[2 * i].input_ids[:12] + seqs[2 * i + 1].input_ids,
                seqs[2 * i].loss_mask[:12] + seqs[2 * i + 1].loss_mask,
            ),
        )
        for i in range(10)
    ]
    results = {b: _train(b, pairs) for b in BACKENDS}
    base_losses, base_grads, base_state = results["padded"]
    assert base_losses[-1] < base_losses[0]  # it actually trains
    for b in ("bucketed", "packed", "shared"):
        losses, grads, state = results[b]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(base_losses), rtol=RTOL, atol=ATOL)
        # fp32 sums of the same terms in another order differ by a few ulps of the LARGEST
        # coordinate (the shared prefix's gradient is one sum, not two): atol scales with it.
        for k in base_grads:
            scale = base_grads[k].abs().max().item()
            torch.testing.assert_close(grads[k], base_grads[k], rtol=1e-4, atol=1e-5 * scale)
        for k in base_state:
            torch.testing.assert_close(state[k], base_state[k], rtol=1e-4, atol=1e-5)


def test_training_step_runs_under_the_backends_attention(monkeypatch):
    """train_step switches the model to the kernel its backend needs for the forward AND backward
    (on CUDA, packed rows go to flash-attn varlen / FlexAttention, not SDPA over a dense mask).
    Here a stand-in: packed asks for eager attention, whose CPU backward exists."""
    from accelerate import Accelerator

    from etokit.train import logprobs
    from etokit.train.dpo import DPOConfig, PairTokens, train_step

    model = tiny_llama(seed=7).train()
    seqs = random_seqs(6, seed=12, lengths=[20, 31, 9, 14, 25, 25])
    tokens = PairTokens(seqs[0::2], seqs[1::2], [0, 0, 0], 0)
    ref = sequence_logps(model, tokens.flat(), "padded").view(-1, 2)
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(module.config._attn_implementation)
    )
    monkeypatch.setattr(logprobs, "packed_attn_implementation", lambda device: "eager")
    cfg = DPOConfig(model="m", data="d", output_dir="o", batch_size=3, max_tokens_per_micro_batch=60)
    sums = train_step(Accelerator(cpu=True), model, tokens, ref, [0, 1, 2], 3, "packed", cfg, 0)
    assert seen and set(seen) == {"eager"}
    assert model.config._attn_implementation == "sdpa"
    assert all(p.grad is not None for p in model.parameters())
    torch.testing.assert_close(sums["loss"] / 3, torch.tensor(math.log(2)), rtol=1e-5, atol=1e-5)  # policy == ref


def test_attention_features_the_tree_kernels_lack():
    from transformers import Gemma2Config, MistralConfig, Qwen2Config

    from etokit.train.logprobs import default_backend

    assert prefix_attention.unsupported(tiny_llama().config) is None
    mistral = MistralConfig(sliding_window=64)
    assert "sliding-window" in prefix_attention.unsupported(mistral)  # sequence lengths unknown
    assert prefix_attention.unsupported(mistral, longest=64) is None  # every sequence fits in the window
    assert "sliding-window" in prefix_attention.unsupported(mistral, longest=65)
    assert prefix_attention.unsupported(Qwen2Config(use_sliding_window=False, sliding_window=16), longest=999) is None
    assert "soft-capping" in prefix_attention.unsupported(Gemma2Config())
    assert default_backend("cpu", mistral, longest=65) == "bucketed"
    assert default_backend("cpu", mistral, longest=20) == "shared" == default_backend("cpu")
    assert default_backend("cuda") == "packed"


def test_sliding_window_model_runs_shared_only_within_its_window():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=40,
    )
    cfg._attn_implementation = "sdpa"
    model = MistralForCausalLM(cfg).eval()
    pairs = shared_pairs(seed=9)
    fits = [(c, r) for c, r in pairs if max(len(c.input_ids), len(r.input_ids)) <= 40]
    assert len(fits) >= 4
    got = sequence_logps(model, flatten(fits), "shared", max_tokens=100)
    torch.testing.assert_close(got, direct_logps(model, flatten(fits)), rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="sliding window"):
        sequence_logps(model, flatten(pairs), "shared", max_tokens=100)


def test_packed_rows_hand_the_varlen_kernel_the_rows_boundaries(monkeypatch):
    """The route a CUDA host with flash-attn takes (``packed`` -> ``flash_attention_2``, varlen):
    ``cu_seq_lens_q/k`` and ``max_length_q/k`` go straight to the kernel. No GPU is lent to CI, so a
    stand-in kernel registered under a flash name records what it is handed and computes varlen
    attention from those boundaries alone (each segment causal over itself, as flash-attn does):
    the boundaries must be the packed rows' own, and the log-probs the direct formula's."""
    from transformers import AttentionInterface

    from etokit.train import logprobs

    calls = []

    def varlen_standin(
        module,
        query,
        key,
        value,
        attention_mask,
        *,
        cu_seq_lens_q,
        cu_seq_lens_k,
        max_length_q,
        max_length_k,
        scaling=None,
        **kwargs,
    ):
        calls.append((cu_seq_lens_q.clone(), cu_seq_lens_k.clone(), max_length_q, max_length_k, tuple(query.shape)))
        # flash-attn varlen sees the batch flattened: [total_tokens, heads, dim]
        groups = query.shape[1] // key.shape[1]
        q, k, v = (
            t.transpose(1, 2).flatten(0, 1)
            for t in (query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1))
        )
        out = torch.empty_like(q)
        bounds = cu_seq_lens_q.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(
                q[start:end].transpose(0, 1),
                k[start:end].transpose(0, 1),
                v[start:end].transpose(0, 1),
                is_causal=True,
                scale=scaling,
            ).transpose(0, 1)
        return out.view(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None

    # Registered under a plain name (transformers would import flash-attn for a "flash..." one); the
    # model reports it to etokit as flash_attention_2, whose branch is under test.
    AttentionInterface.register("varlen_standin", varlen_standin)
    real = logprobs._attn_implementation
    monkeypatch.setattr(
        logprobs, "_attn_implementation", lambda m: "flash_attention_2" if real(m) == "varlen_standin" else real(m)
    )
    model = tiny_llama(seed=4)
    seqs = random_seqs(9, seed=8, lengths=[23, 1, 40, 7, 1, 18, 31, 5, 12])
    expected = direct_logps(model, seqs)
    monkeypatch.setattr(logprobs, "packed_attn_implementation", lambda device: "varlen_standin")
    got = sequence_logps(model, seqs, "packed", max_tokens=64)  # several rows, padded to the widest
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert model.config._attn_implementation == "sdpa"

    # The reference boundaries, from the planned micro-batches (one packed row each): each
    # sequence a segment, in the row's order.
    groups = plan([len(s.input_ids) for s in seqs], "packed", 64, 4)
    layers = model.config.num_hidden_layers
    assert len(calls) == layers * len(groups) and len(groups) > 1
    for k, g in enumerate(groups):
        lengths = [len(seqs[i].input_ids) for i in g]
        for cu_q, cu_k, max_q, max_k, _ in calls[k * layers : (k + 1) * layers]:
            assert cu_q.dtype == torch.int32 and cu_q.tolist() == cu_k.tolist() == [0, *itertools.accumulate(lengths)]
            assert max_q == max_k == max(lengths)

    # Several rows in one batch (training's layout): offsets run over the flattened [rows * width]
    # tokens and each shorter row's padding is a segment of its own.
    calls.clear()
    rows = [[0, 1, 2], [3, 4, 5, 6], [7, 8]]
    batch = collate_packed(seqs, rows)
    width = batch.input_ids.shape[1]
    bounds, segments = [0], []
    for row in rows:
        lengths = [len(seqs[i].input_ids) for i in row]
        lengths += [width - sum(lengths)] if sum(lengths) < width else []
        segments += lengths
    bounds += list(itertools.accumulate(segments))
    with torch.no_grad(), attention_for(model, "packed", "cpu"):
        got = batch_logps(model, batch)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert len(calls) == layers and bounds[-1] == len(rows) * width
    for cu_q, cu_k, max_q, max_k, _ in calls:
        assert cu_q.tolist() == cu_k.tolist() == bounds and max_q == max_k == max(segments)
