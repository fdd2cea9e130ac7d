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
