"""Localization metrics of the GRIP protocol: F1 and IoU between a probability map and the ground
truth, per manipulated volume, then averaged; at a fixed threshold (0.5) and at the best threshold of
each volume; polarity invariant (the better of the map and its inverse). No boundary band is
excluded (TruFor's protocol erodes/dilates the mask; m3d scores every voxel)."""

from __future__ import annotations

import numpy as np

N_THRESHOLDS = 256


def _counts(probability: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """True/false positives for thresholds t_k = k / N (predicted = p >= t_k), k = 0..N."""
    bins = np.clip(np.floor(probability * N_THRESHOLDS).astype(np.int64), 0, N_THRESHOLDS)
    positives = np.bincount(bins[truth], minlength=N_THRESHOLDS + 1)
    negatives = np.bincount(bins[~truth], minlength=N_THRESHOLDS + 1)
    true_positives = np.cumsum(positives[::-1])[::-1]
    false_positives = np.cumsum(negatives[::-1])[::-1]
    return true_positives, false_positives, int(truth.sum()), int((~truth).sum())


def _f1_iou(true_positives, false_positives, n_positive: int) -> tuple[np.ndarray, np.ndarray]:
    false_negatives = n_positive - true_positives
    denominator_f1 = 2 * true_positives + false_positives + false_negatives
    denominator_iou = true_positives + false_positives + false_negatives
    f1 = np.divide(
        2 * true_positives, denominator_f1, out=np.zeros(np.shape(true_positives)), where=denominator_f1 > 0
    )
    iou = np.divide(true_positives, denominator_iou, out=np.zeros(np.shape(true_positives)), where=denominator_iou > 0)
    return f1, iou


def f1_iou(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """F1 and IoU of two boolean masks (0 when both are empty)."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    true_positives = np.logical_and(predicted, truth).sum()
    f1, iou = _f1_iou(np.array(true_positives), np.array(np.logical_and(predicted, ~truth).sum()), int(truth.sum()))
    return float(f1), float(iou)


def localization_scores(probability: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """F1 and IoU of one map against its ground truth: at ``threshold`` and at the best of 257
    thresholds, each the better of the map and its inverse."""
    probability = np.asarray(probability, dtype=np.float64)
    truth = np.asarray(truth, bool)
    if probability.shape != truth.shape:
        raise ValueError(f"map shape {probability.shape} differs from ground-truth shape {truth.shape}")
    if not truth.any():
        raise ValueError("localization is scored on manipulated volumes only: the ground truth is empty")
    scores: dict[str, float] = {}
    for name, values in (("map", probability), ("inverse", 1 - probability)):
        true_positives, false_positives, n_positive, _ = _counts(values, truth)
        f1, iou = _f1_iou(true_positives, false_positives, n_positive)
        fixed_f1, fixed_iou = f1_iou(values >= threshold, truth)
        for key, value in (("f1_best", f1.max()), ("iou_best", iou.max()), ("f1", fixed_f1), ("iou", fixed_iou)):
            scores[key] = max(scores.get(key, 0.0), float(value))
    return scores


def localization_metrics(maps, truths, threshold: float = 0.5) -> dict[str, float]:
    """Mean over manipulated volumes of `localization_scores` (keys f1, iou, f1_best, iou_best)."""
    per_volume = [localization_scores(m, t, threshold) for m, t in zip(maps, truths, strict=True)]
    if not per_volume:
        raise ValueError("no manipulated volumes to score")
    return {key: float(np.mean([scores[key] for scores in per_volume])) for key in per_volume[0]}
