"""The blockwise causal attention of context parallelism (no mask) against one process's causal sdpa: each cp
rank's output and gradients, for query/key heads equal and grouped, any cp, rows padded or not."""

import pytest
import torch
import torch.nn.functional as F

from hfbridge.parallel.context import (
    _plain_causal,
    blockwise_marker,
    causal_blocks_attention,
    chunk_indices,
    key_order,
    shard_batch,
)


@pytest.mark.parametrize("cp,heads,kv_heads,length", [(2, 4, 4, 16), (2, 4, 2, 24), (3, 6, 2, 36), (1, 2, 1, 8)])
def test_each_rank_equals_its_rows_of_one_process_causal_attention(cp, heads, kv_heads, length):
    torch.manual_seed(0)
    q = torch.randn(2, heads, length, 8, dtype=torch.float64)
    k = torch.randn(2, kv_heads, length, 8, dtype=torch.float64)
    v = torch.randn(2, kv_heads, length, 8, dtype=torch.float64)
    grad = torch.randn(2, heads, length, 8, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    ref.backward(grad)
    order = key_order(length, cp)
    gathered_k = k[:, :, order].clone().requires_grad_()
    gathered_v = v[:, :, order].clone().requires_grad_()
    grad_q = torch.zeros_like(q)
    for rank in range(cp):
        local = chunk_indices(length, cp, rank)
        q_local = q[:, :, local].clone().requires_grad_()
        out = causal_blocks_attention(q_local, gathered_k, gathered_v, length, cp, rank, scaling=None)
        torch.testing.assert_close(out, ref[:, :, local].detach(), rtol=1e-10, atol=1e-10)
        out.backward(grad[:, :, local])
        grad_q[:, :, local] = q_local.grad
    torch.testing.assert_close(grad_q, leaves[0].grad, rtol=1e-10, atol=1e-10)
    # the gathered keys' gradients, summed over ranks (what the all-gather's backward does), in global order
    inverse = torch.argsort(order)
    torch.testing.assert_close(gathered_k.grad[:, :, inverse], leaves[1].grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gathered_v.grad[:, :, inverse], leaves[2].grad, rtol=1e-10, atol=1e-10)


def test_plain_rows_get_a_marker_and_masked_or_packed_rows_a_dense_mask():
    ids = torch.arange(10).reshape(1, 10)
    plain = shard_batch({"input_ids": ids, "labels": ids}, 2, 1)
    mask = plain["attention_mask"]
    assert mask._hfbridge_cp_layout == (12, 2, 1) and mask.shape == (1, 1, 6, 12)
    assert mask.untyped_storage().nbytes() == 1  # one element, whatever the length
    right_padded = torch.tensor([[1] * 7 + [0] * 3])
    assert _plain_causal(right_padded, None, ids)
    shard = shard_batch({"input_ids": ids, "attention_mask": right_padded}, 2, 0)
    assert hasattr(shard["attention_mask"], "_hfbridge_cp_layout")
    left_padded = torch.tensor([[0] * 3 + [1] * 7])
    dense = shard_batch({"input_ids": ids, "attention_mask": left_padded}, 2, 0)["attention_mask"]
    assert not hasattr(dense, "_hfbridge_cp_layout") and dense.shape == (1, 1, 6, 12)
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    dense = shard_batch({"input_ids": ids, "position_ids": packed}, 2, 0)["attention_mask"]
    assert not hasattr(dense, "_hfbridge_cp_layout")
    one_sample = torch.arange(10)[None]
    assert hasattr(shard_batch({"input_ids": ids, "position_ids": one_sample}, 2, 0)["attention_mask"],
                   "_hfbridge_cp_layout")
    assert blockwise_marker(2, 8, 2, 0).shape == (2, 1, 4, 8)
