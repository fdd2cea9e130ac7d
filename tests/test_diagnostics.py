import pytest

from minigpt.diagnostics import detect_overfitting, val_slope_rule
from minigpt.report import join_words

STEPS = list(range(0, 200, 20))


def test_overfitting_needs_both_curves():
    val = [3.0, 2.5, 2.3, 2.35, 2.4, 2.5, 2.6, 2.7, 2.8, 2.9]
    falling_train = [3.0, 2.4, 2.1, 1.9, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2]
    report = detect_overfitting(STEPS, falling_train, val)
    assert report.overfitting and report.best_step == 40
    assert report.val_rise == pytest.approx(0.6) and report.train_drop == pytest.approx(0.9)
    # the same validation rise with training rising too (a learning rate too high, say) is not overfitting
    rising_train = [3.0, 2.4, 2.1, 2.2, 2.3, 2.4, 2.5, 2.6, 2.7, 2.8]
    assert not detect_overfitting(STEPS, rising_train, val).overfitting
    # a rise within min_rise is noise
    assert not detect_overfitting(STEPS, falling_train, val, min_rise=1.0).overfitting


def test_slope_rule_reads_validation_only():
    val = [3.0, 2.5, 2.3, 2.35, 2.4, 2.5, 2.6, 2.7, 2.8, 2.9]
    assert val_slope_rule(val, window=10)
    assert not val_slope_rule(list(reversed(val)), window=10)
    assert not val_slope_rule(val[:5], window=10)  # too few points to judge


def test_bad_arguments():
    with pytest.raises(ValueError, match="equally long"):
        detect_overfitting([0, 1], [1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="min_rise"):
        detect_overfitting([0], [1.0], [1.0], min_rise=-1)
    with pytest.raises(ValueError, match="window"):
        val_slope_rule([1.0, 2.0], window=1)


def test_join_words():
    assert join_words([40, 60, 60]) == "40, 60 and 60"
    assert join_words([7]) == "7" and join_words([]) == ""


# --- convergence summaries -------------------------------------------------------------------------

import math  # noqa: E402

import numpy as np  # noqa: E402

from minigpt.diagnostics import convergence_summary, running_mean, steps_to_target  # noqa: E402


def test_running_mean_never_looks_ahead():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0], 5).tolist() == [2.0]
    with pytest.raises(ValueError, match="window"):
        running_mean([1.0], 0)


def test_steps_to_target_on_a_known_curve():
    steps = np.arange(0, 500)
    losses = np.exp(-steps / 100)  # reaches e^-1 exactly at step 100
    assert steps_to_target(steps, losses, math.exp(-1) + 1e-12) == 100
    assert steps_to_target(steps, losses, 1e-9) is None
    # one lucky batch: the raw curve "arrives" at step 3, a window of 5 does not
    noisy = np.full(50, 2.0)
    noisy[3] = 0.5
    assert steps_to_target(range(50), noisy, 1.0) == 3
    assert steps_to_target(range(50), noisy, 1.0, window=5) is None


def test_convergence_verdicts_on_curves_of_known_shape():
    rng = np.random.default_rng(0)
    steps = np.arange(1, 1001)
    noise = 0.01 * rng.standard_normal(1000)
    improving = convergence_summary(steps, 2.0 * np.exp(-steps / 2000) + noise)
    assert improving.verdict == "improving" and improving.slope < 0
    wobble = 1.5 + 0.01 * np.where(steps % 2 == 0, 1.0, -1.0)  # level, no trend
    flat = convergence_summary(steps, wobble)
    assert flat.verdict == "flat" and flat.slope_ci[0] < 0 < flat.slope_ci[1]
    assert flat.volatility == pytest.approx(0.01 / 1.5, rel=0.01)  # the wobble relative to the level
    rising = convergence_summary(steps, 1.0 + steps / 5000 + noise)
    assert rising.verdict == "rising"
    assert rising.slope == pytest.approx(1 / 5000, rel=0.2)
    assert rising.tail_steps == (801, 1000)  # the default tail: the last fifth
    assert rising.best_step < 100


def test_flat_noise_is_called_flat_95_percent_of_the_time():
    """The verdict rests on a 95% interval, so pure noise around a level reads "improving" or "rising" in
    about 5% of curves (white noise here; correlated noise would do worse, as the docstring warns)."""
    rng = np.random.default_rng(0)
    verdicts = [convergence_summary(range(200), 1.5 + 0.01 * rng.standard_normal(200)).verdict for _ in range(400)]
    false_alarms = sum(v != "flat" for v in verdicts) / len(verdicts)
    assert 0.02 < false_alarms < 0.09


def test_convergence_marks_divergence_and_reports_before_it():
    losses = [3.0, 2.5, 2.2, 2.0, 1.9, 1.85, float("nan"), float("nan")]
    s = convergence_summary(range(8), losses, target=2.1)
    assert s.verdict == "diverged" and s.nonfinite_step == 6
    assert s.best == 1.85 and s.best_step == 5 and s.steps_to_target == 3
    assert "first non-finite loss at step 6" in str(s)


def test_convergence_bad_input():
    with pytest.raises(ValueError, match="strictly increasing"):
        convergence_summary([0, 2, 1], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="equally long"):
        convergence_summary([0, 1, 2], [1.0, 1.0])
    with pytest.raises(ValueError, match="at least 3 finite"):
        convergence_summary([0, 1, 2, 3], [1.0, float("inf"), 1.0, 1.0])
    with pytest.raises(ValueError, match="window"):
        convergence_summary(range(10), np.ones(10), window=2)
