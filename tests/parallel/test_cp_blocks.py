"""The blockwise causal attention of context parallelism (no mask) against one process's attention: each cp rank's
output and gradients, for query/key heads equal and grouped, any cp, rows of one sequence and packed rows."""

import pytest
import torch
import torch.nn.functional as F

from hfbridge.parallel.context import (
    causal_blocks_attention,
    chunk_indices,
    key_order,
    sample_ids,
    sample_segments,
    shard_batch,
)


def _check_ranks(q, k, v, cp, reference_mask=None, positions=None):
    """Every rank's outputs and gradients against sdpa of the whole rows (causal, or under ``reference_mask``)."""
    length = q.shape[2]
    grad = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if reference_mask is None:
        ref = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    else:
        ref = F.scaled_dot_product_attention(*leaves, attn_mask=reference_mask, enable_gqa=True)
    ref.backward(grad)
    order = key_order(length, cp)
    gathered_k = k[:, :, order].clone().requires_grad_()
    gathered_v = v[:, :, order].clone().requires_grad_()
    grad_q = torch.zeros_like(q)
    for rank in range(cp):
        local = chunk_indices(length, cp, rank)
        segments = None if positions is None else sample_segments(positions, length, cp, rank)
        q_local = q[:, :, local].clone().requires_grad_()
        out = causal_blocks_attention(q_local, gathered_k, gathered_v, length, cp, rank, None, segments)
        torch.testing.assert_close(out, ref[:, :, local].detach(), rtol=1e-10, atol=1e-10)
        out.backward(grad[:, :, local])
        grad_q[:, :, local] = q_local.grad
    torch.testing.assert_close(grad_q, leaves[0].grad, rtol=1e-10, atol=1e-10)
    # the gathered keys' gradients, summed over ranks (what the all-gather's backward does), in global order
    inverse = torch.argsort(order)
    torch.testing.assert_close(gathered_k.grad[:, :, inverse], leaves[1].grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gathered_v.grad[:, :, inverse], leaves[2].grad, rtol=1e-10, atol=1e-10)


def _qkv(rows, heads, kv_heads, length):
    torch.manual_seed(0)
    return (torch.randn(rows, heads, length, 8, dtype=torch.float64),
            torch.randn(rows, kv_heads, length, 8, dtype=torch.float64),
            torch.randn(rows, kv_heads, length, 8, dtype=torch.float64))


@pytest.mark.parametrize("cp,heads,kv_heads,length", [(2, 4, 4, 16), (2, 4, 2, 24), (3, 6, 2, 36), (1, 2, 1, 8)])
def test_each_rank_equals_its_rows_of_one_process_causal_attention(cp, heads, kv_heads, length):
    _check_ranks(*_qkv(2, heads, kv_heads, length), cp)


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_packed_rows_attend_inside_each_sample(cp):
    """Samples that start and end anywhere in the chunks (one spanning three chunks, one of a single token), rows
    packed differently: the same as sdpa under the per-sample causal mask."""
    length = 24
    lengths = [[9, 1, 7, 5, 2], [3, 21]]
    positions = torch.tensor([[p for n in row for p in range(n)] for row in lengths])
    sample = sample_ids(positions)
    pos = torch.arange(length)
    mask = (pos[None, :, None] >= pos[None, None, :]) & (sample[:, :, None] == sample[:, None, :])
    _check_ranks(*_qkv(2, 4, 2, length), cp, reference_mask=mask[:, None], positions=positions)
    assert sample_segments(torch.arange(length)[None], length, cp, 0) is None  # one sample: the whole-row kernel


def test_the_marker_costs_one_element_and_stands_for_the_dense_mask():
    ids = torch.arange(10).reshape(1, 10)
    mask = shard_batch({"input_ids": ids, "labels": ids}, 2, 1)["attention_mask"]
    assert mask._hfbridge_cp_blocks == (12, 2, 1, None) and mask.shape == (1, 1, 6, 12)
    assert mask.untyped_storage().nbytes() == 1  # one element, whatever the length
    local, keys = chunk_indices(12, 2, 1), key_order(12, 2)
    assert torch.equal(mask._hfbridge_cp_dense()[0, 0], keys[None, :] <= local[:, None])
    right_padded = shard_batch({"input_ids": ids, "attention_mask": torch.tensor([[1] * 7 + [0] * 3])}, 2, 0)
    assert right_padded["attention_mask"]._hfbridge_cp_blocks[3] is None
    left_padded = shard_batch({"input_ids": ids, "attention_mask": torch.tensor([[0] * 3 + [1] * 7])}, 2, 0)
    assert not hasattr(left_padded["attention_mask"], "_hfbridge_cp_blocks")  # the dense mask
    assert left_padded["attention_mask"].shape == (1, 1, 6, 12)
    packed = shard_batch({"input_ids": ids, "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])}, 2, 0)
    # rank 0 holds global chunks 0 (tokens 0-2, sample 0) and 3 (tokens 9-11: sample 1, begun at 4, padded on)
    assert packed["attention_mask"]._hfbridge_cp_blocks[3] == [[(0, 3, 0, 0, 3), (3, 6, 4, 9, 12)]]
    one_sample = shard_batch({"input_ids": ids, "position_ids": torch.arange(10)[None]}, 2, 0)
    assert one_sample["attention_mask"]._hfbridge_cp_blocks[3] is None
