"""minigpt.small_models (small models, full-batch fits side by side), the corruption models and synthetic
data of minigpt.synthetic, and stacked splits of minigpt.data."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import QuantileRegressor

from minigpt import losses
from minigpt.data import load_diabetes, load_digits, load_stacked
from minigpt.synthetic import corrupt_targets
from minigpt.report import percent
from minigpt.small_models import Linear, fit_full_batch


def _mse(p, t):
    return losses.mse_loss(p, t, reduction="none")


def test_mse_fit_reaches_least_squares():
    d = load_diabetes(dtype=torch.float64)
    model = Linear(d.n_features)
    fit_full_batch(model, d.X_train, d.y_train, _mse, steps=3000)
    A = torch.cat([d.X_train, torch.ones(len(d.X_train), 1, dtype=torch.float64)], 1)
    w = torch.linalg.lstsq(A, d.y_train[:, None]).solution[:, 0]
    torch.testing.assert_close(model.weight[:, 0].detach(), w[:-1], rtol=0, atol=1e-8)
    torch.testing.assert_close(model.bias[0, 0].detach(), w[-1], rtol=0, atol=1e-8)


def test_pinball_fit_reaches_the_linear_programme():
    d = load_diabetes(dtype=torch.float64)
    model = Linear(d.n_features)
    # the kink makes the last digits slow: 2000 steps come within 0.03 percent of the exact optimum
    fit_full_batch(model, d.X_train, d.y_train, lambda p, t: losses.quantile_loss(p, t, quantile=0.9, reduction="none"),
                   steps=2000)
    exact = QuantileRegressor(quantile=0.9, alpha=0, solver="highs").fit(d.X_train.numpy(), d.y_train.numpy())
    exact_obj = losses.quantile_loss(torch.as_tensor(exact.predict(d.X_train.numpy())), d.y_train, quantile=0.9)
    ours = losses.quantile_loss(model(d.X_train).detach(), d.y_train, quantile=0.9)
    assert float(ours) <= float(exact_obj) * (1 + 5e-4)


def test_side_by_side_problems_fit_as_if_alone():
    splits = [load_diabetes(dtype=torch.float64, split_seed=s) for s in range(3)]
    X = torch.stack([d.X_train for d in splits])
    y = torch.stack([d.y_train for d in splits])
    huber = lambda p, t: losses.huber_loss(p, t, delta=0.5, reduction="none")  # noqa: E731
    together = Linear(10, problems=3)
    fit_full_batch(together, X, y, huber, steps=300)
    for b in range(3):
        alone = Linear(10)
        fit_full_batch(alone, X[b], y[b], huber, steps=300)
        torch.testing.assert_close(together.weight[b].detach(), alone.weight.detach(), rtol=0, atol=1e-12)
    assert together(X).shape == (3, len(splits[0].y_train))
    assert Linear(10, 3, problems=3)(X).shape == (3, len(splits[0].y_train), 3)


def test_bad_arguments():
    model = Linear(4)
    with pytest.raises(ValueError, match="X must have shape"):
        model(torch.zeros(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="X must have shape"):
        Linear(4, problems=2)(torch.zeros(3, 5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        Linear(0)
    X, y = torch.zeros(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="reduction='none'"):
        fit_full_batch(model, X, y, lambda p, t: losses.mse_loss(p, t))
    with pytest.raises(ValueError, match="steps"):
        fit_full_batch(model, X, y, _mse, steps=0)
    with pytest.raises(FloatingPointError, match="lower lr"):
        fit_full_batch(model, X, y, lambda p, t: (p - t) / 0.0 * 0.0)


def test_corrupt_targets_does_what_it_says():
    y = torch.zeros(4, 200, dtype=torch.float64)
    out, mask = corrupt_targets(y, 0.1, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [20] * 4  # exactly the share, per row
    assert (out[~mask] == 0).all() and (out[mask] >= 5).all() and (out[mask] <= 15).all()
    assert not torch.equal(mask[0], mask[1])  # rows corrupted independently
    single, m1 = corrupt_targets(y[0], 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(single, y[0]) and not m1.any()
    with pytest.raises(ValueError, match="rate"):
        corrupt_targets(y, 1.5, torch.Generator())
    with pytest.raises(ValueError, match="floating"):
        corrupt_targets(torch.zeros(3, dtype=torch.long), 0.1, torch.Generator())
    with pytest.raises(ValueError, match="low"):
        corrupt_targets(y, 0.1, torch.Generator(), low=3, high=1)


def test_percent():
    assert percent(0.2) == "20%" and percent(0.0512, 1) == "5.1%" and percent(np.float64(1)) == "100%"


# --- networks, minibatch fitting and the classification chapter's data --------------------------------

from minigpt.data import load_digit_images  # noqa: E402
from minigpt.synthetic import blob_segmentation, digit_view, flip_labels, keep_minority  # noqa: E402
from minigpt.metrics import dice_score, retrieval_accuracy  # noqa: E402
from minigpt.small_models import MLP, SegmentationNet  # noqa: E402
from minigpt.train import TrainConfig, train  # noqa: E402


def test_mlp_side_by_side_equals_separate_networks():
    X = torch.randn(2, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    both = MLP(5, 4, 3, problems=2, generator=torch.Generator().manual_seed(1))
    first = MLP(5, 4, 3)
    with torch.no_grad():
        for name in ("w1", "b1", "w2", "b2"):
            getattr(first, name).copy_(getattr(both, name)[0])
    torch.testing.assert_close(both(X)[0], first(X[0]))
    assert MLP(5, 4, problems=2)(X).shape == (2, 7)
    again = MLP(5, 4, 3, problems=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.w1, both.w1)  # the generator fixes the initial weights
    with pytest.raises(ValueError, match="X must have shape"):
        both(X[0])


def test_fit_callback_sees_every_checkpoint():
    d = load_diabetes(dtype=torch.float64)
    seen = []
    fit_full_batch(Linear(10), d.X_train, d.y_train, _mse, steps=10, callback=lambda s, m: seen.append(s),
                   callback_every=4)
    assert seen == [0, 4, 8, 10]


def test_minibatch_fit_through_train():
    """A small model on a synthetic regression, trained by minigpt.train with a batch loss that returns
    (summed squared error, examples): the loop every chapter uses, with TrainConfig.adam's plain Adam."""
    X = torch.randn(256, 3, generator=torch.Generator().manual_seed(0))
    y = X @ torch.tensor([1.0, -2.0, 0.5])
    model = torch.nn.Linear(3, 1)

    def get_batch(split, g):
        idx = torch.randint(0, 256, (32,), generator=g)
        return X[idx], y[idx]

    def batch_loss(m, batch):
        x, t = batch
        return ((m(x)[:, 0] - t) ** 2).sum(), len(t)

    config = TrainConfig.adam(steps=300, lr=0.05, progress=False)
    history = train(model, get_batch, config, batch_loss=batch_loss).history
    assert len(history.loss) == 300 and history.loss[-1] < 1e-3 < history.loss[0]
    assert set(history.lr) == {0.05} and history.grad_norm[0] > 0  # constant rate, no clipping
    again = train(torch.nn.Linear(3, 1), get_batch, config, batch_loss=batch_loss).history
    assert len(again.loss) == 300


