"""The M3Dsynth dataset: the example schema, the builder (`m3d build`) and the official-release import.

The Hub-facing files (the dataset card template) live here too, in ``templates/``."""

from .builder import M3Dsynth, M3DsynthConfig
from ..constants import GENERATORS, LABELS, SPLITS, TASKS
from .features import CONFIGS, FEATURES, ScanResolver, example_mask, example_volume
from .torch_format import CTToTorch, collate_ct

__all__ = [
    "CONFIGS",
    "FEATURES",
    "GENERATORS",
    "LABELS",
    "SPLITS",
    "TASKS",
    "CTToTorch",
    "M3Dsynth",
    "M3DsynthConfig",
    "ScanResolver",
    "collate_ct",
    "example_mask",
    "example_volume",
]
