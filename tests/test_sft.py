"""minigpt.sft: fine-tuning under each reduction, greedy evaluation, gradient shares and accumulation."""

import pytest
import torch
import torch.nn.functional as F

from minigpt.instructions import instruction_batch, make_instructions
from minigpt.losses import mask_prompt, sft_loss
from minigpt.model import GPT
from minigpt.sft import (STOP_ID, TOKENIZER, SFTSetup, accumulated_gradient, bucket_gradient_shares,
                         evaluate_responses, greedy_continue, sft_batch_fn, sft_batch_loss, sft_data,
                         sft_model_config, sft_setup)
from minigpt.train import TrainConfig, train

SETUP = SFTSetup("small", lengths=(2, 12), n_train=200, n_test=40)


def tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return GPT(sft_model_config("small", SETUP.block_size)).to(dtype)


def batch_mean_loss(model, examples, **kwargs):
    """The loss of one batch as train minimises it: loss_sum / n_items of sft_batch_loss."""
    loss_sum, n_items = sft_batch_loss(**kwargs)(model, instruction_batch(examples, TOKENIZER))
    return loss_sum / n_items


def train_sft(model, examples, config, *, batch_size=16, **loss_kwargs):
    return train(model, sft_batch_fn(examples, batch_size), config, batch_loss=sft_batch_loss(**loss_kwargs)).history


def flat_grad(model, loss):
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.fixture(scope="module")
def trained():
    """A model fine-tuned briefly, so that greedy decoding gets some answers right and some wrong."""
    train, test = sft_data(SETUP, 0)
    model = tiny_model()
    train_sft(model, train, TrainConfig(max_iters=150, learning_rate=3e-3, warmup_iters=10, min_lr=3e-4,
                                        weight_decay=0.0, eval_iters=0, progress=False), batch_size=16)
    return model, test


def test_block_size_covers_prompt_response_and_cap():
    for tasks in (("count", "repeat"), ("reverse",), ("repeat", "count", "reverse")):
        setup = SFTSetup("small", tasks=tasks)
        examples = make_instructions(2000, torch.Generator().manual_seed(1), tasks=tasks)
        assert setup.block_size >= max(len(e.prompt) for e in examples) + setup.lengths[1] + setup.max_extra
    assert sft_setup("small").block_size == sft_setup("full").block_size
    with pytest.raises(ValueError, match="scale"):
        sft_setup("huge")


def test_batch_loss_matches_cross_entropy_for_masked_and_whole_sequences():
    model = tiny_model()
    examples = make_instructions(8, torch.Generator().manual_seed(3), lengths=(2, 12))
    batch = instruction_batch(examples, TOKENIZER)
    y_masked, y_whole = mask_prompt(batch.y, batch.prompt_lengths), batch.y
    logits, _ = model(batch.x)
    V = logits.shape[-1]
    masked = F.cross_entropy(logits.reshape(-1, V), y_masked.reshape(-1))
    whole = F.cross_entropy(logits.reshape(-1, V), y_whole.reshape(-1))
    torch.testing.assert_close(batch_mean_loss(model, examples), masked)
    torch.testing.assert_close(batch_mean_loss(model, examples, prompt_weight=1.0), whole)
    torch.testing.assert_close(batch_mean_loss(model, examples, reduction="sequence_mean"),
                               sft_loss(logits, y_masked, reduction="sequence_mean"))
    torch.testing.assert_close(batch_mean_loss(model, examples, reduction="sum"),
                               sft_loss(logits, y_masked, reduction="sum"))
    with pytest.raises(ValueError, match="prompt_weight"):
        sft_batch_loss(reduction="sum", prompt_weight=0.1)
    with pytest.raises(ValueError, match="reduction"):
        sft_batch_loss(reduction="mean")


def test_training_lowers_the_loss_and_is_reproducible():
    train, _ = sft_data(SETUP, 1)
    config = TrainConfig(max_iters=40, learning_rate=3e-3, warmup_iters=5, min_lr=3e-4, weight_decay=0.0,
                         seed=5, eval_iters=0, progress=False)
    a, b = tiny_model(1), tiny_model(1)
    ha = train_sft(a, train, config, reduction="length_normalized")
    hb = train_sft(b, train, config, reduction="length_normalized")
    assert ha.loss == hb.loss
    assert sum(ha.loss[-5:]) < 0.6 * sum(ha.loss[:5])
    with pytest.raises(ValueError, match="batch_size"):
        sft_batch_fn(train, 0)


