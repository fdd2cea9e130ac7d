import math

import pytest
import torch
import torch.nn.functional as F

from minigpt.model import GPT, GPTConfig


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return GPT(tiny_config)


def test_shapes(model, tiny_config):
    idx = torch.randint(65, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 65) and loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == ()
    _, per_token = model(idx, idx, reduction="none")
    assert per_token.shape == (3, 10)
    torch.testing.assert_close(per_token.mean(), loss)
    _, total = model(idx, idx, reduction="sum")
    torch.testing.assert_close(total, per_token.sum())


def test_ignored_targets_take_no_loss(model):
    idx = torch.randint(65, (2, 8))
    targets = idx.clone()
    targets[0, :5] = -100
    _, per_token = model(idx, targets, reduction="none")
    assert (per_token[0, :5] == 0).all()
    _, mean = model(idx, targets)
    torch.testing.assert_close(mean, per_token.sum() / (targets != -100).sum())


def test_pluggable_loss(model):
    idx = torch.randint(65, (2, 8))
    smoothed = lambda input, target, reduction="mean": F.cross_entropy(  # noqa: E731
        input, target, label_smoothing=0.1, reduction=reduction)
    logits, loss = model(idx, idx, loss_fn=smoothed)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 65), idx.view(-1), label_smoothing=0.1))
    model.loss_fn = smoothed  # or set it once for every call
    torch.testing.assert_close(model(idx, idx)[1], loss)


def test_weight_tying_and_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_embd=256, n_head=4))
    assert model.transformer.wte.weight is model.lm_head.weight
    proj_std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    fc_std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(fc_std - 0.02) < 0.001
    assert abs(proj_std - 0.02 / math.sqrt(2 * 8)) < 0.0005


def test_small_model_size():
    # nanoGPT's CPU model: 0.80M parameters (position embedding excluded)
    assert GPT(GPTConfig()).num_parameters() == 795_904


def test_initial_loss_is_log_vocab(corpus):
    """At initialisation the model knows nothing, so every character is about equally likely and the
    loss is about ln(65) = 4.174. Logits are not exactly zero: the last LayerNorm gives unit-variance
    features, times a head of std 0.02 over 128 dims, so logits have std ~0.23, which adds ~sigma^2/2 =
    0.026 on average. Hence a tolerance of 0.1."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=corpus.vocab_size)).eval()
    x, y = corpus.batch_fn(32, 64)("val", torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, loss = model(x, y)
    assert abs(loss.item() - math.log(65)) < 0.1


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 4), "idx must have dtype torch.int64"),
    (torch.zeros(2, 4, dtype=torch.int32), "idx must have dtype torch.int64"),
    (torch.full((2, 4), 65), r"idx holds ids outside \[0, 65\)"),
    (torch.full((2, 4), -1), r"idx holds ids outside \[0, 65\)"),
    (torch.zeros(2, 17, dtype=torch.long), "longer than block_size=16"),
    (torch.zeros(8, dtype=torch.long), r"idx must have shape \(B, T\)"),
])
def test_bad_idx(model, bad, message):
    with pytest.raises(ValueError, match=message):
        model(bad)


def test_bad_targets(model):
    idx = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="targets must have the shape of idx"):
        model(idx, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="targets holds ids outside"):
        model(idx, torch.full((2, 4), 70))
    with pytest.raises(ValueError, match="targets must have dtype"):
        model(idx, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="all ignored"):
        model(idx, torch.full((2, 4), -100))
    with pytest.raises(ValueError, match="reduction"):
        model(idx, idx, reduction="avg")
    with pytest.raises(TypeError, match="idx must be a torch.Tensor"):
        model([[1, 2]])


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=130, n_head=4)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="scale"):
        GPTConfig.for_scale("medium")
    assert GPTConfig.for_scale("full").n_embd == 384


def test_generate(model):
    model.eval()
    start = torch.zeros(2, 3, dtype=torch.long)
    out = model.generate(start, 20, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 23) and torch.equal(out[:, :3], start)
    # longer than block_size: the context is cropped, generation goes on
    assert model.generate(start, 30, temperature=0).shape == (2, 33)
    # greedy is deterministic and equals top_k=1
    greedy = model.generate(start, 10, temperature=0)
    assert torch.equal(greedy, model.generate(start, 10, temperature=1.0, top_k=1))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(start, 5, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(start, 5, top_k=0)


def test_generate_stops_at_stop_token(model):
    model.eval()
    start = torch.zeros(3, 2, dtype=torch.long)
    greedy = model.generate(start, 12, temperature=0)
    stop = int(greedy[0, 2])  # the first greedy token of row 0: every row emits it at once
    out = model.generate(start, 12, temperature=0, stop_token=stop)
    assert out.shape == (3, 3) and (out[:, 2] == stop).all()
    # rows that finish early are padded with the stop token while the others go on
    out = model.generate(start, 12, temperature=1.0, stop_token=stop, generator=torch.Generator().manual_seed(0))
    for row in out:
        hits = (row[2:] == stop).nonzero()
        if len(hits):
            assert (row[2 + hits[0, 0]:] == stop).all()


def test_post_layernorm_block_normalises_its_output(tiny_config):
    from dataclasses import replace

    from minigpt.model import Block

    torch.manual_seed(0)
    post = Block(replace(tiny_config, norm_position="post"))
    x = 5 * torch.randn(2, 4, tiny_config.n_embd)
    out = post(x)
    # LN(x + f(x)) with unit gain and no bias: every position has mean 0 and variance 1
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 4), atol=1e-3, rtol=0)
    torch.testing.assert_close(out, post.ln_2(post.ln_1(x + post.attn(x)) + post.mlp(post.ln_1(x + post.attn(x)))))
    # the default stays pre-LN: the residual stream is not normalised
    torch.manual_seed(0)
    pre = Block(tiny_config)
    torch.testing.assert_close(pre(x), x + pre.attn(pre.ln_1(x)) + pre.mlp(pre.ln_2(x + pre.attn(pre.ln_1(x)))))
    with pytest.raises(ValueError, match="norm_position"):
        GPTConfig(norm_position="middle")


def test_residual_projection_scaling_switch(tiny_config):
    from dataclasses import replace

    config = replace(tiny_config, n_layer=8)
    torch.manual_seed(0)
    scaled = GPT(config)
    torch.manual_seed(0)
    plain = GPT(replace(config, scale_residual_init=False))
    proj = lambda m: torch.cat([p.flatten() for n, p in m.named_parameters() if n.endswith("c_proj.weight")])
    other = lambda m: torch.cat([p.flatten() for n, p in m.named_parameters() if n.endswith("c_attn.weight")])
    assert proj(scaled).std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert proj(plain).std().item() == pytest.approx(0.02, rel=0.05)
    torch.testing.assert_close(other(scaled), other(plain))  # only the residual projections change
    # post-LN models train like any other: a loss and a gradient everywhere
    post = GPT(replace(config, norm_position="post"))
    idx = torch.randint(65, (2, 8))
    _, loss = post(idx, idx)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in post.parameters())
