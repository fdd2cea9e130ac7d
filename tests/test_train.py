import math

import pytest
import torch

from minigpt.model import GPT
from minigpt.train import (
    TrainConfig, TrainingDiverged, configure_optimizer, load_checkpoint, load_model, lr_at, train,
)

FAST = dict(eval_interval=10, eval_iters=2, warmup_iters=5, progress=False)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return GPT(cfg)


def test_same_seed_same_curves(corpus, tiny_config):
    get_batch = corpus.batch_fn(4, tiny_config.block_size)
    runs = [train(_model(tiny_config), get_batch, TrainConfig(max_iters=20, seed=5, **FAST)) for _ in range(2)]
    a, b = (r.history for r in runs)
    assert a.loss == b.loss and a.grad_norm == b.grad_norm and a.val_loss == b.val_loss  # bit-identical
    other = train(_model(tiny_config), get_batch, TrainConfig(max_iters=20, seed=6, **FAST)).history
    assert other.loss != a.loss


def test_training_lowers_the_loss(corpus, tiny_config):
    result = train(_model(tiny_config), corpus.batch_fn(8, 16), TrainConfig(max_iters=60, **FAST))
    h = result.history
    assert h.eval_step == [0, 10, 20, 30, 40, 50, 60]
    assert h.val_loss[-1] < h.val_loss[0] - 0.5
    assert result.steps_done == 60 and result.stop_reason == "max_iters"
    assert result.tokens == 60 * 8 * 16


def _capture_grads(store):
    def hook(step, model):
        store[step] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return hook


def _accumulation_run(tiny_config, batches, accum, lr=1e-3):
    """One update on ``batches`` (a list of (x, y)), served ``accum`` micro-batches per update."""
    served = iter(batches)
    grads = {}
    model = _model(tiny_config)
    result = train(model, lambda split, gen: next(served),
          TrainConfig(max_iters=1, grad_accum_steps=accum, eval_iters=0,
                      warmup_iters=0, grad_clip=None, learning_rate=lr, min_lr=lr, progress=False),
          grad_hook=_capture_grads(grads))
    return grads[1], result.history.loss[0]


def test_accumulation_equals_one_big_batch(corpus, tiny_config):
    """k micro-batches give the gradient of one batch of k times the size, to float precision, also when
    the micro-batches hold different numbers of target tokens (here: prompts masked with -100)."""
    x, y = corpus.batch_fn(12, 16)("train", torch.Generator().manual_seed(0))
    y = y.clone()
    y[:4, :12] = -100  # the first micro-batch has far fewer target tokens than the others
    y[4:8, :3] = -100
    big_grad, big_loss = _accumulation_run(tiny_config, [(x, y)], accum=1)
    chunks = list(zip(x.split(4), y.split(4)))
    acc_grad, acc_loss = _accumulation_run(tiny_config, chunks, accum=3)
    # Compare gradients, the thing accumulation must get right. (Weights after an AdamW step are no fair
    # test at 1e-6: Adam's first update is g / (|g| + eps), which magnifies rounding where |g| ~ eps.)
    for name in big_grad:
        torch.testing.assert_close(acc_grad[name], big_grad[name], rtol=1e-6, atol=1e-7)
    assert acc_loss == pytest.approx(big_loss, rel=1e-6)

    # The common mistake, the mean of micro-batch means, is measurably wrong on the same batches.
    model = _model(tiny_config)
    wrong = sum(model(cx, cy)[1] for cx, cy in chunks) / 3
    wrong.backward()
    worst = max((p.grad - big_grad[n]).abs().max() / big_grad[n].abs().max()
                for n, p in model.named_parameters())
    assert worst > 0.01


def test_grad_norm_is_recorded_before_clipping(corpus, tiny_config):
    grads = {}
    result = train(_model(tiny_config), corpus.batch_fn(4, 16),
                   TrainConfig(max_iters=3, grad_clip=1e-3, **FAST), grad_hook=_capture_grads(grads))
    for step, g in grads.items():
        # named_parameters lists the tied embedding/head matrix once, as the optimizer sees it
        norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in g.values()])).item()
        assert math.isclose(result.history.grad_norm[step - 1], norm, rel_tol=1e-5)
        assert norm > 1e-3  # so clipping fired
    assert result.history.clip_fraction(1e-3) == 1.0


