import pytest
import torch
import torch.nn.functional as F

from hfbridge import chunked_linear_cross_entropy, masked_cross_entropy
from hfbridge.losses import IGNORE_INDEX, count_label_tokens


def test_masked_cross_entropy_matches_reference_on_kept_tokens():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = IGNORE_INDEX
    mask = torch.ones(2, 5)
    mask[1, 4] = 0
    keep = (targets != IGNORE_INDEX) & mask.bool()
    reference = F.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(masked_cross_entropy(logits, targets, mask), reference, atol=1e-6)
    assert torch.allclose(masked_cross_entropy(logits, targets, mask, reduction="sum"), reference * keep.sum(), atol=1e-5)
    assert count_label_tokens(targets, mask) == int(keep.sum())


def test_masked_cross_entropy_without_mask_is_plain_cross_entropy_ignoring_minus_100():
    logits = torch.randn(3, 4, 7)
    targets = torch.randint(0, 7, (3, 4))
    targets[2, 1] = IGNORE_INDEX
    reference = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(masked_cross_entropy(logits, targets), reference, atol=1e-6)


def test_nothing_to_train_gives_zero_not_nan_and_backpropagates():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    targets = torch.full((1, 3), IGNORE_INDEX)
    loss = masked_cross_entropy(logits, targets)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_mask_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="loss_mask has shape"):
        masked_cross_entropy(torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_linear_cross_entropy_equals_full_logits(reduction):
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9))
    targets[1, 3:] = IGNORE_INDEX
    full = masked_cross_entropy(hidden @ weight.T, targets, reduction=reduction)
    g_full = torch.autograd.grad(full, (hidden, weight))
    chunked = chunked_linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=4)
    g_chunked = torch.autograd.grad(chunked, (hidden, weight))
    assert torch.allclose(full, chunked, atol=1e-5)
    for a, b in zip(g_full, g_chunked):
        assert torch.allclose(a, b, atol=1e-5)


def test_masked_cross_entropy_takes_the_seeds_flattened_tensors_too():
    """NeMo hands ``logits.view(-1, V)``, ``labels.view(-1)``, ``mask.view(-1)``: the same value as the 3-D call, and
    the same as NeMo's own ``F.cross_entropy(..., reduction="none")[mask == 1].mean()``."""
    logits = torch.randn(2, 6, 13)
    targets = torch.randint(0, 13, (2, 6))
    targets[1, :3] = IGNORE_INDEX
    mask = (targets != IGNORE_INDEX).long()
    mask[0, 0] = 0
    flat = masked_cross_entropy(logits.view(-1, 13), targets.view(-1), mask.view(-1))
    assert torch.allclose(flat, masked_cross_entropy(logits, targets, mask), atol=1e-6)
    nemo = F.cross_entropy(logits.view(-1, 13), targets.view(-1), reduction="none")[mask.view(-1) == 1].mean()
    assert torch.allclose(flat, nemo, atol=1e-6)
