"""The preference losses against their formulas, and sequence log-probabilities without the full logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from hfbridge.losses import bradley_terry_loss, kto_losses, pair_losses, sequence_logprobs


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_ipo_hinge_simpo_orpo_follow_their_formulas():
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-3.5]), torch.tensor([-4.0])
    nc, nr = torch.tensor([3.0]), torch.tensor([4.0])
    beta, ls = 0.2, 0.1
    h = (-3.0 + 3.5) - (-5.0 + 4.0)  # 1.5
    dpo, c, r = pair_losses("dpo", pc, pr, rc, rr, beta=beta, label_smoothing=ls)
    assert dpo.item() == pytest.approx(-(1 - ls) * _logsig(beta * h) - ls * _logsig(-beta * h), rel=1e-6)
    assert (c.item(), r.item()) == pytest.approx((beta * 0.5, beta * -1.0))
    ipo, _, _ = pair_losses("ipo", pc, pr, rc, rr, nc, nr, beta=beta)
    h_mean = (-3.0 / 3 + 3.5 / 3) - (-5.0 / 4 + 4.0 / 4)
    assert ipo.item() == pytest.approx((h_mean - 1 / (2 * beta)) ** 2, rel=1e-6)
    hinge, _, _ = pair_losses("hinge", pc, pr, rc, rr, beta=beta)
    assert hinge.item() == pytest.approx(max(0.0, 1 - beta * h), rel=1e-6)
    simpo, _, _ = pair_losses("simpo", pc, pr, None, None, nc, nr, beta=2.0, gamma=0.5)
    assert simpo.item() == pytest.approx(-_logsig(2.0 * (-1.0 + 1.25) - 0.5), rel=1e-6)
    orpo, c, _ = pair_losses("orpo", pc, pr, None, None, nc, nr, beta=0.1)
    a, b = -1.0, -1.25
    log_odds = (a - b) - (math.log1p(-math.exp(a)) - math.log1p(-math.exp(b)))
    assert orpo.item() == pytest.approx(-0.1 * _logsig(log_odds), rel=1e-6)
    assert c.item() == pytest.approx(0.1 * a)


def test_kto_and_bradley_terry():
    logps, ref = torch.tensor([-2.0, -3.0]), torch.tensor([-2.5, -2.0])
    losses, rewards = kto_losses(logps, ref, torch.tensor([True, False]), torch.tensor(0.2), beta=0.5,
                                 desirable_weight=1.0, undesirable_weight=2.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert losses.tolist() == pytest.approx([1 - sig(0.5 * (0.5 - 0.2)), 2.0 * (1 - sig(0.5 * (0.2 + 1.0)))])
    assert rewards.tolist() == pytest.approx([0.25, -0.5])
    # a negative KL estimate counts as zero
    assert kto_losses(logps, ref, torch.tensor([True, True]), torch.tensor(-1.0))[0][0].item() == pytest.approx(
        1 - sig(0.1 * 0.5))
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(-_logsig(1.0))


@pytest.mark.parametrize("chunk", [1, 3, 512])
def test_sequence_logprobs_from_hidden_states_equal_full_logits_with_gradients(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.tensor([[-100, 3, 4, -100, 7], [1, 2, -100, 5, 6]])
    ids = torch.tensor([[-1, 0, 0, -1, 2], [1, 1, -1, 3, 3]])  # two sequences share a row (packed)
    sums, counts = sequence_logprobs(labels, ids, 4, hidden=hidden, weight=weight, chunk_size=chunk)
    logp = F.log_softmax(hidden @ weight.T, dim=-1)
    expected = torch.zeros(4)
    for b in range(2):
        for t in range(5):
            if labels[b, t] != -100:
                expected[ids[b, t]] += logp[b, t, labels[b, t]]
    assert torch.allclose(sums, expected, atol=1e-5)
    assert counts.tolist() == [2.0, 2.0, 1.0, 2.0]
    g_ours = torch.autograd.grad((sums * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum(), (hidden, weight))
    g_ref = torch.autograd.grad((expected * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum(), (hidden, weight))
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-5)
    full, _ = sequence_logprobs(labels, ids, 4, logits=(hidden @ weight.T))
    assert torch.allclose(full, expected, atol=1e-5)


def test_sequence_ids_out_of_range_are_an_error():
    with pytest.raises(ValueError, match="sequence_ids"):
        sequence_logprobs(torch.tensor([[1, 2]]), torch.tensor([[0, 5]]), 2, logits=torch.randn(1, 2, 4))
