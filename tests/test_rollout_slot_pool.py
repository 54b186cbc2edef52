"""The slot engine (etokit/rollout/slot_pool.py): its attention against plain masked attention,
and its decoding against the concatenated-cache engine, step after step."""

from __future__ import annotations

import pytest
import torch

from etokit.agent.protocol import load_instruction
from etokit.rollout.slot_pool import SlotBatch, _Prefix, _Segment, _Store, slot_attention

H, HKV, D, LAYERS = 6, 2, 8, 2


def _reference(q, keys, values, n):
    """Plain attention of the last ``n`` positions of a sequence over all of it, causal."""
    total = keys.shape[1]
    mask = torch.ones(n, total, dtype=torch.bool).tril(total - n)
    return torch.nn.functional.scaled_dot_product_attention(
        q[None], keys[None], values[None], attn_mask=mask, enable_gqa=True
    )[0]


def test_slot_attention_is_masked_attention_over_each_rows_own_tokens():
    """One packed forward's layer: a shared prefix computed in this same forward and borrowed by
    two rows (one new, one with kept tokens), a row borrowing part of an older prefix and decoding
    one token, and a row with no prefix. Each row's output is plain causal attention over exactly
    [borrowed prefix[:m] | kept | new] tokens."""
    torch.manual_seed(0)
    new = lambda n: (torch.randn(HKV, n, D), torch.randn(HKV, n, D))  # noqa: E731

    def store(n_kept):
        s = _Store((LAYERS, HKV, D), n_kept + 8, torch.float32, "cpu")
        s.kv[:, :, :, :n_kept] = torch.randn(LAYERS, 2, HKV, n_kept, D)
        s.n = n_kept
        return s

    old = _Prefix(list(range(12)), store(12))
    fresh = _Prefix(list(range(7)), _Store((LAYERS, HKV, D), 7, torch.float32, "cpu"))
    # (store, kept positions, new tokens, prefix, m)
    rows = [
        (fresh.store, 0, 7, None, 0),  # the shared prefix itself, computed here
        (store(0), 0, 5, fresh, 7),  # a new episode on it
        (store(9), 9, 3, fresh, 7),  # an episode with kept tokens and 3 new ones
        (store(20), 20, 1, old, 10),  # a decode step borrowing the first 10 tokens of an older prefix
        (store(6), 6, 4, None, 0),  # no prefix at all
        (store(0), 0, 3, old, 12),  # a second row of a group (old, 12) and alone in nothing else
    ]
    segments, ks, vs, at = [], [], [], 0
    for st, past, n, prefix, m in rows:
        segments.append(_Segment(st, past, n, at, prefix, m))
        k, v = new(n)
        ks.append(k)
        vs.append(v)
        at += n
    query = torch.randn(1, H, at, D)
    layer = 1
    module = type("Attn", (), {"layer_idx": layer})()
    out, _ = slot_attention(
        module, query, torch.cat(ks, 1)[None], torch.cat(vs, 1)[None], None, slot_batch=SlotBatch(segments)
    )
    assert out.shape == (1, at, H, D)
    for s, k, v in zip(segments, ks, vs):
        own_k = s.store.kv[layer, 0, :, : s.past + s.n]
        own_v = s.store.kv[layer, 1, :, : s.past + s.n]
        assert torch.equal(own_k[:, s.past :], k) and torch.equal(own_v[:, s.past :], v)  # written in place
        if s.prefix is not None:
            own_k = torch.cat([s.prefix.store.kv[layer, 0, :, : s.m], own_k], 1)
            own_v = torch.cat([s.prefix.store.kv[layer, 1, :, : s.m], own_v], 1)
        want = _reference(query[0, :, s.start : s.start + s.n], own_k, own_v, s.n)
        torch.testing.assert_close(out[0, s.start : s.start + s.n].transpose(0, 1), want, atol=2e-6, rtol=1e-5)


def test_slot_attention_needs_its_batch():
    module = type("Attn", (), {"layer_idx": 0})()
    with pytest.raises(RuntimeError, match="slot_batch"):
        slot_attention(module, torch.zeros(1, H, 1, D), torch.zeros(1, HKV, 1, D), torch.zeros(1, HKV, 1, D), None)


