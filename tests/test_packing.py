"""Layouts: packed rows restart positions, never score a boundary token, pad as their own segment."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from etokit.train.packing import (
    bucket,
    chunk,
    collate_packed,
    collate_padded,
    collate_shared,
    common_prefix,
    pack,
    shared_length,
)


@dataclass
class Seq:
    input_ids: list[int]
    loss_mask: list[bool]


SEQS = [Seq([5, 6, 7], [True, True, False]), Seq([9], [True]), Seq([3], [False]), Seq([4, 8], [False, True])]


def test_packed_row_positions_targets_boundaries():
    b = collate_packed(SEQS)
    assert b.attention_mask is None and b.packed
    assert b.input_ids.tolist() == [[5, 6, 7, 9, 3, 4, 8]]
    # 0 after 0 (two single-token sequences in a row) is a boundary like any other restart
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 0, 0, 1]]
    # The first token of every sequence is never a target, whatever its mask says.
    assert b.targets.tolist() == [[False, True, False, False, False, False, True]]
    assert b.seq_index.tolist() == [[0, 0, 0, 1, 2, 3, 3]]
    assert b.cu_seqlens.tolist() == [0, 3, 4, 5, 7]
    assert b.max_seqlen == 3 and b.num_tokens == 7 and b.num_seqs == 4


def test_packed_multi_row_padding_is_its_own_segment():
    b = collate_packed(SEQS, rows=[[0, 1], [2, 3]], pad_token_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 9], [3, 4, 8, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0], [0, 0, 1, 0]]
    assert b.seq_index.tolist() == [[0, 0, 0, 1], [2, 3, 3, -1]]
    assert b.cu_seqlens.tolist() == [0, 3, 4, 5, 7, 8]
    assert b.num_tokens == 7 and b.padded_tokens == 8
    with pytest.raises(ValueError, match="exactly once"):
        collate_packed(SEQS, rows=[[0, 1], [1, 2, 3]])


def test_padded():
    b = collate_padded(SEQS, pad_token_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7], [9, 0, 0], [3, 0, 0], [4, 8, 0]]
    # Right padding needs no mask under causal attention (the SDPA is_causal fast path); the
    # invariance tests prove the log-probs are unchanged.
    assert b.attention_mask is None and not b.packed
    assert b.position_ids.tolist() == [[0, 1, 2]] * 4
    assert b.targets.tolist() == [[False, True, False], [False] * 3, [False] * 3, [False, True, False]]
    assert b.seq_index[:, 0].tolist() == [0, 1, 2, 3] and b.seq_index[1, 1].item() == -1


def test_shared_row_tree_positions_and_scoring():
    # pair 0: common prefix [1, 2, 3], chosen suffix [4, 5], rejected suffix [6]; the prefix's
    # token 3 is scored by chosen only, token 2 by both. pair 1: nothing in common.
    chosen0 = Seq([1, 2, 3, 4, 5], [False, True, True, True, False])
    rejected0 = Seq([1, 2, 3, 6], [True, True, False, True])
    chosen1, rejected1 = Seq([7, 8], [False, True]), Seq([9], [True])
    b = collate_shared([(chosen0, rejected0), (chosen1, rejected1)])
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    # every token keeps the position it has in its own sequence
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 0]]
    assert b.prefix_tree == ((0, 3, 2, 1), (6, 0, 2, 1))
    assert b.num_seqs == 4 and b.num_tokens == 12 and b.padded_tokens == 9
    assert b.attention_mask is None and b.targets is None
    keep, rows, labels, owners = b.scoring()
    # logits needed: row 0 (-> 2), 1 (-> 3), 2 (-> 4 and -> 6: the rejected suffix starts from the
    # prefix's last position, not from its left neighbour 5), 6 (-> 8); row 4 predicts nothing
    assert keep.tolist() == [[True, True, True, False, False, False, True, False, False]]
    kept = keep[0].nonzero().flatten()
    got = sorted((owners[n].item(), kept[rows[n]].item(), labels[n].item()) for n in range(len(labels)))
    assert got == [(0, 0, 2), (0, 1, 3), (0, 2, 4), (1, 0, 2), (1, 2, 6), (2, 6, 8)]


def test_shared_lengths():
    a, b = Seq([1, 2, 3, 4], [True] * 4), Seq([1, 2, 9], [True] * 3)
    assert common_prefix(a.input_ids, b.input_ids) == 2 and shared_length(a, b) == 5
    assert common_prefix([1, 2], [1, 2, 3]) == 2 and common_prefix([1, 2], [1, 2]) == 2 and common_prefix([5], [6]) == 0
    b = collate_shared([(a, a)])  # identical sides: a tree with two empty suffixes
    assert b.prefix_tree == ((0, 4, 0, 0),) and b.input_ids.tolist() == [[1, 2, 3, 4]]


def test_bad_sequences():
    with pytest.raises(ValueError, match="empty"):
        collate_padded([Seq([], [])])
    with pytest.raises(ValueError, match="loss_mask"):
        collate_packed([Seq([1, 2], [True])])


def test_pack_first_fit_decreasing():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (200,), generator=g).tolist() + [150]
    rows = pack(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    for r in rows:
        total = sum(lengths[i] for i in r)
        assert total <= 100 or len(r) == 1  # only a too-long sequence may exceed the budget, alone
    # near-optimal: FFD uses at most 11/9 OPT + 1 rows
    lower_bound = -(-sum(min(n, 100) for n in lengths) // 100)
    assert len(rows) <= 11 * lower_bound // 9 + 1
    assert rows == pack(lengths, 100)  # deterministic


def test_bucket_groups_similar_lengths_under_budget():
    lengths = [10, 300, 12, 290, 11, 5, 305]
    groups = bucket(lengths, 700)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 700 or len(g) == 1
    assert groups[0] == [6, 1]  # longest first, together
    # groups are consecutive runs of the length-sorted order
    assert [i for g in groups for i in g] == sorted(range(len(lengths)), key=lambda i: -lengths[i])
    assert len(groups) == 3
    assert bucket(lengths, 10_000, max_size=3)[0] == [6, 1, 3]


def test_chunk():
    assert chunk(5, 2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        chunk(5, 0)
