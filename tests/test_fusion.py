import math
from dataclasses import replace

import pytest
import torch

from minigpt import losses
from minigpt.fusion import (METHODS, GatedFusionNet, Variant, batched_info_nce, digit_halves, fusion_setup, macro_f1,
                            recon_gradient, reconstruction_loss, task_losses, train_fusion)
from minigpt.metrics import f1_score

TINY = replace(fusion_setup("small"), steps=12, eval_every=3, batch_size=16, hidden=8, proj_dim=4)


@pytest.fixture(scope="module")
def data():
    return digit_halves([0, 1])


def test_digit_halves(data):
    assert data.a["train"].shape == (2, 1078, 32) and data.b["val"].shape[-1] == 32
    assert data.whole("test").shape[-1] == 64 and data.y["train"].dtype == torch.int64
    # the left half is columns 0-3 of each row: pixel (row 2, column 1) is feature 2 * 4 + 1
    from minigpt.data import load_digits
    full = load_digits(split_seed=0)
    torch.testing.assert_close(data.a["train"][0][:, 9], full.X_train[:, 2 * 8 + 1])
    torch.testing.assert_close(data.b["train"][0][:, 9], full.X_train[:, 2 * 8 + 5])


def test_net_shapes_and_seeded_init():
    net = GatedFusionNet([3, 4, 3], view_dim=5, hidden=6, n_classes=7, proj_dim=2)
    torch.testing.assert_close(net.w_a[0], net.w_a[2])  # same seed, same initial weights
    assert not torch.equal(net.w_a[0], net.w_a[1])
    out = net(torch.randn(3, 9, 5), torch.randn(3, 9, 5))
    assert out.logits.shape == (3, 9, 7) and out.gate.shape == (3, 9, 6) and out.z_a.shape == (3, 9, 2)
    assert out.recon.shape == out.recon_a.shape == (3, 9, 10)
    assert bool(((out.gate > 0) & (out.gate < 1)).all())
    torch.testing.assert_close(out.fused, out.gate * out.h_a + (1 - out.gate) * out.h_b)
    with pytest.raises(ValueError, match="xa must have shape"):
        net(torch.randn(2, 9, 5), torch.randn(3, 9, 5))


def test_batched_info_nce_is_chapter_3s_info_nce():
    z1, z2 = torch.randn(4, 10, 3, dtype=torch.float64), torch.randn(4, 10, 3, dtype=torch.float64)
    got = batched_info_nce(z1, z2, 0.1)
    want = torch.stack([losses.info_nce_loss(z1[p], z2[p], temperature=0.1) for p in range(4)])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="temperature"):
        batched_info_nce(z1, z2, 0.0)


def test_reconstruction_loss_is_mse_or_smooth_l1():
    recon, target = 3 * torch.randn(2, 7, 5, dtype=torch.float64), torch.randn(2, 7, 5, dtype=torch.float64)
    got = reconstruction_loss(recon, target, torch.tensor([False, True]))
    torch.testing.assert_close(got[0], losses.mse_loss(recon[0], target[0]))
    torch.testing.assert_close(got[1], losses.smooth_l1_loss(recon[1], target[1], beta=1.0))
    leaf = recon.clone().requires_grad_(True)
    reconstruction_loss(leaf, target, torch.tensor([False, True])).sum().backward()
    torch.testing.assert_close(leaf.grad * 35, recon_gradient(recon, target, torch.tensor([False, True])))


def test_macro_f1_matches_metrics():
    gen = torch.Generator().manual_seed(0)
    logits, y = torch.randn(3, 50, 4, generator=gen), torch.randint(0, 4, (3, 50), generator=gen)
    got = macro_f1(logits, y)
    for p in range(3):
        assert got[p].item() == pytest.approx(f1_score(logits[p].argmax(-1), y[p], average="macro"))


def test_task_losses_terms():
    net = GatedFusionNet([0, 0, 0], view_dim=4, hidden=5, n_classes=3, proj_dim=2)
    # one seed and one batch for all three problems: they differ only in their loss settings
    xa, xb, y = torch.randn(1, 8, 4).repeat(3, 1, 1), torch.randn(1, 8, 4).repeat(3, 1, 1), torch.randint(0, 3, (8,)).repeat(3, 1)
    out = net(xa, xb)
    L = task_losses(out, xa, xb, y, smooth_l1=torch.tensor([False] * 3), gate_coef=torch.tensor([0.0, 0.5, 0.0]),
                    focal_gamma=torch.tensor([0.0, 0.0, 2.0]))
    torch.testing.assert_close(L[0, 0], losses.cross_entropy(out.logits[0], y[0]))
    torch.testing.assert_close(L[2, 0], losses.softmax_focal_loss(out.logits[2], y[2], gamma=2.0))
    torch.testing.assert_close(L[0, 1], losses.info_nce_loss(out.z_a[0], out.z_b[0], temperature=0.1))
    x = torch.cat([xa, xb], -1)
    recon = (losses.mse_loss(out.recon[0], x[0]) + (losses.mse_loss(out.recon_a[0], x[0])
                                                     + losses.mse_loss(out.recon_b[0], x[0])) / 2)
    torch.testing.assert_close(L[0, 2], recon)
    torch.testing.assert_close(L[1, 2] - L[0, 2], 0.5 * (out.gate[1] - 0.5).pow(2).mean())  # the gate regulariser