def _decode(policy, engine, steps, keep_reply=True, max_new_tokens=14):
    """Run ``steps`` through a decoder: each episode's prompt grows by its last reply and a new
    user turn; returns the replies per step and the decoder."""
    from etokit.rollout.kv_reuse import KVReuseDecoder
    from etokit.rollout.slot_pool import SlotDecoder

    tok = policy.tokenizer
    base = tok(load_instruction("webshop"), add_special_tokens=False)["input_ids"][:120]
    words = ["shoes", "a red lamp for the desk under 30 dollars", "blue", "tea kettle, steel", "socks"]
    options = dict(
        pad_id=tok.pad_token_id,
        eos_ids=[tok.eos_token_id],
        max_new_tokens=max_new_tokens,
        stopped=lambda ids, checked: ids[-1] % 7 == 0,
    )
    if engine == "slots":
        decoder = SlotDecoder(policy.model, keep_reply=keep_reply, **options)
    else:
        decoder = KVReuseDecoder(policy.model, in_place=False, **options)
    convo, out = {}, []
    for step in steps:
        for key, w in step:
            convo[key] = convo.get(key, base) + tok(words[w], add_special_tokens=False)["input_ids"]
        replies = decoder.generate([convo[k] for k, _ in step], [k for k, _ in step])
        for (key, _), reply in zip(step, replies):
            # The conversation keeps the reply without its last two tokens, as when a stop string
            # is cut off or the reply re-tokenizes differently: a slot holds tokens past that point.
            convo[key] = convo[key] + reply[: max(1, len(reply) - 2)]
        out.append(replies)
    return out, decoder


# Episodes a, b, c start together; then d starts alone mid-run (it borrows from a running episode);
# then e starts alone after the others' prefixes changed, and a, d, c keep going.
STEPS = [
    [("a", 0), ("b", 1), ("c", 2)],
    [("a", 3), ("d", 4), ("c", 0)],
    [("d", 2), ("e", 1), ("a", 4)],
    [("a", 1), ("d", 0), ("c", 3), ("e", 2)],
]


def test_slot_decoder_equals_the_concatenated_cache(policy):
    """The greedy token ids of the slot engine are the reference engine's, step after step: rows
    of different lengths, kept replies, a shared prefix prefilled once, new episodes that borrow
    a copy of a running episode's tokens, and rows that stop at different tokens. With
    ``keep_reply=False`` the replies are prefilled again, as the other engines do."""
    reference, _ = _decode(policy, "concat", STEPS)
    kept, decoder = _decode(policy, "slots", STEPS)
    again, redone = _decode(policy, "slots", STEPS, keep_reply=False)
    assert kept == reference and again == reference
    # The comparison has teeth: replies stop at different lengths, and kept tokens were reused.
    assert len({len(r) for replies in kept for r in replies}) > 2
    assert decoder.reused > 2 * decoder.prefilled
    # Every reply of an episode that plays the next step was kept as far as the next prompt holds
    # it (all but its last two tokens, or its first one) and its tokens were fed (all but the last),
    # and prefilled again without keep_reply. (An episode absent from a call has
    # ended: its slot is freed, as c's at the third step.)
    continuing = [
        len(reply)
        for i, step in enumerate(STEPS[:-1])
        for (key, _), reply in zip(step, kept[i])
        if key in {k for k, _ in STEPS[i + 1]}
    ]
    assert redone.prefilled - decoder.prefilled >= sum(min(n - 1, max(1, n - 2)) for n in continuing) > 20


def test_slot_decoder_frees_ended_episodes_and_shares_one_prefix(policy):
    _, decoder = _decode(policy, "slots", STEPS[:1])
    (prefix,) = decoder.prefixes  # a, b and c started together: one shared prefix, prefilled once
    assert all(slot.prefix is prefix for slot in decoder.slots.values())
    assert decoder.prefilled < 2 * 120
    _, decoder = _decode(policy, "slots", STEPS)
    assert sorted(decoder.slots) == ["a", "c", "d", "e"]  # b ended: its slot is gone
    # d and e started alone and borrowed what they share with running episodes.
    assert decoder.slots["d"].m >= 100 and decoder.slots["e"].m >= 100


def test_a_new_episode_borrows_one_of_two_prefixes_it_shares_equally(policy):
    """Two groups started apart hold two shared prefixes; a later episode shares the instruction
    with both, equally: it borrows one of them (the tie must not compare the prefixes) and plays
    as the reference engine does."""
    steps = [
        [("a", 1), ("b", 1)],  # one prefix: the instruction and word 1
        [("a", 0), ("b", 2), ("c", 3), ("d", 3)],  # another: the instruction and word 3
        [("a", 4), ("b", 0), ("c", 0), ("d", 1), ("e", 0)],  # e shares only the instruction with both
    ]
    slots, decoder = _decode(policy, "slots", steps)
    reference, _ = _decode(policy, "concat", steps)
    assert slots == reference
    assert len(decoder.prefixes) >= 2
    assert decoder.slots["e"].m >= 100 and decoder.slots["e"].prefix in decoder.prefixes
