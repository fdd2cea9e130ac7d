"""Smoke tests of every chapter's ``full`` setup: its model and data built at full scale, and two updates
of each kind of training the chapter runs, on whatever device ``minigpt.device()`` picks (the CPU in CI).

This is no substitute for running the chapters at full scale on a GPU. It makes a crash, a shape error or
a device mix-up in a ``full`` code path fail here instead of on a reader's GPU. Batches are cut to a few
sequences so that two updates of the 10.7M-parameter model take seconds on a CPU; everything else (model
size, block, number of splits, data) is the full setup's.
"""

from dataclasses import replace

import pytest
import torch

import minigpt
from minigpt import losses
from minigpt.data import CharCorpus, load_breast_cancer, load_diabetes, load_digit_images, load_digits, load_stacked
from minigpt.model import GPT
from minigpt.setups import classification_setup, foundations_setup, regression_setup
from minigpt.sft import run_sft, sft_setup
from minigpt.small_models import MLP, Linear, SegmentationNet, fit_full_batch
from minigpt.synthetic import blob_segmentation, digit_view
from minigpt.train import TrainConfig, train

DEVICE = minigpt.device()
TWO = dict(max_iters=2, eval_interval=1, eval_iters=1, warmup_iters=1, progress=False)


def test_foundations_full(corpus):
    setup = foundations_setup("full")
    assert setup.model.n_layer == 6 and setup.model.block_size == 256 and setup.batch_size == 64
    torch.manual_seed(0)
    model = GPT(setup.model).to(DEVICE)
    get_batch = corpus.batch_fn(2, setup.model.block_size, device=DEVICE)
    result = train(model, get_batch, replace(setup.run, **TWO))
    assert result.steps_done == 2 and len(result.history.val_loss) == 3
    tiny = CharCorpus(corpus.tokenizer, corpus.train[:setup.overfit_chars], corpus.val)
    result = train(model, tiny.batch_fn(2, setup.model.block_size, device=DEVICE),
                   replace(setup.overfit, patience=3, **TWO))
    assert result.steps_done == 2
    model.eval()
    out = model.generate(torch.zeros(1, 1, dtype=torch.long, device=DEVICE), 5, temperature=0.8,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 6)


def test_regression_full():
    setup = regression_setup("full")
    data = load_stacked(load_diabetes, minigpt.seeds(setup.n_seeds), dtype=torch.float64)
    assert data.X_train.shape[0] == setup.n_seeds
    model = Linear(data.n_features, problems=setup.n_seeds)
    history = fit_full_batch(model, data.X_train, data.y_train,
                             lambda p, t: losses.huber_loss(p, t, reduction="none"), steps=2)
    assert len(history) == 2


