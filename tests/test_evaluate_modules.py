from pathlib import Path

import evaluate
import numpy as np
import pytest

import m3d.metrics
from m3d.metrics import detection_metrics, localization_metrics

MODULES = Path(m3d.metrics.__file__).parent / "evaluate_modules"


def test_detection_module_loads_offline_and_matches_library():
    metric = evaluate.load(str(MODULES / "m3d_detection"))
    labels, scores = [0, 0, 0, 1, 1, 1], [0.1, 0.6, 0.3, 0.7, 0.4, 0.9]
    result = metric.compute(predictions=scores, references=labels)
    assert result == pytest.approx(detection_metrics(labels, scores))


def test_localization_module_loads_offline_and_matches_library():
    metric = evaluate.load(str(MODULES / "m3d_localization"))
    rng = np.random.default_rng(0)
    truths = [np.zeros((3, 8, 8), bool) for _ in range(2)]
    truths[0][1, 2:5, 2:5] = True
    truths[1][0:2, 4:8, 1:3] = True
    maps = [np.clip(t + rng.normal(0, 0.3, t.shape), 0, 1).astype(np.float32) for t in truths]
    result = metric.compute(predictions=[m.ravel() for m in maps], references=[t.ravel() for t in truths])
    assert result == pytest.approx(localization_metrics(maps, truths))
