"""`evaluate` module for M3Dsynth detection: AUC, balanced accuracy at 0.5 and Pd@1 % of volume
scores (a thin wrapper over `m3d.metrics.detection_metrics`)."""

import datasets
import evaluate

from m3d.metrics import detection_metrics

_DESCRIPTION = "Volume-level detection of manipulated CT scans: AUC, balanced accuracy at a threshold, Pd@1%."
_KWARGS_DESCRIPTION = """
Args:
    predictions: volume scores, probabilities that the scan is manipulated (max over slices).
    references: 1 for manipulated, 0 for pristine.
    threshold: decision threshold of the balanced accuracy (default 0.5).
Returns:
    auc, balanced_accuracy, pd_at_1pct
"""
_CITATION = """@inproceedings{zingarini2024m3dsynth, title={M3Dsynth: A dataset of medical 3D images with
AI-generated local manipulations}, author={Zingarini, Giada and Cozzolino, Davide and Corvi, Riccardo and
Poggi, Giovanni and Verdoliva, Luisa}, booktitle={ICASSP}, year={2024}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class M3DDetection(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, threshold: float = 0.5) -> dict:
        return detection_metrics(references, predictions, threshold)