def test_classification_full():
    setup = classification_setup("full")
    seeds = minigpt.seeds(setup.n_seeds)
    for loader, n_out in ((load_breast_cancer, 1), (load_digits, 10)):
        data = load_stacked(loader, seeds, dtype=torch.float64)
        model = Linear(data.n_features, n_out, problems=setup.n_seeds)
        target = data.y_train.double() if n_out == 1 else data.y_train
        loss = ((lambda o, t: losses.bce_with_logits(o, t, reduction="none")) if n_out == 1 else
                (lambda o, t: losses.cross_entropy(o.flatten(0, -2), t.flatten(), reduction="none").view(t.shape)))
        assert len(fit_full_batch(model, data.X_train, target, loss, steps=2)) == 2
    # the network experiments: a segmentation net and a contrastive encoder, two updates each
    images, masks = blob_segmentation(64, 16, torch.Generator().manual_seed(0))
    images, masks = images.to(DEVICE), masks.to(DEVICE)

    def seg_batch(split, g):
        idx = torch.randint(0, len(images), (setup.seg_batch,), generator=g).to(DEVICE)
        return images[idx], masks[idx]

    def dice(net, batch):
        return losses.dice_loss(net(batch[0]), batch[1]) * len(batch[0]), len(batch[0])

    result = train(SegmentationNet().to(DEVICE), seg_batch, TrainConfig.adam(2, 0.01, progress=False), batch_loss=dice)
    assert result.steps_done == 2
    digits, _ = load_digit_images()

    def views(split, g):
        idx = torch.randint(0, len(digits), (setup.con_batch,), generator=g)
        return digit_view(digits[idx], g).to(DEVICE), digit_view(digits[idx], g).to(DEVICE)

    def info_nce(enc, batch):
        return losses.info_nce_loss(enc(batch[0]), enc(batch[1])) * len(batch[0]), len(batch[0])

    encoder = MLP(64, 64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(DEVICE)
    assert train(encoder, views, TrainConfig.adam(2, 3e-3, progress=False), batch_loss=info_nce).steps_done == 2


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_sft_full(reduction):
    setup = sft_setup("full")
    assert setup.batch_size == 32 and setup.train.max_iters == 1000
    small_run = replace(setup, n_test=8, train=replace(setup.train, max_iters=2, warmup_iters=1, progress=False))
    run = run_sft(small_run, 0, reduction=reduction, device=DEVICE)
    assert run.result.steps_done == 2 and run.model.config.n_embd == 128
    rates = run.evaluation.rates()
    assert rates.n == 8 and 0 <= rates.exact <= 1


def test_masked_prompt_with_weight_full():
    setup = sft_setup("full")
    small_run = replace(setup, n_test=4, train=replace(setup.train, max_iters=2, warmup_iters=1, progress=False))
    assert run_sft(small_run, 1, prompt_weight=0.1, device=DEVICE).result.steps_done == 2


def test_label_smoothing_full(corpus):
    from minigpt.smoothing import (calibration_summary, collect_logits, fit_side_by_side, fit_temperature,
                                   label_smoothing_setup, mlp_features)
    from minigpt.train import language_model_loss

    setup = label_smoothing_setup("full")
    digits = load_stacked(load_digits, minigpt.seeds(setup.n_seeds))
    X, Y = digits.X_train, digits.y_train
    assert X.shape[0] == setup.n_seeds

    def smoothed(eps):
        return lambda o, t: losses.cross_entropy(o.transpose(1, 2), t, label_smoothing=eps, reduction="none")

    def rows(loss, **kw):
        return lambda o, t: loss(o.flatten(0, 1), t.flatten(), reduction="none", **kw).view(t.shape)

    net = fit_side_by_side([smoothed(0.1), rows(losses.confidence_penalty_loss, beta=0.1),
                            rows(losses.adaptive_label_smoothing_loss)], X, Y, n_classes=10, hidden=setup.hidden,
                           steps=2, lr=setup.mlp_lr)
    with torch.no_grad():
        val = net(digits.X_val.repeat(3, 1, 1)).view(3, setup.n_seeds, -1, 10)
        teacher = net(X.repeat(3, 1, 1)).view(3, setup.n_seeds, -1, 10)[0, :, :setup.student_labels]
    T = fit_temperature(val[0], digits.y_val)
    assert T.shape == (setup.n_seeds,) and calibration_summary(val[0][0], digits.y_val[0], temperature=T[0])["ece"] >= 0
    assert mlp_features(net, X.repeat(3, 1, 1)).shape[-1] == setup.hidden
    student = fit_side_by_side(
        [lambda o, t: 0.5 * smoothed(0.0)(o, t) + 0.5 * losses.distillation_loss(o, teacher, temperature=4.0, reduction="none")],
        X[:, :setup.student_labels], Y[:, :setup.student_labels], n_classes=10, hidden=setup.student_hidden, steps=2,
        lr=setup.mlp_lr)
    assert student.problems == setup.n_seeds
    torch.manual_seed(0)
    model = GPT(setup.gpt).to(DEVICE)
    get_batch = corpus.batch_fn(2, setup.gpt.block_size, device=DEVICE)
    result = train(model, get_batch, replace(setup.gpt_train, **TWO),
                   batch_loss=language_model_loss(lambda x, y, reduction: losses.cross_entropy(
                       x, y, label_smoothing=0.1, reduction=reduction)))
    assert result.steps_done == 2
    logits, targets = collect_logits(model, get_batch, "val", iters=2)
    assert logits.shape == (2 * 2 * setup.gpt.block_size, 65) and fit_temperature(logits, targets).item() > 0


def test_multitask_full():
    from minigpt.fusion import Variant, digit_halves, fusion_setup, train_fusion
    setup = fusion_setup("full")
    assert setup.hidden == 64 and setup.n_seeds == 20 and setup.steps == 600
    two = replace(setup, steps=2, eval_every=1)
    data = digit_halves(minigpt.seeds(setup.n_seeds))
    # the note's variants side by side (fixed weights, SmoothL1, gate regulariser, uncertainty, focal)
    variants = [Variant("note"), Variant("plan 2", encoder_weight=0.03, recon="smooth_l1", gate_reg=0.01,
                                         method="uncertainty (exact)"), Variant("focal", focal_gamma=2.0)]
    run = train_fusion(variants, data, two, track_conflict=True, device=DEVICE)
    assert run.f1.shape == (3, setup.n_seeds, 3) and run.cosines is not None
    few = digit_halves(minigpt.seeds(setup.n_method_seeds))
    for method in ("PCGrad", "gradient balance", "DWA", "random (RLW)", "GradNorm"):
        run = train_fusion([Variant(method, method=method)], few, two, device=DEVICE)
        assert run.losses.shape == (1, setup.n_method_seeds, 2, 3)


def test_gradient_flow_full(corpus):
    from minigpt.diagnostics import GradientRecorder, diagnostic_report
    from minigpt.gradient_flow import (DeepMLP, block_gradient_norms, detach_output, gradient_flow_setup,
                                       layer_gradient_norms)

    setup = gradient_flow_setup("full")
    assert setup.gpt.n_embd == 128 and setup.n_seeds == 5
    digits = load_digits()
    mlp = DeepMLP(digits.n_features, setup.mlp_width, 10, max(setup.mlp_depths), "sigmoid", residual=True,
                  layer_norm=True, generator=torch.Generator().manual_seed(0))
    assert len(layer_gradient_norms(mlp, digits.X_train, digits.y_train)) == max(setup.mlp_depths)
    get_batch = corpus.batch_fn(2, setup.gpt.block_size, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    for norm in ("pre", "post"):
        model = GPT(replace(setup.gpt, n_layer=max(setup.depths), norm_position=norm, scale_residual_init=False)).to(DEVICE)
        assert len(block_gradient_norms(model, [get_batch("train", g)])) == max(setup.depths)
    two = dict(max_iters=2, eval_interval=1, progress=False)
    for config in (replace(setup.ln_run, warmup_iters=setup.ln_warmup, **two),
                   replace(setup.sweep_run, learning_rate=max(setup.lrs), min_lr=max(setup.lrs), **two),
                   replace(setup.clip_run, grad_clip=min(c for c in setup.clips if c), warmup_iters=1, eval_iters=1, **two),
                   replace(setup.short_run, warmup_iters=1, **two)):
        model, recorder = GPT(replace(setup.gpt, n_layer=setup.ln_depth, norm_position="post")).to(DEVICE), GradientRecorder()
        detach_output(model.transformer.h[0])
        result = train(model, get_batch, config, grad_hook=recorder)
        assert result.steps_done == 2
        assert "no gradient" in diagnostic_report(gradients=recorder.last, reference=recorder.first, history=result)
    from minigpt.gradient_flow import training_block_gradient_norms

    model = GPT(replace(setup.gpt, n_layer=max(setup.depths), norm_position="post")).to(DEVICE)
    during, after = training_block_gradient_norms(model, get_batch, replace(setup.short_run, warmup_iters=1, **two),
                                                  [get_batch("train", g)], every=1)
    assert len(during) == len(after) == max(setup.depths)


def test_convergence_full(corpus):
    from minigpt import convergence as cv
    from minigpt.diagnostics import lr_range_test, next_batch_loss

    setup = cv.convergence_setup("full")
    assert setup.n_seeds == 10 and setup.gpt.n_embd == 128
    digits = load_stacked(load_digits, list(range(setup.n_seeds)))
    to = lambda t: t.to(DEVICE)
    two = dict(max_iters=2, eval_interval=1)
    for kwargs in (dict(optimizer="sgd"), dict(optimizer="adam", weight_decay=0.1), dict(optimizer="rmsprop"),
                   dict(optimizer="adamw", zero_grad=False), dict(batch_size=1), dict(loss="naive_bce"), dict(l1=1e-3)):
        task_kwargs = {k: kwargs.pop(k) for k in ("batch_size", "loss", "l1") if k in kwargs}
        task = cv.ClassificationTask(to(digits.X_train), to(digits.y_train), to(digits.X_val), to(digits.y_val),
                                     task_kwargs.pop("batch_size", setup.batch_size), **task_kwargs)
        net = MLP(64, setup.hidden, 10, problems=setup.n_seeds, dtype=torch.float32).to(DEVICE)
        result = train(net, task.get_batch, replace(setup.digits_run, **two, **kwargs), batch_loss=task.batch_loss)
        assert result.steps_done <= 2 and task.curve("eval_val").shape[1] == setup.n_seeds
    task = cv.ClassificationTask(to(digits.X_train), to(digits.y_train), to(digits.X_val), to(digits.y_val), 4)
    joint = lr_range_test(net, next_batch_loss(task.get_batch, 0, task.batch_loss), num_steps=3, diverge_factor=1e9)
    assert len(cv.range_tests(task, joint.lrs)) == setup.n_seeds
    get_batch = corpus.batch_fn(2, setup.gpt.block_size, device=DEVICE)
    for schedule in (dict(), dict(lr_schedule="step", step_size=1), dict(lr_schedule="plateau", plateau_patience=0),
                     dict(warmup_iters=1, min_lr=1e-4)):
        model = GPT(setup.gpt).to(DEVICE)
        result = train(model, get_batch, replace(setup.gpt_run, max_iters=2, eval_interval=1, eval_iters=1, **schedule))
        assert result.steps_done == 2
    lr_range_test(model, next_batch_loss(get_batch, 0), num_steps=3, grad_clip=1.0)


def test_vae_full():
    from minigpt.diagnostics import GradientRecorder, diagnostic_report
    from minigpt.vae import ShakespeareLines, VAERecipe, VAERuns, guide_recipes, summarise, vae_setup

    setup = vae_setup("full")
    assert setup.n_seeds >= 5 and setup.model.n_embd == 128 and setup.deep_layers == 2 * setup.model.n_layer
    lines = ShakespeareLines.load(setup.model.max_len)
    small = replace(setup, batch_size=2, steps=2, eval_interval=1, eval_iters=1, n_eval_lines=8)
    runs = VAERuns(small, lines, DEVICE)
    before, after = guide_recipes(setup)
    recorder = GradientRecorder(every=1)
    runs.hooks[(after, 0)] = recorder
    for recipe in (before, after, VAERecipe(lr=setup.lr), VAERecipe(lr=setup.lr, schedule="linear"),
                   VAERecipe(lr=setup.lr, schedule="cyclical"), VAERecipe(lr=setup.lr, free_bits=0.5)):
        run = runs(recipe, [0])[0]
        assert run.result.steps_done == 2 and len(run.loss.log.steps) == 2
        assert set(summarise(run)) >= {"kl", "gap", "neg_elbo"}
    run = runs(after, [0])[0]
    assert "Latent:" in diagnostic_report(gradients=recorder.last, reference=recorder.first, history=run.result,
                                          losses=run.loss.log, latent=(run.stats.mu, run.stats.logvar))
