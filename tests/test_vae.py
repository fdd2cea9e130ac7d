"""minigpt.vae (chapter 9's sentence VAE) and the posterior-collapse check of minigpt.diagnostics."""

from dataclasses import replace

import pytest
import torch

from minigpt.diagnostics import diagnostic_report, posterior_collapse
from minigpt.losses import IGNORE_INDEX
from minigpt.losses.vae import gaussian_kl
from minigpt.vae import (
    LineBatch, SequenceVAE, ShakespeareLines, VAEConfig, VAELoss, VAERecipe, beta_schedule, guide_recipes,
    latent_stats, train_vae, vae_setup,
)


@pytest.fixture(scope="module")
def lines():
    return ShakespeareLines.load(max_len=16, min_len=4)


def test_lines_layout(lines):
    b = lines.train.index(torch.arange(8))
    nl = lines.tokenizer.encode("\n")[0]
    assert b.x.shape == b.y.shape == b.enc.shape == (8, 17)
    for i in range(8):
        n = int(b.last[i]) + 1
        assert b.y[i, n - 1] == nl and b.enc[i, n - 1] == nl  # the line ends with its newline
        assert (b.y[i, n:] == IGNORE_INDEX).all() and (b.enc[i, n:] == nl).all()
        assert b.x[i, 0] == nl and torch.equal(b.x[i, 1:n], b.y[i, :n - 1])  # teacher forcing: shifted by one
        assert 4 <= n - 1 <= 16
    assert len(lines.train) > 5 * len(lines.val) > 0
    gen = torch.Generator().manual_seed(0)
    batch = lines.batch_fn(5)("val", gen)
    assert isinstance(batch, LineBatch) and len(batch) == 5
    with pytest.raises(ValueError, match="split"):
        lines.batch_fn(5)("test", gen)
    with pytest.raises(ValueError, match="min_len"):
        ShakespeareLines.load(max_len=4, min_len=8)


def test_model_shapes_and_padding(lines):
    torch.manual_seed(0)
    model = SequenceVAE(VAEConfig(vocab_size=lines.vocab_size, max_len=16, latent_dim=4))
    b = lines.train.index(torch.arange(6))
    mu, logvar = model.encode(b.enc, b.last)
    assert mu.shape == logvar.shape == (6, 4)
    recon = model.reconstruction(b.x, b.y, mu)
    assert recon.shape == (6,) and (recon > 0).all()
    # the encoder reads the closing newline, so what follows it (padding) cannot change the posterior
    padded = b.enc.clone()
    for i in range(6):
        padded[i, int(b.last[i]) + 1:] = 3
    torch.testing.assert_close(model.encode(padded, b.last)[0], mu)
    # a line's reconstruction is the sum of its characters' cross-entropies: one line alone gives the same
    torch.testing.assert_close(model.reconstruction(b.x[:1], b.y[:1], mu[:1]), recon[:1])
    with pytest.raises(ValueError, match="latent_dim"):
        VAEConfig(latent_dim=0)
    with pytest.raises(ValueError, match="divisible"):
        VAEConfig(n_embd=30, n_head=4)


def test_vae_loss_is_recon_plus_beta_kl_and_logs(lines):
    torch.manual_seed(0)
    model = SequenceVAE(VAEConfig(vocab_size=lines.vocab_size, max_len=16, latent_dim=4))
    b = lines.train.index(torch.arange(8))
    loss = VAELoss(beta=0.5)
    model.eval()  # z = mu: deterministic, and not logged
    total, n = loss(model, b)
    mu, logvar = model.encode(b.enc, b.last)
    expected = model.reconstruction(b.x, b.y, mu).sum() + 0.5 * 8 * gaussian_kl(mu, logvar, reduction="batchmean")
    torch.testing.assert_close(total, expected)
    assert n == 8 and loss.step == 0 and not loss.log.steps
    model.train()
    loss(model, b)
    loss(model, b)
    assert loss.step == 2 and loss.log.steps == [1, 2] and set(loss.log.values) == {"recon", "kl"}
    assert loss.betas == [0.5, 0.5]
    weighted = loss.weighted_log()
    assert weighted.values["kl"] == [0.5 * k for k in loss.log.values["kl"]] and weighted.steps == [1, 2]
    assert len(loss.kl_per_dim) == 2 and loss.kl_per_dim[0].shape == (4,)
    # free bits: a KL below lambda per dimension costs exactly lambda per dimension and gives no gradient
    with torch.no_grad():
        model.to_posterior.weight.zero_(), model.to_posterior.bias.zero_()  # posterior = prior: KL 0
    model.eval()
    fb_total, _ = VAELoss(beta=1.0, free_bits=0.25)(model, b)
    plain = model.reconstruction(b.x, b.y, torch.zeros(8, 4)).sum()
    torch.testing.assert_close(fb_total, plain + 8 * 4 * 0.25)
    with pytest.raises(ValueError, match="free_bits"):
        VAELoss(free_bits=-1)