@pytest.mark.parametrize("patience", [None, 100])
def test_resume_equals_uninterrupted(corpus, tiny_config, tmp_path, patience):
    """Stop after 20 updates, resume from the checkpoint in a fresh model, and get the very same numbers
    as a run that never stopped (dropout on, so the RNG state must be restored too; with patience, the
    best weights so far must travel in the checkpoint, since the run ends by restoring them)."""
    tiny_config.dropout = 0.1
    get_batch = corpus.batch_fn(4, 16)
    path = str(tmp_path / "ckpt-{step}.pt")
    cfg = TrainConfig(max_iters=40, checkpoint_path=path, checkpoint_interval=20, patience=patience, **FAST)
    full_model = _model(tiny_config)
    full = train(full_model, get_batch, cfg)

    resumed_model = _model(tiny_config, seed=123)  # different initial weights: the checkpoint must win
    resumed = train(resumed_model, get_batch, cfg, resume_from=path.format(step=20))
    assert resumed.history.loss == full.history.loss
    assert resumed.history.grad_norm == full.history.grad_norm
    assert resumed.history.val_loss == full.history.val_loss
    assert (resumed.best_val_loss, resumed.best_step) == (full.best_val_loss, full.best_step)
    for p, q in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)

    # checkpoints hold plain tensors and containers: they load with weights_only=True
    ckpt = load_checkpoint(path.format(step=40))
    assert ckpt["step"] == 40
    if patience is not None:
        return  # the runs ended on their best weights, not the step-40 ones the checkpoint holds
    reloaded = load_model(path.format(step=40)).eval()
    trained = full_model.eval()
    x = torch.randint(65, (2, 16))
    torch.testing.assert_close(reloaded(x)[0], trained(x)[0])


def test_resume_rejects_another_model(corpus, tiny_config, tmp_path):
    path = tmp_path / "ckpt.pt"
    train(_model(tiny_config), corpus.batch_fn(4, 16), TrainConfig(max_iters=2, checkpoint_path=str(path), **FAST))
    tiny_config.n_layer = 3
    with pytest.raises(ValueError, match="resume_from"):
        train(_model(tiny_config), corpus.batch_fn(4, 16), TrainConfig(max_iters=4, **FAST), resume_from=path)


def _toy_batches(train_target=2.0, val_target=1.0, poison_at=None):
    calls = {"train": 0}

    def get_batch(split, gen):
        if split == "train":
            calls["train"] += 1
            if poison_at is not None and calls["train"] == poison_at:
                return torch.ones(4), torch.full((4,), float("inf"))
            return torch.ones(4), torch.full((4,), train_target)
        return torch.ones(4), torch.full((4,), val_target)

    return get_batch


def test_early_stopping_restores_best_weights(toy_model):
    snapshots = {}
    cfg = TrainConfig(max_iters=200, learning_rate=0.05, min_lr=0.05, warmup_iters=0, weight_decay=0.0,
                      eval_interval=1, eval_iters=1, patience=3, grad_clip=None, progress=False)
    result = train(toy_model, _toy_batches(),
                   cfg, grad_hook=lambda step, m: snapshots.__setitem__(step - 1, m.w.item()))
    assert result.stop_reason == "early_stopping"
    assert result.steps_done == result.best_step + 3 < 200
    val = result.history.val_loss
    assert min(val) == result.best_val_loss and val[-1] > result.best_val_loss
    assert toy_model.w.item() == snapshots[result.best_step]  # the best weights, not the last
    assert abs(toy_model.w.item() - 1.0) < 0.05  # validation optimum is w = 1


def test_divergence_names_the_step(toy_model):
    cfg = TrainConfig(max_iters=50, eval_iters=0, progress=False)
    with pytest.raises(TrainingDiverged, match="update 7") as info:
        train(toy_model, _toy_batches(poison_at=7), cfg)
    assert info.value.step == 7 and len(info.value.history.loss) == 6
    assert math.isfinite(toy_model.w.item())  # the bad update was not applied

    cfg.on_nonfinite = "stop"
    result = train(toy_model, _toy_batches(poison_at=4), cfg)
    assert result.stop_reason == "non-finite at update 4" and result.steps_done == 3


def test_lr_schedule():
    cfg = TrainConfig(max_iters=2000, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100)
    lrs = [lr_at(i, cfg) for i in range(2100)]
    assert lrs[0] == pytest.approx(1e-3 / 101)
    assert max(lrs) == pytest.approx(1e-3, rel=1e-4) and lrs.index(max(lrs)) == 100
    assert all(a >= b for a, b in zip(lrs[100:2000], lrs[101:2001]))  # never rises after warmup
    assert lrs[1050] == pytest.approx(5.5e-4)  # halfway down the cosine
    assert lrs[2000] == lrs[2099] == 1e-4


