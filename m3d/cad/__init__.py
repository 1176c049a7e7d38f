"""The CAD malignancy scorer (the M3Dsynth paper's diagnostic check): a 3-D CNN that scores the nodule
at a location of a scan, trained on LIDC reader ratings (`m3d.train.train_cad`), applied at every
tampered site of an M3Dsynth dataset by `m3d.cad.analysis`.

Importing this package registers the scorer with transformers' Auto classes (``model_type="m3d_cad"``).
"""

from .configuration_cad import CADConfig
from .modeling_cad import (
    IGNORE_INDEX,
    CADForMalignancyScoring,
    CADOutput,
    CADPreTrainedModel,
    malignancy_labels,
    register_cad,
)
from .scoring import CADScore, cad_cube, load_cad, score_cubes, score_locations

register_cad()

__all__ = [
    "IGNORE_INDEX",
    "CADConfig",
    "CADForMalignancyScoring",
    "CADOutput",
    "CADPreTrainedModel",
    "CADScore",
    "cad_cube",
    "load_cad",
    "malignancy_labels",
    "register_cad",
    "score_cubes",
    "score_locations",
]