def test_beta_schedules():
    lin, cyc = beta_schedule("linear", 100), beta_schedule("cyclical", 100)
    assert lin(0) == 0 and lin(25) == pytest.approx(0.5) and lin(50) == lin(99) == 1.0
    assert cyc(0) == 0 and cyc(12) == pytest.approx(0.96) and cyc(13) == cyc(24) == 1.0 and cyc(25) == 0  # 4 cycles, ramp half
    assert beta_schedule("constant", 10, 0.1)(7) == 0.1
    with pytest.raises(ValueError, match="kind"):
        beta_schedule("cosine", 10)


def test_latent_stats_on_a_model_that_ignores_z(lines):
    torch.manual_seed(0)
    model = SequenceVAE(VAEConfig(vocab_size=lines.vocab_size, max_len=16, latent_dim=4))
    with torch.no_grad():
        model.from_latent.weight.zero_()  # the decoder cannot see z
    stats = latent_stats(model, lines.val.index(torch.arange(64)), seed=3)
    assert stats.shuffle_gap == pytest.approx(0.0, abs=1e-4)
    assert stats.neg_elbo == pytest.approx(stats.recon + stats.kl, abs=1e-3)  # z samples change nothing
    assert stats.kl_per_dim.shape == (4,) and 0 <= stats.active_units <= 4
    assert stats.chars_per_line > 4


def test_guide_recipes_scale_the_guide(lines):
    setup = vae_setup("small")
    before, after = guide_recipes(setup)
    assert before.lr == pytest.approx(5 * after.lr)
    assert (before.beta, after.beta, before.free_bits, after.free_bits) == (0.1, 0.01, 0.03, 0.1)
    assert (before.grad_clip, after.grad_clip, before.weight_decay, after.weight_decay) == (0.2, 1.0, 0.03, 0.01)
    assert (before.patience, after.patience) == (8, 15) and before.n_layer == 2 * after.n_layer
    assert vae_setup("full").model.n_embd > setup.model.n_embd and setup.n_seeds >= 5
    with pytest.raises(ValueError, match="scale"):
        vae_setup("huge")


def test_train_vae_through_the_training_loop(lines):
    setup = replace(vae_setup("small"), model=replace(vae_setup("small").model, max_len=16), steps=6,
                    eval_interval=3, n_eval_lines=32)
    run = train_vae(setup, lines, VAERecipe(lr=1e-3, schedule="linear", free_bits=0.1), seed=1)
    assert run.result.steps_done == 6 and run.loss.log.steps == list(range(1, 7))
    assert run.loss.betas[0] == 0.0 and run.loss.betas[-1] > 0
    again = train_vae(setup, lines, VAERecipe(lr=1e-3, schedule="linear", free_bits=0.1), seed=1)
    assert again.result.history.loss == run.result.history.loss  # reproducible on the CPU


def test_posterior_collapse_check():
    torch.manual_seed(0)
    collapsed = posterior_collapse(torch.randn(200, 8) * 0.01, torch.zeros(200, 8))
    assert collapsed.active == 0 and collapsed.collapsed and "posterior collapse" in collapsed.flags()[0]
    healthy = posterior_collapse(torch.randn(200, 8), torch.full((200, 8), -2.0))
    assert healthy.active == 8 and not healthy.collapsed and not healthy.flags()
    assert healthy.kl == pytest.approx(float(gaussian_kl(torch.randn(1, 1) * 0, torch.zeros(1, 1))) + healthy.kl)
    report = diagnostic_report(latent=(torch.randn(200, 8) * 0.01, torch.zeros(200, 8)))
    assert "posterior collapse" in report and "0 active" in report
    assert diagnostic_report(latent=(torch.randn(200, 8), torch.full((200, 8), -2.0))).endswith("Flags: none")
    with pytest.raises(ValueError, match="shape"):
        posterior_collapse(torch.zeros(4, 2), torch.zeros(4, 3))


def test_runs_cache_and_patience_twin(lines):
    from minigpt.vae import VAERuns, summarise

    setup = replace(vae_setup("small"), model=replace(vae_setup("small").model, max_len=16), steps=4,
                    eval_interval=2, n_eval_lines=32)
    runs = VAERuns(setup, lines)
    recipe = VAERecipe(lr=1e-3, patience=8)
    first = runs(recipe, [0, 1])
    assert runs(recipe, [0])[0] is first[0] and runs.seconds > 0
    twin = runs(recipe.with_(patience=15), [0])[0]  # 3 evaluations cannot stall 8 times: the same run
    assert twin.result is first[0].result and twin.recipe.patience == 15 and len(runs.reused) == 1
    from minigpt.diagnostics import GradientRecorder

    runs.hooks[(recipe.with_(patience=20), 1)] = recorder = GradientRecorder(every=1)
    hooked = runs(recipe.with_(patience=20), [1])[0]  # a run with a hook is trained, never borrowed
    assert hooked.result is not first[1].result and recorder.steps == [1, 2, 3, 4]
    assert hooked.result.history.loss == first[1].result.history.loss
    other = runs(recipe.with_(beta=0.5), [0])[0]
    assert other.result is not first[0].result
    numbers = summarise(first[0])
    assert set(numbers) >= {"kl", "active", "recon", "gap", "neg_elbo", "train_loss", "volatility", "clipped"}
    assert 0 <= numbers["clipped"] <= 1 and numbers["stopped_early"] == 0
