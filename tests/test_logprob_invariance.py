"""padded == bucketed == packed, per sequence and through DPO training (TRL's invariance tests
are the model). A tiny Llama in fp32 on random tokens with random assistant masks."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from etokit.train.dpo_loss import dpo_loss
from etokit.train.logprobs import BACKENDS, batch_logps, collate, plan, sequence_logps
from etokit.train.packing import collate_packed

RTOL, ATOL = 1e-5, 1e-5


@dataclass
class Seq:
    input_ids: list[int]
    loss_mask: list[bool]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def random_seqs(n, seed, lengths=None):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [1, 1, 2] + torch.randint(3, 90, (n - 3,), generator=g).tolist()
    return [Seq(torch.randint(1, 97, (L,), generator=g).tolist(), (torch.rand(L, generator=g) < 0.6).tolist())
            for L in lengths]


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
    assert not torch.allclose(sums(use_cache=False, attention_mask=torch.ones_like(b.input_ids)), expected,
                              rtol=1e-3, atol=1e-3)


def _train(backend, pairs, steps=3, beta=0.5):
    """A few AdamW steps of DPO with one backend; returns losses and final weights."""
    model = tiny_llama(seed=5).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    flat = [s for c, r in pairs for s in (c, r)]
    ref = sequence_logps(tiny_llama(seed=6), flat, "padded", micro_batch_size=8).view(-1, 2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        groups = plan([len(c.input_ids) + len(r.input_ids) for c, r in pairs], backend, max_tokens=250,
                      micro_batch_size=3)
        assert len(groups) > 1  # gradient accumulation over several micro-batches is exercised
        for g in groups:
            batch = collate([s for i in g for s in pairs[i]], backend)
            logps = batch_logps(model, batch).view(-1, 2)
            out = dpo_loss(logps[:, 0], logps[:, 1], ref[g, 0], ref[g, 1], beta=beta)
            loss = out.losses.sum() / len(pairs)
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    return losses, model.state_dict()


def test_dpo_training_identical_across_backends():
    seqs = random_seqs(20, seed=11)
    pairs = [(seqs[2 * i], seqs[2 * i + 1]) for i in range(10)]
    results = {b: _train(b, pairs) for b in BACKENDS}
    base_losses, base_state = results["padded"]
    assert base_losses[-1] < base_losses[0]  # it actually trains
    for b in ("bucketed", "packed"):
        losses, state = results[b]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(base_losses), rtol=RTOL, atol=ATOL)
        for k in base_state:
            torch.testing.assert_close(state[k], base_state[k], rtol=1e-4, atol=1e-5)