def test_variant_checks():
    with pytest.raises(ValueError, match="recon"):
        Variant("x", recon="l1")
    with pytest.raises(ValueError, match="method"):
        Variant("x", method="magic")


def test_train_fusion_pairs_variants_and_records(data):
    run = train_fusion([Variant("a"), Variant("same as a"), Variant("sl1", recon="smooth_l1", gate_reg=0.01)],
                       data, TINY, track_conflict=True)
    assert run.f1.shape == (3, 2, 5) and run.eval_steps == [0, 3, 6, 9, 12]
    assert run.losses.shape == (3, 2, 12, 3) and run.encoder_grad.shape == (3, 2, 12)
    torch.testing.assert_close(run.f1[0], run.f1[1])  # same seed, same batches: identical runs
    assert not torch.equal(run.losses[0], run.losses[2])
    assert run.cosines.shape == (3, 2, 4, 3) and bool((run.cosines.abs() <= 1 + 1e-6).all())
    assert run.test_f1.shape == (3, 2) and bool(((run.outlier_share > 0) & (run.outlier_share < 1)).all())
    steps = run.steps_to_target(2.0)  # never reached
    assert bool(torch.isnan(steps).all()) and run.steps_to_target(0.0).eq(0).all()
    assert run.volatility().shape == (3, 2) and run.grad_variation().shape == (3, 2)
    assert run.index("sl1") == 2


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains(method, data):
    run = train_fusion([Variant(method, method=method)], data, TINY)
    W = run.weights[0, :, -1]
    assert run.f1.shape == (1, 2, 5) and math.isfinite(run.seconds_per_step)
    if method not in ("fixed",) and not method.startswith("uncertainty"):
        torch.testing.assert_close(W.sum(-1), torch.full((2,), 1.25))  # matched total
    if method == "PCGrad":
        assert run.pcgrad_changed.shape == (1, 2, 12)
    if method.startswith("uncertainty"):
        assert not torch.equal(run.weights[0, :, 0], W)  # the weights learn


def test_gradnorm_runs_alone(data):
    with pytest.raises(ValueError, match="only variant"):
        train_fusion([Variant("g", method="GradNorm"), Variant("f")], data, TINY)


def test_setup():
    small, full = fusion_setup("small"), fusion_setup("full")
    assert small.n_seeds >= 5 and full.steps > small.steps
    with pytest.raises(ValueError, match="scale"):
        fusion_setup("huge")


def test_judge_prediction_and_claim_verdict():
    from minigpt.fusion import claim_verdict, judge_prediction
    assert judge_prediction([14, 15, 16], 10, 20)[0] == "consistent"
    assert judge_prediction([0, 1, -1], 10, 20)[0] == "contradicted"
    assert judge_prediction([-20, 30, 15], 10, 20)[0] == "unresolved"
    assert judge_prediction([40, 41, 42], 10, 20)[0] == "exceeded"
    assert judge_prediction([-25, -24, -26], -30, -20)[0] == "consistent"  # a predicted fall
    assert judge_prediction([0, 1, -1], -30, -20)[0] == "contradicted"
    assert judge_prediction([-1, 1, 0.5], 0, 5)[0] == "consistent"  # "no change or slightly faster"
    assert judge_prediction([-9, -10, -11], 0, 5)[0] == "contradicted"
    assert claim_verdict(["consistent", "consistent"]) == "holds"
    assert claim_verdict(["consistent", "contradicted"]) == "holds in part"
    assert claim_verdict(["unresolved", "contradicted"]) == "does not hold"
    assert claim_verdict(["unresolved"]) == "not testable here"
    with pytest.raises(ValueError, match="outcomes"):
        claim_verdict(["maybe"])


def test_gradient_shares_follow_the_weights(data):
    """At the first evaluation two variants that differ only in the encoder weight share weights and batch:
    the encoder term's gradient norm scales with its weight, the others' are equal; shares sum to 1."""
    run = train_fusion([Variant("0.05"), Variant("0.03", encoder_weight=0.03), Variant("none", encoder_weight=0.0)],
                       data, TINY, track_conflict=True)
    norms, shares = run.task_grad_norms.double(), run.gradient_shares()
    assert norms.shape == shares.shape == (3, 2, 4, 3)
    torch.testing.assert_close(shares.sum(-1), torch.ones(3, 2, 4, dtype=torch.float64))
    torch.testing.assert_close(norms[1, :, 0, 2], 0.6 * norms[0, :, 0, 2], rtol=1e-4, atol=0)
    torch.testing.assert_close(norms[1, :, 0, :2], norms[0, :, 0, :2], rtol=1e-4, atol=0)
    assert bool((shares[2, ..., 2] == 0).all()) and bool((shares[0, ..., 2] > 0).all())
    plain = train_fusion([Variant("0.05")], data, TINY)
    assert plain.task_grad_norms is None
    with pytest.raises(ValueError, match="track_conflict"):
        plain.gradient_shares()
