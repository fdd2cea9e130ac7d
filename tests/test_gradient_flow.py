"""Chapter 4's helpers: the switchable deep MLP, per-layer and per-block gradient norms, fault injection
and the setup."""

import math

import pytest
import torch
import torch.nn.functional as F

from minigpt.gradient_flow import (
    DeepMLP, block_gradient_norms, detach_output, gradient_flow_setup, layer_gradient_norms, nan_in_embedding,
)
from minigpt.model import GPT


def test_deep_mlp_layers_and_switches():
    g = torch.Generator().manual_seed(0)
    plain = DeepMLP(5, 8, 3, depth=4, activation="tanh", generator=g)
    assert [tuple(l.weight.shape) for l in plain.layers] == [(8, 5), (8, 8), (8, 8), (3, 8)]
    x = torch.randn(7, 5)
    h = torch.tanh(plain.layers[0](x))
    for layer in plain.layers[1:3]:
        h = torch.tanh(layer(h))
    torch.testing.assert_close(plain(x), plain.layers[3](h))
    both = DeepMLP(5, 8, 3, depth=4, activation="relu", residual=True, layer_norm=True,
                   generator=torch.Generator().manual_seed(0))
    h = torch.relu(both.layers[0](x))
    for i, layer in enumerate(both.layers[1:3]):
        h = h + torch.relu(layer(both.norms[i](h)))
    torch.testing.assert_close(both(x), both.layers[3](both.norms[2](h)))
    # the same seed draws the same weights whatever the switches
    torch.testing.assert_close(plain.layers[1].weight, both.layers[1].weight)
    bound = 1 / math.sqrt(5)
    assert plain.layers[0].weight.abs().max() <= bound
    with pytest.raises(ValueError, match="depth"):
        DeepMLP(5, 8, 3, depth=1)
    with pytest.raises(ValueError, match="activation"):
        DeepMLP(5, 8, 3, depth=2, activation="swish")


def test_layer_gradient_norms_are_the_weight_gradients():
    model = DeepMLP(5, 8, 3, depth=3, activation="sigmoid", generator=torch.Generator().manual_seed(1))
    x, y = torch.randn(10, 5), torch.randint(3, (10,))
    norms = layer_gradient_norms(model, x, y)
    F.cross_entropy(model(x), y).backward()
    assert norms == pytest.approx([float(l.weight.grad.norm()) for l in model.layers])
    model.zero_grad(set_to_none=True)
    layer_gradient_norms(model, x, y)
    assert all(p.grad is None for p in model.parameters())


def test_block_norms_hooks_and_setup(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(65, (3, 8))
    norms = block_gradient_norms(model, [(x, x), (x, x)])
    assert len(norms) == tiny_config.n_layer and all(n > 0 for n in norms)
    _, loss = model(x, x)
    loss.backward()
    block0 = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.transformer.h[0].parameters()))
    assert norms[0] == pytest.approx(block0, rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.zero_grad(set_to_none=True)
    handle = detach_output(model.transformer.h[1])
    _, loss = model(x, x)
    loss.backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad is None and model.lm_head.weight.grad is not None
    handle.remove()
    handle = nan_in_embedding(model.transformer.wte, row=1, position=2)
    logits, _ = model(x)
    # the masked attention multiplies the NaN by a zero weight, which is still NaN: the whole row is lost
    assert torch.isnan(logits[1]).all() and torch.isfinite(logits[0]).all()
    handle.remove()
    with pytest.raises(ValueError, match="batches"):
        block_gradient_norms(model, [])
    small, full = gradient_flow_setup("small"), gradient_flow_setup("full")
    assert full.gpt.n_embd > small.gpt.n_embd and full.n_seeds >= small.n_seeds >= 5  # 5 where an interval is reported
    assert all(s.n_init_seeds >= s.n_seeds for s in (small, full)) and full.n_init_seeds >= small.n_init_seeds
    with pytest.raises(ValueError, match="scale"):
        gradient_flow_setup("huge")


def test_training_block_gradient_norms_trains_and_measures(tiny_config):
    from minigpt.diagnostics import GradientRecorder
    from minigpt.gradient_flow import training_block_gradient_norms
    from minigpt.train import TrainConfig, train

    def get_batch(split, generator):
        x = torch.randint(65, (2, 8), generator=generator)
        return x, x

    config = TrainConfig(max_iters=4, warmup_iters=0, eval_iters=0, progress=False, seed=3)
    batches = [get_batch("train", torch.Generator().manual_seed(1))]
    torch.manual_seed(0)
    model = GPT(tiny_config)
    start = block_gradient_norms(model, batches)
    during, after = training_block_gradient_norms(model, get_batch, config, batches, every=2)
    assert len(during) == len(after) == tiny_config.n_layer and all(v > 0 for v in during + after)
    assert after == pytest.approx(block_gradient_norms(model, batches))  # measured at the trained weights
    assert after != pytest.approx(start)  # which the run moved
    # the same run by hand: the recorder's per-block norms, averaged over the recorded updates
    torch.manual_seed(0)
    twin, recorder = GPT(tiny_config), GradientRecorder(every=2)
    train(twin, get_batch, config, grad_hook=recorder)
    series = recorder.group_series(depth=3)
    assert during == pytest.approx([float(series[f"transformer.h.{b}"].mean()) for b in range(tiny_config.n_layer)])
