"""Detection metrics of the GRIP protocol (M3Dsynth, TruFor): AUC, balanced accuracy at a fixed
threshold, and Pd@FPR — the detection rate when the threshold gives a chosen false-alarm rate on
pristine samples, read off the ROC curve by linear interpolation."""

from __future__ import annotations

import numpy as np


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError("labels must be 0 (pristine) or 1 (manipulated)")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    if labels.min(initial=1) == labels.max(initial=0):
        raise ValueError("detection metrics need both pristine (0) and manipulated (1) samples")
    return labels.astype(bool), scores


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score threshold (descending), starting at (0, 0)."""
    positive, scores = _check(labels, scores)
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    last_of_ties = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_positives = np.cumsum(positive)[last_of_ties]
    false_positives = (last_of_ties + 1) - true_positives
    fpr = np.r_[0.0, false_positives / (~positive).sum()]
    tpr = np.r_[0.0, true_positives / positive.sum()]
    thresholds = np.r_[np.inf, scores[last_of_ties]]
    return fpr, tpr, thresholds


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def pd_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float = 0.01) -> float:
    """Probability of detection at a false-alarm rate (Pd@1 % for ``fpr=0.01``): the ROC's TPR
    linearly interpolated at that FPR; where the ROC is vertical at exactly that FPR, its top."""
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr must be in [0, 1]; got {fpr}")
    curve_fpr, curve_tpr, _ = roc_curve(labels, scores)
    at = curve_fpr == fpr
    if at.any():
        return float(curve_tpr[at].max())
    above = int(np.searchsorted(curve_fpr, fpr, side="right"))  # first point with a larger FPR
    low_fpr, high_fpr = curve_fpr[above - 1], curve_fpr[above]
    weight = (fpr - low_fpr) / (high_fpr - low_fpr)
    return float(curve_tpr[above - 1] + weight * (curve_tpr[above] - curve_tpr[above - 1]))


def balanced_accuracy(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> float:
    """Mean of the true-positive and true-negative rates with ``score > threshold`` called manipulated."""
    positive, scores = _check(labels, scores)
    predicted = scores > threshold
    return float(0.5 * (predicted[positive].mean() + (~predicted[~positive]).mean()))


def tied_pair_fraction(labels: np.ndarray, scores: np.ndarray) -> float:
    """Share of (fake, pristine) pairs whose scores are equal: the ROC AUC counts each as half right, so a
    saturated output (many scans at exactly the top score, of both classes) caps the AUC at 1 - half of it."""
    positive, scores = _check(labels, scores)
    values, index = np.unique(scores, return_inverse=True)
    fakes = np.bincount(index[positive], minlength=values.size)
    pristine = np.bincount(index[~positive], minlength=values.size)
    return float((fakes * pristine).sum() / (positive.sum() * (~positive).sum()))


def balanced_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold of probability ``scores`` with the highest balanced accuracy (``score > threshold``
    called manipulated): a cut between two consecutive distinct scores, placed at their midpoint in
    logit space (probabilities pile up near 0 and 1); of several best cuts, the middle one."""
    positive, scores = _check(labels, scores)
    distinct = np.unique(scores)
    cuts = np.r_[-np.inf, distinct]  # cut k calls manipulated every score > cuts[k]
    below = np.searchsorted(np.sort(scores[positive]), cuts, side="right")  # fakes at or under the cut
    pristine_below = np.searchsorted(np.sort(scores[~positive]), cuts, side="right")
    accuracy = 0.5 * (1 - below / positive.sum() + pristine_below / (~positive).sum())
    best = np.flatnonzero(accuracy == accuracy.max())
    k = int(best[len(best) // 2])
    if k == 0:  # every sample called manipulated: just under the lowest score
        return float(np.nextafter(distinct[0], -np.inf))
    if k == distinct.size:  # none called manipulated
        return float(distinct[-1])
    pair = distinct[k - 1 : k + 1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        middle = 1 / (1 + np.exp(-np.mean(np.log(pair) - np.log1p(-pair))))
    return float(middle) if pair[0] <= middle < pair[1] else float(pair.mean())  # saturated scores: the plain midpoint


def detection_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUC, balanced accuracy at ``threshold`` and Pd@1 % of volume scores (probabilities)."""
    return {
        "auc": roc_auc(labels, scores),
        "balanced_accuracy": balanced_accuracy(labels, scores, threshold),
        "pd_at_1pct": pd_at_fpr(labels, scores, 0.01),
    }


def auc_interval(
    labels: np.ndarray, scores: np.ndarray, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A ``level`` confidence interval of the AUC: percentiles of the AUC over ``resamples`` stratified
    bootstrap resamples (pristine and manipulated samples drawn separately, with replacement), seeded."""
    from scipy.stats import rankdata

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    positive, scores = _check(labels, scores)
    rng = np.random.default_rng(seed)
    fakes, pristine = scores[positive], scores[~positive]
    drawn = np.concatenate(
        [rng.choice(fakes, (resamples, fakes.size)), rng.choice(pristine, (resamples, pristine.size))], 1
    )
    ranks = rankdata(drawn, axis=1)  # ties share their mean rank: the Mann-Whitney form of the AUC
    n_fake, n_pristine = fakes.size, pristine.size
    aucs = (ranks[:, :n_fake].sum(1) - n_fake * (n_fake + 1) / 2) / (n_fake * n_pristine)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(aucs, [tail, 100 - tail])
    return float(low), float(high)