def test_stacked_splits_equal_the_single_splits():
    stacked = load_stacked(load_digits, [3, 4, 5], dtype=torch.float64)
    assert stacked.X_train.shape[0] == 3 and stacked.n_splits == 3 and stacked.n_features == 64
    single = load_digits(split_seed=4, dtype=torch.float64)
    assert torch.equal(stacked.X_test[1], single.X_test) and torch.equal(stacked.y_train[1], single.y_train)
    diabetes = load_stacked(load_diabetes, [0, 1])
    assert diabetes.y_std.shape == (2,) and float(diabetes.y_std[1]) == load_diabetes(split_seed=1).y_std
    with pytest.raises(ValueError, match="one data set"):
        from minigpt.data import stack_splits
        stack_splits([load_digits(), load_diabetes()])


def test_segmentation_net_shapes_and_seed():
    images, masks = blob_segmentation(6, 16, torch.Generator().manual_seed(0), empty_fraction=0.5)
    a, b = SegmentationNet(seed=3), SegmentationNet(seed=3)
    state = torch.random.get_rng_state()
    assert a(images).shape == masks.shape and torch.equal(a(images), b(images))
    assert torch.equal(state, torch.random.get_rng_state())  # global random state untouched
    with pytest.raises(ValueError, match="images must have shape"):
        a(images[:, 0])


