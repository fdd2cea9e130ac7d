"""SFT sequence losses: the reductions against their definitions and references (F.cross_entropy for
the token mean), micro-batch invariance, gradient weights, and the edge cases (empty rows, masked
garbage, fully masked batches)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt import losses

V = 11


def batch(seed=0, B=5, T=9, p_mask=0.3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < p_mask] = -100
    labels[0, 0] = 3  # at least one token
    return logits, labels


def test_token_nll_matches_cross_entropy():
    logits, labels = batch()
    nll = losses.token_nll(logits, labels)
    want = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view_as(nll)
    torch.testing.assert_close(nll, want)
    assert (nll[labels == -100] == 0).all()


def test_token_mean_is_torch_cross_entropy():
    logits, labels = batch()
    torch.testing.assert_close(losses.sft_loss(logits, labels),
                               F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100))


def test_reductions_by_hand():
    logits, labels = batch(seed=1)
    labels[2] = -100  # an empty row: it takes no part in the per-sequence averages
    l, m = losses.token_nll(logits, labels), (labels != -100).double()
    T_i = m.sum(1)
    rows = T_i > 0
    per_row_sum = (l * m).sum(1)
    cases = {
        "sum": per_row_sum.sum(),
        "token_mean": per_row_sum.sum() / m.sum(),
        "sequence_mean": (per_row_sum[rows] / T_i[rows]).mean(),
    }
    for reduction, want in cases.items():
        torch.testing.assert_close(losses.sft_loss(logits, labels, reduction=reduction), want)
    for alpha in (0.0, 0.5, 1.0, 2.0):
        want = (per_row_sum[rows] / T_i[rows] ** alpha).sum() / rows.sum()
        torch.testing.assert_close(losses.sft_loss(logits, labels, reduction="length_normalized", alpha=alpha), want)
    torch.testing.assert_close(losses.sft_loss(logits, labels, reduction="length_normalized", alpha=1.0),
                               cases["sequence_mean"])


@pytest.mark.parametrize("reduction", ["sum", "token_mean", "sequence_mean", "length_normalized"])
def test_gradient_weights_match_autograd(reduction):
    _, labels = batch(seed=2)
    token_losses = torch.rand(labels.shape, dtype=torch.float64, requires_grad=True)
    mask = labels != -100
    loss = losses.sequence_loss(token_losses, mask, reduction=reduction, alpha=0.5)
    (grad,) = torch.autograd.grad(loss, token_losses)
    torch.testing.assert_close(grad, losses.token_weights(mask, reduction=reduction, alpha=0.5))


def test_short_sequences_weigh_more_under_sequence_mean():
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[0, :10], mask[1, :100] = True, True  # a 10-token and a 100-token response
    token_mean = losses.token_weights(mask, reduction="token_mean")
    seq_mean = losses.token_weights(mask, reduction="sequence_mean")
    assert token_mean[0, 0] == token_mean[1, 0]  # every token equal
    assert seq_mean[0, 0] / seq_mean[1, 0] == pytest.approx(10.0)  # a short response's token: 10x


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(1, 7), min_size=1, max_size=3, unique=True))
def test_micro_batches_normalised_by_the_step_total_equal_one_batch(seed, cuts):
    logits, labels = batch(seed=seed, B=8, p_mask=0.5)
    full_logits = logits.clone().requires_grad_(True)
    (full_grad,) = torch.autograd.grad(losses.sft_loss(full_logits, labels), full_logits)
    bounds = [0, *sorted(cuts), 8]
    n_tokens = int((labels != -100).sum())
    split_logits = logits.clone().requires_grad_(True)
    total = 0.0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if (labels[lo:hi] != -100).any():
            total = total + losses.sft_loss(split_logits[lo:hi], labels[lo:hi], num_items=n_tokens)
    (split_grad,) = torch.autograd.grad(total, split_logits)
    torch.testing.assert_close(total, losses.sft_loss(logits, labels))
    torch.testing.assert_close(split_grad, full_grad)


def test_mean_of_micro_batch_means_is_wrong():
    logits, labels = batch(seed=3, B=4)
    labels[:2, 1:] = -100  # first micro-batch: 2 tokens; second: many
    labels[:2, 0] = 1
    naive = (losses.sft_loss(logits[:2], labels[:2]) + losses.sft_loss(logits[2:], labels[2:])) / 2
    assert abs(naive - losses.sft_loss(logits, labels)) > 1e-3


def test_masked_garbage_does_not_leak():
    token_losses = torch.tensor([[1.0, float("inf")], [2.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[True, False], [True, False]])
    for reduction in ("sum", "token_mean", "sequence_mean", "length_normalized"):
        loss = losses.sequence_loss(token_losses, mask, reduction=reduction)
        (grad,) = torch.autograd.grad(loss, token_losses)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert losses.sequence_loss(token_losses, mask).item() == 1.5


def test_adaptive_length_penalty_by_hand():
    token_losses = torch.ones(2, 6, dtype=torch.float64)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :2], mask[1, :6] = True, True  # lengths 2 and 6, target 4
    got = losses.adaptive_length_penalty_loss(token_losses, mask, target_length=4, penalty=0.5)
    want = (2 * (1 + 0.5 * 2 / 4) + 6 * (1 + 0.5 * 2 / 4)) / 2
    assert got.item() == pytest.approx(want)
    plain = losses.adaptive_length_penalty_loss(token_losses, mask, target_length=4, penalty=0.0)
    assert plain.item() == pytest.approx(losses.sequence_loss(token_losses, mask, reduction="length_normalized",
                                                              alpha=0.0).item())


def test_weighting_and_prompt_masking():
    token_losses = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert losses.weighted_token_mean(token_losses, torch.ones(1, 4)).item() == 2.5
    w = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert losses.weighted_token_mean(token_losses, w).item() == 3.5
    labels = torch.arange(12).view(3, 4)
    masked = losses.mask_prompt(labels, [1, 0, 4])
    assert masked.tolist() == [[-100, 1, 2, 3], [4, 5, 6, 7], [-100] * 4]
    assert labels[0, 0] == 0  # a copy


def test_bad_inputs_name_the_argument():
    logits, labels = batch()
    with pytest.raises(ValueError, match="labels are all ignore_index: a fully masked batch"):
        losses.sft_loss(logits, torch.full_like(labels, -100))
    with pytest.raises(ValueError, match="mask is all zero: a fully masked batch"):
        losses.sequence_loss(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels must have shape"):
        losses.sft_loss(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="labels must be an int64"):
        losses.sft_loss(logits, labels.double())
    with pytest.raises(ValueError, match="labels hold ids outside"):
        losses.sft_loss(logits, torch.full_like(labels, V))
    with pytest.raises(ValueError, match="reduction must be one of"):
        losses.sft_loss(logits, labels, reduction="mean")
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        losses.sft_loss(logits, labels, reduction="length_normalized", alpha=-1)
    with pytest.raises(ValueError, match="num_items"):
        losses.sft_loss(logits, labels, num_items=0)
    with pytest.raises(ValueError, match="target_length"):
        losses.adaptive_length_penalty_loss(torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), target_length=0)
    with pytest.raises(ValueError, match="weights sum to zero"):
        losses.weighted_token_mean(torch.ones(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="prompt_lengths must lie"):
        losses.mask_prompt(labels, [99] * labels.shape[0])


# --- issue 14: empty micro-batches under accumulation, integer losses; issue 12: one name per constant ----

@pytest.mark.parametrize("reduction", losses.SEQUENCE_REDUCTIONS)
def test_all_ignored_micro_batch_with_num_items_contributes_zero(reduction):
    """With num_items (the whole step's count), a micro-batch whose labels are all ignored is a 0 that
    backward() runs through, and the accumulated gradient still equals one large batch's."""
    logits, labels = batch(seed=4, B=6, p_mask=0.3)
    labels[2:4] = -100  # the middle micro-batch has no response token at all
    rows = (labels != -100).any(1)
    num_items = int((labels != -100).sum()) if reduction == "token_mean" else int(rows.sum())
    full = logits.clone().requires_grad_(True)
    (want_grad,) = torch.autograd.grad(losses.sft_loss(full, labels, reduction=reduction, alpha=0.5), full)
    split = logits.clone().requires_grad_(True)
    parts = [losses.sft_loss(split[lo:lo + 2], labels[lo:lo + 2], reduction=reduction, alpha=0.5,
                             num_items=num_items) for lo in (0, 2, 4)]
    assert parts[1].item() == 0.0 and parts[1].requires_grad
    sum(parts).backward()
    torch.testing.assert_close(split.grad, want_grad)
    assert (split.grad[2:4] == 0).all()
    # and on its own: backward() runs, nothing flows
    alone = logits[2:4].clone().requires_grad_(True)
    losses.sft_loss(alone, labels[2:4], reduction=reduction, num_items=num_items).backward()
    assert (alone.grad == 0).all()
    empty_mask = torch.zeros(2, 9, dtype=torch.bool)
    token_losses = torch.rand(2, 9, dtype=torch.float64, requires_grad=True)
    assert losses.sequence_loss(token_losses, empty_mask, reduction=reduction, num_items=num_items).item() == 0.0
    with pytest.raises(ValueError, match="mask is all zero"):
        losses.sequence_loss(token_losses, empty_mask, reduction=reduction)
    with pytest.raises(ValueError, match="labels are all ignore_index"):
        losses.sft_loss(logits[2:4], labels[2:4], reduction=reduction)


def test_integer_and_non_binary_inputs_are_refused():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="token_losses must be a floating-point tensor"):
        losses.sequence_loss(torch.ones(2, 3, dtype=torch.long), mask)  # used to give tensor(0)
    with pytest.raises(ValueError, match="token_losses must be a floating-point tensor"):
        losses.adaptive_length_penalty_loss(torch.ones(2, 3, dtype=torch.long), mask, target_length=2)
    with pytest.raises(ValueError, match="token_losses must be a floating-point tensor"):
        losses.weighted_token_mean(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask must be boolean or hold only 0 and 1"):
        losses.sequence_loss(torch.ones(2, 3), torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="mask must have the shape of token_losses"):
        losses.sequence_loss(torch.ones(2, 3), mask[:, :2])
    with pytest.raises(ValueError, match="logits must be a floating tensor"):
        losses.sft_loss(torch.ones(2, 3, V, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt_lengths must be integers"):
        losses.mask_prompt(torch.zeros(2, 4, dtype=torch.long), [1.5, 2.0])
    with pytest.raises(ValueError, match="weights must be >= 0"):
        losses.weighted_token_mean(torch.ones(1, 2), torch.tensor([[1.0, -1.0]]))
    # a zero weight drops a token even where its loss is inf or NaN (padding), as sequence_loss's mask does
    garbage = torch.tensor([[1.0, float("nan"), float("inf")]])
    assert losses.weighted_token_mean(garbage, torch.tensor([[2.0, 0.0, 0.0]])).item() == 1.0


def test_token_nll_keeps_the_dtype_and_all_ignored_rows_give_zero():
    logits, labels = batch(dtype=torch.float32)
    assert losses.token_nll(logits, labels).dtype == torch.float32
    assert losses.token_nll(logits.double(), labels).dtype == torch.float64
    nll = losses.token_nll(logits, torch.full_like(labels, -100))
    assert (nll == 0).all()


def test_sequence_reductions_constant():
    assert losses.SEQUENCE_REDUCTIONS == ("sum", "token_mean", "sequence_mean", "length_normalized")
    from minigpt.losses import sequence
    assert not hasattr(sequence, "REDUCTIONS")  # one name: SEQUENCE_REDUCTIONS, distinct from common.REDUCTIONS
