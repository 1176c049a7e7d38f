"""The M3Dsynth dataset: the example schema, the builder (`m3d build`) and the official-release import."""
from .features import FEATURES, GENERATORS, LABELS, SPLITS, TASKS, example_mask, example_volume

__all__ = ["FEATURES", "GENERATORS", "LABELS", "SPLITS", "TASKS", "example_mask", "example_volume"]