def test_blob_segmentation_ground_truth():
    images, masks = blob_segmentation(400, 16, torch.Generator().manual_seed(0), empty_fraction=0.3, noise=0.0)
    empty = masks.flatten(1).sum(1) == 0
    assert 0.2 < empty.double().mean() < 0.4
    assert torch.equal(images, masks)  # without noise the image is the mask
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="empty_fraction"):
        blob_segmentation(4, 16, torch.Generator(), empty_fraction=2.0)


def test_digit_views():
    images, labels = load_digit_images()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,) and images.max() == 16
    clean = digit_view(images[:50], torch.Generator().manual_seed(0), max_shift=0, noise=0.0)
    torch.testing.assert_close(clean, images[:50].reshape(50, 64) / 16)
    shifted = digit_view(images[:50], torch.Generator().manual_seed(0), max_shift=1, noise=0.0)
    assert shifted.shape == (50, 64) and (shifted.sum(1) <= clean.sum(1) + 1e-6).all()  # shifting only drops ink


def test_flip_labels_and_keep_minority():
    y = torch.arange(10).repeat(20)
    noisy, mask = flip_labels(y, 0.25, torch.Generator().manual_seed(0), n_classes=10)
    assert mask.sum() == 50 and (noisy[mask] != y[mask]).all() and torch.equal(noisy[~mask], y[~mask])
    rows, rmask = flip_labels(torch.stack([y, y]), 0.1, torch.Generator().manual_seed(0), n_classes=10)
    assert rmask.sum(1).tolist() == [20, 20]
    with pytest.raises(ValueError, match="labels in"):
        flip_labels(y, 0.1, torch.Generator(), n_classes=5)
    binary = (torch.arange(300) % 3 == 0).long()  # 100 positives, 200 negatives
    kept = keep_minority(binary, 1, 20, torch.Generator().manual_seed(0))
    assert int(binary[kept].sum()) == 10 and int((binary[kept] == 0).sum()) == 200
    with pytest.raises(ValueError, match="fewer than"):
        keep_minority(binary, 1, 1, torch.Generator())


def test_dice_score_and_retrieval():
    p = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(dice_score(p, t), torch.tensor([2 / 3, 1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="binary"):
        dice_score(p * 0.5, t)
    q = torch.eye(4)
    assert retrieval_accuracy(q, q) == 1.0
    assert retrieval_accuracy(q, q[[1, 0, 2, 3]]) == 0.5
    with pytest.raises(ValueError, match="one shape"):
        retrieval_accuracy(q, q[:3])


def test_fit_full_batch_decays_weights_but_not_biases():
    """Zero inputs and targets at the bias's optimum give no data gradient, so only the decoupled decay
    could move a parameter: the weights shrink, the biases stay put."""
    model = Linear(2, 1, problems=2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    X, y = torch.zeros(2, 5, 2, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64)
    fit_full_batch(model, X, y, lambda out, t: (out - t) ** 2, steps=3, lr=0.1, weight_decay=0.5)
    assert torch.all(model.bias == 0)
    assert torch.all(model.weight < 1.0)
