"""Layouts: packed rows restart positions, never score a boundary token, pad as their own segment."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from etokit.train.packing import bucket, chunk, collate_packed, collate_padded, pack


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
