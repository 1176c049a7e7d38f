"""The M3Dsynth dataset: the example schema, the builder (`m3d build`) and the official-release import.

The Hub-facing files (the dataset card template) live here too, in ``templates/``."""
from .builder import M3Dsynth, M3DsynthConfig
from ..constants import GENERATORS, LABELS, SPLITS, TASKS
from .features import CONFIGS, FEATURES, ScanResolver, example_mask, example_volume

__all__ = [
    "CONFIGS", "FEATURES", "GENERATORS", "LABELS", "SPLITS", "TASKS", "M3Dsynth", "M3DsynthConfig",
    "ScanResolver", "example_mask", "example_volume",
]
