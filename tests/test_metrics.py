"""Metrics and experiment statistics against scikit-learn and scipy, and hand-checked cases."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import average_precision_score
from sklearn.metrics import f1_score as sk_f1

from minigpt import metrics
from minigpt.experiments import ci_cell, markdown_table, mean_ci, paired_comparison, summary_table


def test_accuracy():
    target = torch.tensor([0, 1, 2, 1])
    assert metrics.accuracy(torch.tensor([0, 1, 1, 1]), target) == 0.75
    logits = torch.tensor([[2.0, 0, 0], [0, 3, 0], [0, 0, 1], [5, 0, 0]])
    assert metrics.accuracy(logits, target) == 0.75
    with pytest.raises(ValueError, match="prediction must have"):
        metrics.accuracy(torch.tensor([0, 1]), target)


@pytest.mark.parametrize("seed", range(5))
def test_f1_matches_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    y, p = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (200,), generator=g)
    assert metrics.f1_score(p, y, average="macro") == pytest.approx(sk_f1(y, p, average="macro", zero_division=0))
    yb, pb = (y > 1).long(), (p > 2).long()
    assert metrics.f1_score(pb, yb) == pytest.approx(sk_f1(yb, pb, zero_division=0))


@pytest.mark.parametrize("seed", range(5))
def test_pr_auc_matches_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(300, generator=g) < 0.1).long()
    y[0] = 1
    score = torch.round(torch.rand(300, generator=g) * 20) / 20 + 0.3 * y  # ties included on purpose
    assert metrics.pr_auc(score, y) == pytest.approx(average_precision_score(y.numpy(), score.numpy()), rel=1e-12)
    with pytest.raises(ValueError, match="no positive"):
        metrics.pr_auc(score, torch.zeros(300, dtype=torch.long))


def _ece_by_hand(probs, target, n_bins):
    conf, pred = probs.max(1)
    total = 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi) if m else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            acc = (pred[in_bin] == target[in_bin]).double().mean()
            total += in_bin.double().mean() * abs(acc - conf[in_bin].double().mean())
    return float(total)


@pytest.mark.parametrize("seed", range(4))
def test_ece_matches_the_definition(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(500, 10, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, 10, (500,), generator=g)
    probs = torch.softmax(logits, 1)
    assert metrics.expected_calibration_error(probs, target) == pytest.approx(_ece_by_hand(probs, target, 15), abs=1e-12)
    diagram = metrics.reliability_diagram(probs, target)
    assert sum(diagram.count) == 500 and len(diagram.edges) == 16


def test_ece_of_a_calibrated_and_an_overconfident_model():
    # labels drawn from the model's own probabilities: calibrated by construction
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(20000, 5, generator=g, dtype=torch.float64), 1)
    target = torch.multinomial(probs, 1, generator=g)[:, 0]
    assert metrics.expected_calibration_error(probs, target) < 0.02
    sharpened = torch.softmax(torch.log(probs) * 4, 1)  # same ranking, overconfident
    assert metrics.expected_calibration_error(sharpened, target) > 0.2


def test_calibration_bad_inputs():
    with pytest.raises(ValueError, match="probs must be probabilities"):
        metrics.expected_calibration_error(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="n_bins"):
        metrics.expected_calibration_error(torch.full((4, 2), 0.5), torch.zeros(4, dtype=torch.long), n_bins=0)
    with pytest.raises(ValueError, match="target must hold integer"):
        metrics.expected_calibration_error(torch.full((4, 2), 0.5), torch.zeros(4))


def test_interval_coverage_and_crossing():
    target = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert metrics.interval_coverage(torch.zeros(4), torch.full((4,), 1.5), target) == 0.5
    preds = torch.tensor([[0.0, 1.0, 2.0], [0.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    assert metrics.quantile_crossing_rate(preds) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="upper must be"):
        metrics.interval_coverage(torch.zeros(4), torch.zeros(3), target)


def test_paired_comparison_matches_scipy():
    a, b = [1.0, 2.0, 3.5, 4.0, 5.2], [1.5, 2.1, 3.9, 4.6, 5.3]
    cmp = paired_comparison(a, b)
    assert cmp.p_value == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert cmp.difference.mean == pytest.approx(np.mean(np.subtract(a, b)))
    assert cmp.a_lower == 5 and cmp.n == 5
    with pytest.raises(ValueError, match="pair up"):
        paired_comparison([1.0, 2.0], [1.0])


def test_tables():
    rows = summary_table({"mse": [1.0, 2.0, 3.0], "huber": [1.0, 1.0, 1.0]})
    assert rows[0]["mean"] == 2.0 and rows[0]["low"] == pytest.approx(mean_ci([1, 2, 3]).low)
    table = markdown_table(rows, digits=2, label="loss")
    assert table.splitlines()[2].startswith("| mse | 2.00 | [") and "| huber | 1.00 | [1.00, 1.00] | 3 |" in table
    assert not math.isnan(rows[1]["high"])


def test_ci_cells_and_dict_tables():
    ci = mean_ci([0.41, 0.45, 0.43])
    assert ci_cell([0.41, 0.45, 0.43], 1, scale=100, suffix="%") == f"43.0% ± {100 * ci.half_width:.1f}"
    assert ci_cell(ci, 2, signed=True).startswith("+0.43 ± ")
    table = markdown_table({"BCE": {"Dice": [0.7, 0.8, 0.75], "note": "text"},
                            "Dice": {"Dice": ci, "note": "more"}}, digits=2, label="loss")
    lines = table.splitlines()
    assert lines[0] == "| loss | Dice | note |" and lines[1] == "| --- | --- | --- |"
    assert lines[2] == f"| BCE | {ci_cell([0.7, 0.8, 0.75], 2)} | text |"
    assert lines[3].startswith("| Dice | 0.43 ± ")
    assert markdown_table({"a": {"n": 7, "x": 0.5}}, digits=2).splitlines()[2] == "| a | 7 | 0.50 |"
    with pytest.raises(ValueError, match="columns"):
        markdown_table({"a": {"x": 1.0}, "b": {"y": 2.0}})


def test_pearson_ci_matches_scipy_fisher_interval():
    from scipy import stats

    from minigpt.experiments import pearson_ci

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=gen, dtype=torch.float64)
    y = 0.5 * x + torch.randn(50, generator=gen, dtype=torch.float64)
    r, low, high = pearson_ci(x.tolist(), y.tolist())
    ref = stats.pearsonr(x.numpy(), y.numpy())
    ci = ref.confidence_interval(0.95)
    assert r == pytest.approx(ref.statistic) and low == pytest.approx(ci.low) and high == pytest.approx(ci.high)
    with pytest.raises(ValueError, match="at least 4"):
        pearson_ci([1, 2, 3], [1, 2, 3])


def test_report_phrases_follow_the_interval():
    from minigpt.experiments import MeanCI
    from minigpt.report import count_phrase, difference_phrase, percent, verdict

    assert difference_phrase(MeanCI(0.042, 0.010, 0.074, 5)) == "higher by 0.042 (95% interval 0.010 to 0.074)"
    assert difference_phrase(MeanCI(-0.042, -0.074, -0.010, 5), lower="better") == (
        "better by 0.042 (95% interval 0.010 to 0.074)")  # magnitudes, in the direction the words state
    assert difference_phrase(MeanCI(0.0015, 0.00004, 0.0029, 30), digits=4) == (
        "higher by 0.0015 (95% interval 0.00004 to 0.0029)")  # a positive bound never reads 0.0000
    assert difference_phrase(MeanCI(0.01, -0.01, 0.03, 5), digits=2, scale=100, unit=" points") == (
        "no difference the interval can resolve (95% interval -1.00 to 3.00 points)")
    assert percent(0.997) == "99.7%" and percent(0.003) == "0.3%" and percent(1.0) == "100%"
    assert percent(0.0) == "0%" and percent(0.9996, 1) == "99.96%" and percent(0.5) == "50%"
    assert count_phrase(0, 5) == "none of the 5 seeds" and count_phrase(5, 5) == "all 5 seeds"
    assert count_phrase(2, 5, "runs") == "2 of the 5 runs"
    assert verdict("holds in part", "only at high T") == "holds in part: only at high T"
    with pytest.raises(ValueError, match="scale_word"):
        verdict("mostly", "")


def test_run_facts_and_seeds_text(monkeypatch):
    import time

    from minigpt.report import run_facts, seeds_text

    monkeypatch.setenv("MINIGPT_SEED", "7")
    assert seeds_text([7, 8, 9]) == "7, 8 and 9" and seeds_text(range(7, 37)) == "7 to 36 (30)"
    text = run_facts("small", [7, 8, 9], "cpu", time.perf_counter() - 90)
    assert "scale small" in text and "base seed 7" in text and torch.__version__ in text and "1.5 minutes" in text


def test_tally_counts_verdicts_on_the_fixed_scale():
    from minigpt.report import tally

    assert tally(["holds: a", "holds", "does not hold: b", "holds in part: c"]) == (
        "2 hold, 1 holds in part, 1 does not hold")
    assert tally(["not testable here: no data"]) == "1 not testable here"
    assert tally(["does not hold: a", "does not hold"]) == "2 do not hold"
    with pytest.raises(ValueError, match="does not start"):
        tally(["mostly true"])


def test_interval_text():
    from minigpt.experiments import MeanCI, paired_comparison
    from minigpt.report import interval_text

    ci = MeanCI(0.012, -0.003, 0.027, 5)
    assert interval_text(ci) == "+0.012 [-0.003, +0.027]"
    assert interval_text(ci, 1, scale=100, mean=False) == "-0.3 to +2.7"
    pc = paired_comparison([1.0, 2.0, 3.0], [0.5, 1.5, 2.0])
    assert interval_text(pc) == interval_text(pc.difference)


def test_signed_never_prints_a_signed_zero():
    from minigpt.report import signed

    assert signed(0.114) == "+0.11" and signed(-0.004) == "-0.004" and signed(0.0) == "+0.00"


def test_best_and_tied():
    from minigpt.experiments import best_and_tied

    results = {"a": [1.0, 1.1, 0.9, 1.0], "b": [1.2, 1.0, 1.1, 0.9], "c": [3.0, 3.1, 2.9, 3.2]}
    assert best_and_tied(results) == ("a", ["b"])  # b's interval reaches a's; c is measurably worse
    assert best_and_tied(results, higher_is_better=True) == ("c", [])
    same = {"x": [1.0, 2.0, 3.0], "y": [1.0, 2.0, 3.0 + 1e-12]}
    assert best_and_tied(same)[1] == ["y"]  # float noise is a tie
    with pytest.raises(ValueError, match="empty"):
        best_and_tied({})


def test_settling_step_is_the_last_exit_from_the_band():
    curves = torch.tensor([[4.0, 2.0, 1.05, 1.0, 1.0],  # in the 10% band from step 2 on
                           [4.0, 1.0, 1.5, 1.02, 1.0],  # touches the band at 1, leaves, back at 3
                           [1.0, 1.0, 1.0, 1.0, 1.0]])  # always in it
    assert metrics.settling_step(curves, 0.1).tolist() == [2, 3, 0]
    assert metrics.settling_step(curves, 0.01).tolist() == [3, 4, 0]
    assert metrics.settling_step(curves, 0.0).tolist() == [3, 4, 0]
    stacked = metrics.settling_step(torch.stack([curves, 2 * curves]), 0.1)  # any leading shape, scale-free
    assert stacked.shape == (2, 3) and stacked[0].tolist() == stacked[1].tolist()
    with pytest.raises(ValueError, match="rtol"):
        metrics.settling_step(curves, -0.1)
    with pytest.raises(ValueError, match="curves"):
        metrics.settling_step(torch.tensor([1.0]), 0.1)


def test_rise_ratio_counts_the_climbs_against_the_net_fall():
    assert metrics.rise_ratio(torch.tensor([[3.0, 2.0, 1.0]])).tolist() == [0.0]  # monotone
    assert metrics.rise_ratio(torch.tensor([3.0, 1.0, 2.0, 1.0])).item() == pytest.approx(0.5)  # climbs 1, falls 2 net
    wiggly = torch.tensor([[3.0, 0.5, 1.5, 1.0], [30.0, 5.0, 15.0, 10.0]])
    assert metrics.rise_ratio(wiggly).tolist() == pytest.approx([0.5, 0.5])  # scale-free
    with pytest.raises(ValueError, match="net fall"):
        metrics.rise_ratio(torch.tensor([1.0, 2.0]))
