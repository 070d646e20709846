"""The KV layout: appends write in place into buffers with room, compaction frees memory, scorer state
moves with the entries."""

from __future__ import annotations

import pytest
import torch

from kvevict.storage import HeadwiseKV


def entries(b: int, h: int, q: int, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keys = torch.arange(start, start + q, dtype=torch.float32).view(1, 1, q, 1).expand(b, h, q, 4).clone()
    positions = torch.arange(start, start + q).expand(b, h, q).clone()
    return keys, keys + 0.5, positions


def test_decoding_appends_in_place_until_the_room_is_used():
    kv = HeadwiseKV.empty(torch.empty(2, 3, 0, 4), torch.empty(2, 3, 0, 4), reserve=4)
    kv.append(*entries(2, 3, 10, 0))
    assert kv.length == 10 and kv.capacity == 14
    buffer = kv.buffers["keys"].data_ptr()
    for t in range(10, 14):
        kv.append(*entries(2, 3, 1, t))
    assert kv.buffers["keys"].data_ptr() == buffer  # four single-token appends, no copy
    kv.append(*entries(2, 3, 1, 14))
    assert kv.buffers["keys"].data_ptr() != buffer and kv.capacity == 19
    assert kv.keys[0, 0, :, 0].tolist() == list(range(15)) and kv.positions[1, 2].tolist() == list(range(15))
    assert bool((kv.bias == 0).all()) and not kv.has_holes


def test_compaction_allocates_exactly_the_kept_slots_and_packs_each_head_at_the_end():
    kv = HeadwiseKV.empty(torch.empty(1, 2, 0, 4), torch.empty(1, 2, 0, 4), reserve=8)
    kv.append(*entries(1, 2, 6, 0))
    keep = torch.tensor([[[1, 0, 1, 0, 1, 1], [0, 0, 0, 1, 1, 0]]], dtype=torch.bool)
    assert kv.compact(keep) == 12 - 6
    assert kv.capacity == kv.length == 4
    assert kv.positions.tolist() == [[[0, 2, 4, 5], [-1, -1, 3, 4]]]
    assert kv.bias[0, 1].tolist() == [-torch.inf, -torch.inf, 0, 0] and kv.has_holes
    assert kv.values[0, 1, 2:, 0].tolist() == [3.5, 4.5]
    assert kv.run_start.tolist() == [[0, 2]]
    assert kv.nbytes() == 2 * 4 * (4 * 4 * 2 + 8 + 4)  # keys, values (float32 x 4), position, bias
    kv.append(*entries(1, 2, 2, 6))  # appends extend every head's run
    assert kv.positions[0, 1, kv.run_start[0, 1]:].tolist() == [3, 4, 6, 7]


def test_slot_state_moves_with_entries_and_starts_new_slots_at_zero():
    kv = HeadwiseKV.empty(torch.empty(1, 1, 0, 4), torch.empty(1, 1, 0, 4), reserve=4)
    kv.append(*entries(1, 1, 3, 0))
    kv.extra["score"] = torch.tensor([[[1.0, 2.0, 3.0]]])
    kv.extra["score"] += 10  # in place through the view
    kv.append(*entries(1, 1, 2, 3))
    assert kv.extra["score"].tolist() == [[[11.0, 12.0, 13.0, 0.0, 0.0]]]
    kv.compact(torch.tensor([[[0, 1, 0, 1, 1]]], dtype=torch.bool))
    assert kv.extra["score"].tolist() == [[[12.0, 0.0, 0.0]]]
    with pytest.raises(ValueError, match="slot state 'score' must be"):
        kv.extra["score"] = torch.zeros(1, 1, 2)


def test_pads_cleared_after_append_are_holes():
    kv = HeadwiseKV.empty(torch.empty(2, 1, 0, 4), torch.empty(2, 1, 0, 4))
    kv.append(*entries(2, 1, 3, 0))
    kv.clear(torch.tensor([[[True, False, False]], [[False, False, False]]]))
    assert kv.positions[:, 0].tolist() == [[-1, 1, 2], [0, 1, 2]] and kv.has_holes
    assert kv.bias[0, 0, 0] == -torch.inf and kv.counts().tolist() == [[2], [3]]
    assert kv.run_start is None  # entries no longer form one run per head
    kv.append(*entries(2, 1, 1, 3))
    kv.clear(torch.tensor([[[False]], [[True]]]))  # a pad after an entry: a hole inside the run
    kv.compact(kv.valid())
    assert kv.positions[:, 0].tolist() == [[1, 2, 3], [0, 1, 2]] and kv.run_start.tolist() == [[0], [0]]


def test_buffers_made_under_inference_mode_are_replaced_outside_it():
    kv = HeadwiseKV.empty(torch.empty(1, 1, 0, 4), torch.empty(1, 1, 0, 4), reserve=8)
    with torch.inference_mode():
        kv.append(*entries(1, 1, 3, 0))
    with torch.no_grad():
        kv.append(*entries(1, 1, 1, 3))  # room is left, but the buffer cannot be written here
    assert not kv.buffers["keys"].is_inference() and kv.positions.tolist() == [[[0, 1, 2, 3]]]


def test_scorer_state_made_under_inference_mode_is_replaced_outside_it():
    kv = HeadwiseKV.empty(torch.empty(1, 1, 0, 4), torch.empty(1, 1, 0, 4), reserve=8)
    kv.append(*entries(1, 1, 3, 0))
    with torch.inference_mode():
        kv.extra["score"] = torch.ones(1, 1, 3)
    kv.append(*entries(1, 1, 1, 3))
    assert kv.extra["score"].tolist() == [[[1.0, 1.0, 1.0, 0.0]]]


def test_forgetting_the_latest_entries_keeps_the_buffers_unless_they_are_not_the_last_slots():
    kv = HeadwiseKV.empty(torch.empty(1, 2, 0, 4), torch.empty(1, 2, 0, 4), reserve=8)
    kv.append(*entries(1, 2, 6, 0))
    buffer = kv.buffers["keys"].data_ptr()
    assert kv.forget_from(4) == 2 * 2 and kv.forget_from(4) == 0
    assert kv.buffers["keys"].data_ptr() == buffer and kv.capacity == 14
    assert kv.positions.tolist() == [[[0, 1, 2, 3], [0, 1, 2, 3]]]
    kv.append(*entries(1, 2, 1, 4))
    assert kv.buffers["keys"].data_ptr() == buffer and kv.keys[0, 1, :, 0].tolist() == [0, 1, 2, 3, 4]
    # heads holding different numbers of the forgotten entries: compaction, to the shorter head's length
    kv.compact(torch.tensor([[[1, 1, 1, 1, 1], [1, 1, 0, 1, 1]]], dtype=torch.bool))
    kv.append(*entries(1, 2, 1, 5))
    kv.compact(torch.tensor([[[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 1]]], dtype=torch.bool))  # head 1 drops 4
    assert kv.positions.tolist() == [[[0, 1, 2, 3, 4, 5], [-1, -1, 0, 1, 3, 5]]]
    assert kv.forget_from(4) == 3 and kv.positions.tolist() == [[[0, 1, 2, 3], [-1, 0, 1, 3]]]
