"""`evaluate` module for M3Dsynth localization: F1 and IoU of 3-D probability maps against the ground
truth masks, per manipulated volume and averaged (a thin wrapper over `m3d.metrics.localization_metrics`)."""

import datasets
import evaluate
import numpy

from m3d.metrics import localization_metrics

_DESCRIPTION = "3-D localization of manipulated CT regions: F1 and IoU at 0.5 and at the best threshold."
_KWARGS_DESCRIPTION = """
Args:
    predictions: per volume, its (z, y, x) probability map flattened (``map.ravel()``).
    references: per volume, its (z, y, x) boolean ground-truth mask (non-empty), flattened the same way.
    threshold: fixed threshold (default 0.5).
Returns:
    f1, iou (at the threshold), f1_best, iou_best (best threshold per volume); polarity invariant.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class M3DLocalization(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("bool")),
                }
            ),
        )

    def _compute(self, predictions, references, threshold: float = 0.5) -> dict:
        maps = [numpy.asarray(p, dtype=numpy.float32) for p in predictions]
        truths = [numpy.asarray(r, dtype=bool) for r in references]
        return localization_metrics(maps, truths, threshold)