def test_greedy_continue_matches_generate_row_by_row():
    model = tiny_model(2)
    prefixes = [TOKENIZER.encode(e.prompt) for e in make_instructions(6, torch.Generator().manual_seed(4),
                                                                       lengths=(2, 12))]
    budgets = [3, 7, 12, 1, 0, 9]
    out = greedy_continue(model, prefixes, max_new_tokens=budgets)
    for p, b, new in zip(prefixes, budgets, out):
        alone = model.generate(torch.tensor([p]), b, temperature=0, stop_token=STOP_ID)[0, len(p):].tolist()
        if STOP_ID in alone:
            alone = alone[: alone.index(STOP_ID) + 1]
        assert new == alone
    with pytest.raises(ValueError, match="block_size"):
        greedy_continue(model, prefixes, max_new_tokens=model.config.block_size)


def test_evaluation_agrees_with_plain_greedy_generation(trained):
    model, test = trained
    ev = evaluate_responses(model, test, max_extra=SETUP.max_extra)
    cap = max(e.response_length for e in test) + SETUP.max_extra
    for i, e in enumerate(test):
        p = TOKENIZER.encode(e.prompt)
        new = model.generate(torch.tensor([p]), cap, temperature=0, stop_token=STOP_ID)[0, len(p):].tolist()
        stopped = STOP_ID in new
        new = new[: new.index(STOP_ID) + 1] if stopped else new
        assert int(ev.generated_length[i]) == len(new)
        assert bool(ev.stopped[i]) == stopped
        assert bool(ev.exact[i]) == (TOKENIZER.decode(new) == e.response)
    # some right, some wrong: the test exercises every branch of the evaluation
    assert 0 < int(ev.exact.sum()) < len(test)
    # the token losses are the masked next-token NLL of each row
    batch = instruction_batch(test, TOKENIZER)
    per_row = sft_loss(model(batch.x)[0], mask_prompt(batch.y, batch.prompt_lengths), reduction="sum")
    torch.testing.assert_close((ev.content_nll + ev.stop_nll).sum().float(), per_row, rtol=1e-5, atol=1e-4)


def test_bucket_gradient_shares_sum_to_one_and_follow_the_reduction():
    model = tiny_model(3, torch.float64)
    examples = make_instructions(24, torch.Generator().manual_seed(6), lengths=(2, 12))
    lengths = torch.tensor([e.response_length for e in examples], dtype=torch.float64)
    buckets = (lengths > 6).long()
    for reduction, expected in (("token_mean", lengths), ("sequence_mean", torch.ones_like(lengths)),
                                ("length_normalized", lengths ** 0.5)):
        weight_share, grad_share = bucket_gradient_shares(model, examples, buckets, reduction=reduction, alpha=0.5)
        want = torch.stack([expected[buckets == b].sum() for b in (0, 1)]) / expected.sum()
        torch.testing.assert_close(weight_share, want)
        assert abs(float(grad_share.sum()) - 1) < 1e-9
    one = bucket_gradient_shares(model, examples, torch.zeros(24, dtype=torch.long))[1]
    torch.testing.assert_close(one, torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="buckets"):
        bucket_gradient_shares(model, examples, buckets[:5])


def test_accumulation_global_normalisation_is_exact_and_mean_of_means_is_not():
    model = tiny_model(4, torch.float64)
    examples = make_instructions(12, torch.Generator().manual_seed(7), lengths=(2, 12))
    examples.sort(key=lambda e: e.response_length)
    full = flat_grad(model, batch_mean_loss(model, examples))
    micro = [examples[:8], examples[8:]]  # the short ones together: very unequal token counts
    good = accumulated_gradient(model, micro, normalise="global")
    bad = accumulated_gradient(model, micro, normalise="micro_mean")
    assert float((good - full).norm() / full.norm()) < 1e-12
    assert float((bad - full).norm() / full.norm()) > 0.05
    # with equal token counts per micro-batch the two agree
    same = [make_instructions(3, torch.Generator().manual_seed(8), lengths=(5, 5)) for _ in range(2)]
    torch.testing.assert_close(accumulated_gradient(model, same, normalise="micro_mean"),
                               accumulated_gradient(model, same, normalise="global"))
    with pytest.raises(ValueError, match="normalise"):
        accumulated_gradient(model, micro, normalise="mean")


def test_one_micro_batch_is_the_full_batch_gradient():
    model = tiny_model(5, torch.float64)
    examples = make_instructions(6, torch.Generator().manual_seed(9), lengths=(2, 12))
    full = flat_grad(model, batch_mean_loss(model, examples))
    for how in ("global", "micro_mean"):
        torch.testing.assert_close(accumulated_gradient(model, [examples], normalise=how), full)
