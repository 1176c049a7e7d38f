"""The evaluation protocol of the M3Dsynth benchmark, shared by training validation and `m3d bench`.

Each test sample is a fixed crop of a scan around its site (``test_crop_center_zyx``; the pristine scan
of the same site gives the real sample) or the whole scan (``crop_size=None``). The detector runs over
every axial slice of the crop: the volume score is the maximum of the slice probabilities, the 3-D map
the stack of slice maps. Detection (`m3d.metrics.detection_metrics`): AUC with its 95 % interval
(stratified bootstrap, `m3d.metrics.auc_interval`), balanced accuracy at 0.5, Pd@1 % (ROC interpolated
at 1 % FPR). Localization (`m3d.metrics.localization_scores`), per fake sample
then averaged: F1 / IoU of the map binarised at 0.5 and at each sample's best threshold. Metrics are
given for every test generator (its fakes against all pristine samples) and task, and for all together.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from m3d.constants import GENERATORS, TASKS
from m3d.detectors.volume import slices_to_input
from m3d.metrics import auc_interval, detection_metrics, localization_scores

from .detector_data import DEFAULT_CROP_SIZE, Crop, CropCache, CropSize, evaluation_crops

DETECTION_KEYS = ("auc", "auc_low", "auc_high", "balanced_accuracy", "pd_at_1pct")  # auc_low/high: its 95 % interval
LOCALIZATION_KEYS = ("f1", "iou", "f1_best", "iou_best")
ALL = "all"


@torch.no_grad()
def predict_crop(model: torch.nn.Module, crop: Crop, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
    """Slice probabilities ``(z,)`` and probability map ``(z, y, x)`` (None if the model does not
    localize) of one crop, over its unpadded extent."""
    parameter = next(model.parameters())
    depth = crop.valid[0]
    scores = np.empty(depth, np.float32)
    maps: np.ndarray | None = None
    for start in range(0, depth, batch_size):
        indices = np.arange(start, min(start + batch_size, depth))
        pixel_values = slices_to_input(crop.hu, indices, model.config, crop.statistics)
        output = model(pixel_values=pixel_values.to(parameter.device, parameter.dtype))
        scores[indices] = torch.sigmoid(output.logits.float()).view(-1).cpu().numpy()
        if output.localization_logits is not None:
            if maps is None:
                maps = np.zeros(crop.valid, np.float32)
            probability = torch.sigmoid(output.localization_logits.float())[:, 0].cpu().numpy()
            maps[indices] = probability[:, : crop.valid[1], : crop.valid[2]]
    return scores, maps


def predict_samples(
    model: torch.nn.Module,
    crops: CropCache | Sequence[Crop],
    indices: Iterable[int] | None = None,
    *,
    batch_size: int = 16,
    threshold: float = 0.5,
    keep_maps: int = 0,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-sample records (metadata, ``score``, and for fakes of a localizing model ``f1``, ``iou``,
    ``f1_best``, ``iou_best``) and up to ``keep_maps`` fake examples with their crop, mask and map."""
    was_training = model.training
    model.eval()
    records, examples = [], []
    indices = list(range(len(crops))) if indices is None else list(indices)
    try:
        for index in tqdm(indices, desc="evaluating", unit="scan", disable=not progress):
            crop = crops[index]
            slice_scores, maps = predict_crop(model, crop, batch_size)
            record = dict(crop.info, score=float(slice_scores.max()))
            truth = crop.mask[: crop.valid[0], : crop.valid[1], : crop.valid[2]]
            if maps is not None and record["label"] == "fake" and truth.any():
                record.update(localization_scores(maps, truth, threshold))
                if len(examples) < keep_maps:
                    examples.append(
                        {
                            "info": record,
                            "hu": crop.hu[: crop.valid[0], : crop.valid[1], : crop.valid[2]],
                            "mask": truth,
                            "map": maps,
                        }
                    )
            records.append(record)
    finally:
        model.train(was_training)
    return records, examples


def _metrics_of(records: list[dict[str, Any]], threshold: float) -> dict[str, float | int | None]:
    labels = np.array([r["label"] == "fake" for r in records], dtype=int)
    scores = np.array([r["score"] for r in records], dtype=np.float64)
    result: dict[str, float | int | None] = {"n_fake": int(labels.sum()), "n_pristine": int((1 - labels).sum())}
    both = 0 < labels.sum() < len(labels)
    result.update(dict.fromkeys(DETECTION_KEYS))
    if both:
        result.update(detection_metrics(labels, scores, threshold))
        result["auc_low"], result["auc_high"] = auc_interval(labels, scores)
    localized = [r for r in records if "f1" in r]
    for key in LOCALIZATION_KEYS:
        result[key] = float(np.mean([r[key] for r in localized])) if localized else None
    return result


def summarize(records: list[dict[str, Any]], threshold: float = 0.5) -> dict[str, dict[str, dict]]:
    """``metrics[test_generator][task]`` for ``"all"`` and each generator / task present; a generator's
    set is its fakes plus every pristine sample (of that task). Undefined metrics are None."""
    generators = [g for g in GENERATORS if any(r["label"] == "fake" and r["generator"] == g for r in records)]
    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    summary: dict[str, dict[str, dict]] = {}
    for generator in [ALL, *generators]:
        summary[generator] = {}
        for task in [ALL, *(tasks if len(tasks) > 1 else [])]:
            chosen = [
                r
                for r in records
                if (task == ALL or r["task"] == task)
                and (generator == ALL or r["label"] == "pristine" or r["generator"] == generator)
            ]
            summary[generator][task] = _metrics_of(chosen, threshold)
    return summary