def test_optimizer_groups(tiny_config):
    model = _model(tiny_config)
    opt = configure_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_iters=0), "max_iters"), (dict(grad_accum_steps=0), "grad_accum_steps"),
    (dict(learning_rate=-1.0), "learning_rate"), (dict(grad_clip=-1.0), "grad_clip"),
    (dict(patience=0), "patience"), (dict(on_nonfinite="ignore"), "on_nonfinite"),
    (dict(warmup_iters=100, lr_decay_iters=50), "lr_decay_iters"), (dict(eval_iters=-1), "eval_iters"),
    (dict(eval_iters=0, patience=3), "patience"),
])
def test_config_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TrainConfig(**kwargs)


def test_fully_masked_update_is_an_error(tiny_config):
    masked = lambda split, gen: (torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), -100))  # noqa: E731
    with pytest.raises(ValueError, match="ignored"):
        train(_model(tiny_config), masked, TrainConfig(max_iters=1, **FAST))


def test_training_under_pytest_prints_no_bar(corpus, tiny_config, capsys):
    """progress=None: off under pytest (and in the book build), so no bar text reaches a log or a page."""
    train(_model(tiny_config), corpus.batch_fn(4, 16), TrainConfig(max_iters=3, eval_iters=0))
    captured = capsys.readouterr()
    assert "train" not in captured.err and "step" not in captured.err


def test_resume_restores_cuda_rng_for_the_gpus_present(monkeypatch):
    """A checkpoint from a machine with more GPUs restores the GPUs present; one from a CPU-only machine
    seeds CUDA's generators instead of leaving them unseeded. (Faked CUDA: runs without a GPU.)"""
    import importlib

    train_module = importlib.import_module("minigpt.train")  # the module; minigpt.train is the function

    calls = []

    class FakeGenerator:
        def __init__(self, index):
            self.index = index

        def manual_seed(self, seed):
            calls.append(("seed", self.index, seed))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device, state)))
    monkeypatch.setattr(torch.cuda, "default_generators", (FakeGenerator(0), FakeGenerator(1)), raising=False)
    gen = torch.Generator()
    base = {"torch": torch.get_rng_state(), "train_gen": gen.get_state()}
    train_module._set_rng_state({**base, "cuda": ["s0", "s1", "s2", "s3"]}, gen, reseed=7)
    assert calls == [("set", 0, "s0"), ("set", 1, "s1")]  # four saved, two present
    calls.clear()
    train_module._set_rng_state(base, gen, reseed=7)  # saved on a CPU-only machine
    assert calls == [("seed", 0, 7), ("seed", 1, 8)]


def _toy_run(toy_model, **overrides):
    """The toy regression (w * x against 2) trained by ``train`` with ``overrides`` (a constant rate)."""
    cfg = TrainConfig(**{**dict(max_iters=20, learning_rate=0.01, min_lr=0.01, warmup_iters=0, weight_decay=0.0,
                                grad_clip=None, eval_interval=1, eval_iters=1, progress=False), **overrides})
    return train(toy_model, _toy_batches(), cfg)


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                       ("sgd", torch.optim.SGD), ("rmsprop", torch.optim.RMSprop)])
def test_optimizer_choice_keeps_the_groups(tiny_config, name, cls):
    model = _model(tiny_config)
    opt = configure_optimizer(model, TrainConfig(optimizer=name, weight_decay=0.1, momentum=0.5))
    assert type(opt) is cls
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    if name == "sgd":
        assert decay["momentum"] == 0.5


def test_sgd_follows_the_momentum_recursion(toy_model):
    """Loss (w x - y)^2 on the toy batches; SGD with momentum m: v <- m v + g, w <- w - lr v."""
    result = _toy_run(toy_model, optimizer="sgd", momentum=0.9, max_iters=3)
    x, y = _toy_batches()("train", None)
    w, v = 0.0, 0.0
    for _ in range(3):
        g = float((2 * (w * x - y) * x).mean())
        v = 0.9 * v + g
        w -= 0.01 * v
    assert toy_model.w.item() == pytest.approx(w, rel=1e-5)
    assert result.steps_done == 3


def test_step_schedule_and_plateau_rule():
    cfg = TrainConfig(max_iters=100, learning_rate=1.0, min_lr=0.0, warmup_iters=0, lr_schedule="step",
                      step_size=30, step_gamma=0.1)
    assert [lr_at(i, cfg) for i in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001])
    warm = TrainConfig(max_iters=100, learning_rate=1.0, min_lr=0.0, warmup_iters=4, lr_schedule="plateau")
    assert lr_at(0, warm) == pytest.approx(0.2) and lr_at(50, warm) == 1.0


