import numpy as np
import pytest
from sklearn import metrics as skm

from m3d.metrics import (
    balanced_accuracy,
    balanced_threshold,
    detection_metrics,
    f1_iou,
    localization_metrics,
    localization_scores,
    pd_at_fpr,
    roc_auc,
    roc_curve,
    tied_pair_fraction,
)


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(labels * 1.2, 1.0), 1)  # rounding makes ties
    return labels, 1 / (1 + np.exp(-scores))


def test_roc_and_auc_match_scikit_learn(scored):
    labels, scores = scored
    fpr, tpr, _ = roc_curve(labels, scores)
    ref_fpr, ref_tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))


def test_tied_pair_fraction_is_what_the_auc_counts_as_half(scored):
    labels, scores = scored
    fakes, pristine = scores[labels == 1], scores[labels == 0]
    tied = tied_pair_fraction(labels, scores)
    assert tied == pytest.approx((fakes[:, None] == pristine[None, :]).mean()) and tied > 0
    assert roc_auc(labels, scores) == pytest.approx((fakes[:, None] > pristine[None, :]).mean() + tied / 2)
    saturated = np.where(scores > 0.6, 1.0, scores)  # a head that puts most fakes and some pristine at the top
    assert tied_pair_fraction(labels, saturated) > 0.1
    assert tied_pair_fraction(labels, np.arange(labels.size) / labels.size) == 0


def test_balanced_accuracy_matches_scikit_learn(scored):
    labels, scores = scored
    expected = skm.balanced_accuracy_score(labels, scores > 0.5)
    assert balanced_accuracy(labels, scores) == pytest.approx(expected)


def test_balanced_threshold_is_the_best_cut(scored):
    labels, scores = scored
    threshold = balanced_threshold(labels, scores)
    every_cut = [balanced_accuracy(labels, scores, t) for t in np.r_[-1.0, np.unique(scores)]]
    assert balanced_accuracy(labels, scores, threshold) == pytest.approx(max(every_cut))
    assert threshold not in set(scores)  # between two scores, not on one
    # separable probabilities: the cut sits between the classes, at their midpoint in logit space
    assert balanced_threshold([0, 0, 1, 1], [0.5, 0.8, 0.95, 0.99]) == pytest.approx(
        1 / (1 + np.exp(-(np.log(4) + np.log(19)) / 2))
    )
    assert balanced_threshold([0, 1], [1.0, 1.0]) == 1.0  # no cut helps: nothing called manipulated
    assert balanced_threshold([0, 1], [0.0, 1.0]) == 0.5  # saturated: the plain midpoint


def test_pd_at_1pct_by_hand():
    # 200 pristine: scores 0..199; one false alarm in 100 allowed -> threshold between 197 and 198.
    pristine = np.arange(200.0)
    fake = np.array([50.0, 150.0, 198.5, 300.0])
    labels = np.r_[np.zeros(200), np.ones(4)]
    scores = np.r_[pristine, fake]
    # ROC points: (0, 0.25) at 300, (0.005, 0.25) at 199, (0.005, 0.5) at 198.5, (0.01, 0.5) at 198.
    assert pd_at_fpr(labels, scores, 0.01) == pytest.approx(0.5)
    assert pd_at_fpr(labels, scores, 0.0) == pytest.approx(0.25)
    assert pd_at_fpr(labels, scores, 0.005) == pytest.approx(0.5)  # top of a vertical step
    assert pd_at_fpr(labels, scores, 0.0025) == pytest.approx(0.25)
    # (0.245, 0.5) at 151, then the tie at 150 (one pristine, one fake) gives (0.25, 0.75).
    assert pd_at_fpr(labels, scores, 0.2475) == pytest.approx(0.625)


def test_detection_metrics_perfect_and_errors():
    result = detection_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert result == {"auc": 1.0, "balanced_accuracy": 1.0, "pd_at_1pct": 1.0}
    with pytest.raises(ValueError, match="both"):
        detection_metrics([1, 1], [0.3, 0.4])
    with pytest.raises(ValueError, match="labels"):
        detection_metrics([0, 2], [0.3, 0.4])


def test_f1_iou_by_hand():
    truth = np.zeros((4, 4, 4), bool)
    truth[:2] = True  # 32 voxels
    predicted = np.zeros_like(truth)
    predicted[1:3] = True  # 16 true positives, 16 false positives, 16 false negatives
    f1, iou = f1_iou(predicted, truth)
    assert f1 == pytest.approx(0.5) and iou == pytest.approx(1 / 3)


def test_localization_best_threshold_and_polarity():
    truth = np.zeros((6, 8, 8), bool)
    truth[2:4, 2:6, 2:6] = True
    probability = np.where(truth, 0.3, 0.1)  # below 0.5 everywhere: fixed threshold finds nothing
    scores = localization_scores(probability, truth)
    assert scores["f1"] == pytest.approx(f1_iou(np.ones_like(truth), truth)[0])  # the inverse map at 0.5
    assert scores["f1_best"] == pytest.approx(1.0) and scores["iou_best"] == pytest.approx(1.0)
    inverted = localization_scores(1 - probability, truth)
    assert inverted["f1_best"] == pytest.approx(1.0)
    mean = localization_metrics([probability, np.where(truth, 0.9, 0.0)], [truth, truth])
    assert mean["f1_best"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="empty"):
        localization_scores(probability, np.zeros_like(truth))