def evaluate_detector(
    model: torch.nn.Module,
    dataset,
    crop_size: CropSize = DEFAULT_CROP_SIZE,
    *,
    batch_size: int = 16,
    threshold: float = 0.5,
    keep_maps: int = 0,
    max_cache_bytes: int = 4 << 30,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on an M3Dsynth split (a `datasets.Dataset`, or a `CropCache` of its test
    crops to reuse decoded scans) with the protocol of this module.

    Returns ``{"samples": [per-sample records], "metrics": summarize(...), "examples": [kept maps],
    "crop_size": [z, y, x] | "full", "threshold": threshold}``.
    """
    crops = (
        dataset
        if isinstance(dataset, CropCache)
        else evaluation_crops(dataset, crop_size, model.config, max_cache_bytes)
    )
    crop_size = crops.crop_size
    records, examples = predict_samples(
        model, crops, batch_size=batch_size, threshold=threshold, keep_maps=keep_maps, progress=progress
    )
    return {
        "samples": records,
        "metrics": summarize(records, threshold),
        "examples": examples,
        "crop_size": list(crop_size) if crop_size is not None else "full",
        "threshold": threshold,
    }


def _sample_key(record: dict[str, Any]) -> tuple:
    return record["img_id"], record["site_id"], record["label"], record["generator"], record["task"]


def cross_generator_summary(
    cells: Sequence[dict[str, Any]],
    reference: str | None = None,
    level: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per detector, the mean AUC and best-threshold F1 of its cross-generator cells on their training
    generator (``same``: train = test) and on the others (``other``), each with a ``level`` interval,
    and with ``reference`` (a detector name) its paired differences from the reference detector.

    The cells must have been tested on the same samples (`m3d bench`'s per-sample records). Intervals:
    stratified bootstrap over the test samples (each generator's fakes and the pristine crops drawn
    with replacement, seeded), the same draws for every cell, so a difference's interval is paired.
    Returns ``{detector: {"same": {"auc": [value, low, high], "f1_best": [...]}, "other": {...},
    "minus_reference": {"same": {...}, "other": {...}}}}`` (F1 None for detectors that do not localize).
    """
    from scipy.stats import rankdata

    keys = sorted({_sample_key(r) for cell in cells for r in cell["samples"]}, key=str)
    position = {key: i for i, key in enumerate(keys)}
    strata = {"pristine": [i for i, k in enumerate(keys) if k[2] == "pristine"]}
    for generator in sorted({k[3] for k in keys if k[2] == "fake"}):
        strata[generator] = [i for i, k in enumerate(keys) if k[2] == "fake" and k[3] == generator]
    rng = np.random.default_rng(seed)
    draws = {
        name: np.concatenate([np.arange(len(members))[None], rng.integers(0, len(members), (resamples, len(members)))])
        for name, members in strata.items()
    }  # row 0: the samples themselves (the point estimate)

    def cell_values(cell: dict[str, Any], generator: str) -> tuple[np.ndarray, np.ndarray | None]:
        """AUC and mean F1 (best threshold) of one cell on one test generator, for every draw."""
        scores, f1 = np.full(len(keys), np.nan), np.full(len(keys), np.nan)
        for record in cell["samples"]:
            scores[position[_sample_key(record)]] = record["score"]
            f1[position[_sample_key(record)]] = record.get("f1_best", np.nan)
        fakes = np.asarray(strata[generator])[draws[generator]]
        pristine = np.asarray(strata["pristine"])[draws["pristine"]]
        ranks = rankdata(np.concatenate([scores[fakes], scores[pristine]], 1), axis=1)
        n_fake, n_pristine = fakes.shape[1], pristine.shape[1]
        auc = (ranks[:, :n_fake].sum(1) - n_fake * (n_fake + 1) / 2) / (n_fake * n_pristine)
        return auc, (np.nanmean(f1[fakes], 1) if cell.get("localizes") and np.isfinite(f1[fakes]).any() else None)

    per_detector: dict[str, dict[str, dict[str, np.ndarray | None]]] = {}
    for detector in dict.fromkeys(c["detector"] for c in cells):
        groups: dict[str, dict[str, list]] = {"same": {"auc": [], "f1_best": []}, "other": {"auc": [], "f1_best": []}}
        for cell in (c for c in cells if c["detector"] == detector):
            for generator in strata:
                if generator != "pristine" and generator in cell["metrics"]:
                    auc, f1 = cell_values(cell, generator)
                    group = groups["same" if generator == cell["train_data"] else "other"]
                    group["auc"].append(auc)
                    group["f1_best"].append(f1)
        per_detector[detector] = {
            name: {
                metric: (np.mean(values, 0) if values and all(v is not None for v in values) else None)
                for metric, values in group.items()
            }
            for name, group in groups.items()
        }
    tail = (1 - level) / 2 * 100

    def interval(values: np.ndarray | None) -> list[float] | None:
        if values is None:
            return None
        low, high = np.percentile(values[1:], [tail, 100 - tail])
        return [float(values[0]), float(low), float(high)]

    summary: dict[str, dict[str, Any]] = {}
    for detector, groups in per_detector.items():
        summary[detector] = {
            name: {metric: interval(v) for metric, v in group.items()} for name, group in groups.items()
        }
        if reference in per_detector and detector != reference:
            summary[detector]["minus_reference"] = {
                name: {
                    metric: (
                        interval(v - per_detector[reference][name][metric])
                        if v is not None and per_detector[reference][name][metric] is not None
                        else None
                    )
                    for metric, v in group.items()
                }
                for name, group in groups.items()
            }
    return summary