def test_plateau_matches_torch_reduce_lr_on_plateau():
    """The rule applied to a validation curve gives the rates torch's scheduler gives on the same values."""
    vals = [5.0, 4.0, 4.0, 3.9999, 4.1, 3.0, 3.0, 3.0, 3.0, 2.0, 2.5, 2.5]

    class Scripted(torch.nn.Module):  # validation loss read from the script, one value per evaluation
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.evals = 0

        def forward(self, x, y, loss_fn=None, reduction="sum"):
            if not self.training and x == "val":
                self.evals += 1
                return None, self.w.sum() * 0 + vals[self.evals - 1]
            return None, (self.w * 0 + 1).sum()

    model = Scripted()
    cfg = TrainConfig(max_iters=len(vals) - 1, learning_rate=1.0, min_lr=0.0, warmup_iters=0, weight_decay=0.0,
                      grad_clip=None, eval_interval=1, eval_iters=1, lr_schedule="plateau", plateau_factor=0.5,
                      plateau_patience=1, plateau_threshold=1e-4, progress=False)
    result = train(model, lambda split, gen: (split, split), cfg, batch_loss=lambda m, b: (m(*b)[1], 1))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1, threshold=1e-4)
    expected = []
    for v in vals[:-1]:  # evaluation at step s sets the rate of update s + 1
        sched.step(v)
        expected.append(opt.param_groups[0]["lr"])
    assert result.history.lr == pytest.approx(expected)


def test_forgotten_zero_grad_sums_past_gradients(corpus, tiny_config):
    """zero_grad=False: the gradient the optimizer sees at update t is the sum of the mean gradients of
    updates 1..t, what a loop that never clears .grad computes; the default clears it."""
    get_batch = corpus.batch_fn(4, tiny_config.block_size)
    cfg = TrainConfig(max_iters=3, eval_iters=0, warmup_iters=0, grad_clip=None, progress=False, optimizer="sgd",
                      learning_rate=1e-9, min_lr=1e-9, momentum=0.0)
    fresh, kept = {}, {}
    train(_model(tiny_config), get_batch, cfg, grad_hook=_capture_grads(fresh))
    carried = {}
    result = train(_model(tiny_config), get_batch, replace_cfg(cfg, zero_grad=False), grad_hook=_capture_grads(carried))
    # with a rate of 1e-9 the weights barely move, so each update's own gradient is the same in both runs
    for step in (1, 2, 3):
        for name, g in carried[step].items():
            assert torch.allclose(g, sum(fresh[s][name] for s in range(1, step + 1)), atol=1e-5)
    total = torch.cat([sum(fresh[s][n] for s in (1, 2, 3)).flatten() for n in fresh[1]])
    assert result.history.grad_norm[2] == pytest.approx(float(total.norm()), rel=1e-4)


def replace_cfg(cfg, **changes):
    from dataclasses import replace

    return replace(cfg, **changes)


@pytest.mark.parametrize("kwargs, name", [
    (dict(optimizer="lion"), "optimizer"), (dict(lr_schedule="linear"), "lr_schedule"),
    (dict(step_size=0), "step_size"), (dict(plateau_factor=1.0), "plateau_factor"),
    (dict(lr_schedule="plateau", eval_iters=0), "plateau"), (dict(momentum=1.0), "momentum"),
])
def test_new_config_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TrainConfig(**kwargs)


def test_stacked_networks_decay_weights_but_not_their_biases():
    """B networks side by side hold each bias as a (B, 1, H) tensor; the model's no_weight_decay() names
    them, so AdamW decays the matrices alone, as it does for one network."""
    from minigpt.fusion import GatedFusionNet
    from minigpt.small_models import MLP

    for model in (MLP(4, 8, 3, problems=2, generator=torch.Generator().manual_seed(0)), GatedFusionNet([0, 1])):
        decay, no_decay = configure_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
        names = {id(p): n for n, p in model.named_parameters()}
        assert {names[id(p)] for p in no_decay["params"]} == model.no_weight_decay() and no_decay["weight_decay"] == 0
        assert all(names[id(p)].startswith("w") for p in decay["params"]) and decay["weight_decay"] == 0.1


def test_no_weight_decay_must_name_real_parameters():
    from minigpt.train import decay_groups

    model = torch.nn.Linear(3, 2)
    model.no_weight_decay = lambda: {"bais"}
    with pytest.raises(ValueError, match="bais"):
        decay_groups(model, 0.1)
