"""m3d: AI-manipulated 3D CT scans — CT I/O, LIDC annotations, the synthetic chest CT, tampering
pipelines (diffusers), forensic detectors (transformers), the M3Dsynth dataset builder and benchmark.

Public names are importable from ``m3d`` directly; submodules are imported on first use so that
``import m3d`` stays fast. ``import m3d`` is also enough for transformers' Auto classes to know every m3d
architecture (``AutoModel.from_pretrained(<a saved detector or CAD scorer>)``): they are registered when
transformers' Auto classes are first imported (`register_auto_classes`), not before.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "CTVolume": "m3d.data.ct",
    "CTMetadata": "m3d.data.ct",
    "read_dicom_series": "m3d.data.dicom",
    "write_dicom_series": "m3d.data.dicom",
    "list_dicom_series": "m3d.data.dicom",
    "DicomSeriesError": "m3d.data.dicom",
    "read_nifti": "m3d.data.nifti",
    "write_nifti": "m3d.data.nifti",
    "write_mask_nifti": "m3d.data.nifti",
    "resample_to_spacing": "m3d.data.resample",
    "resample_to_reference": "m3d.data.resample",
    "segment_lungs": "m3d.data.lungs",
    "LIDCDatabase": "m3d.data.lidc",
    "read_lidc_xml": "m3d.data.lidc",
    "write_lidc_xml": "m3d.data.lidc",
    "group_nodules": "m3d.data.lidc",
    "make_phantom": "m3d.data.phantom",
    "generate_phantoms": "m3d.data.phantom",
    "extract_cube": "m3d.tamper.cube",
    "paste_cube": "m3d.tamper.cube",
    "TamperLocationError": "m3d.tamper.cube",
    "check_quality": "m3d.tamper.quality",
    "measure_nodule": "m3d.tamper.quality",
    "QualityCriteria": "m3d.tamper.quality",
    "M3Dsynth": "m3d.dataset_builder",
    "build_dataset": "m3d.build",
    "push_folder": "m3d.hub",
    "UNet3DModel": "m3d.models",
    "Pix2Pix3DGenerator": "m3d.models",
    "PatchDiscriminator3D": "m3d.models",
    "CycleGAN3DGenerator": "m3d.models",
    "CycleGAN3DDiscriminator": "m3d.models",
    "M3DInpaintPipeline": "m3d.pipelines",
    "Pix2Pix3DPipeline": "m3d.pipelines",
    "CycleGAN3DPipeline": "m3d.pipelines",
    "load_pipeline": "m3d.pipelines",
    "detect_volume": "m3d.detectors.volume",
    "detection_metrics": "m3d.metrics",
    "localization_metrics": "m3d.metrics",
    "CADConfig": "m3d.cad",
    "CADForMalignancyScoring": "m3d.cad",
    "load_cad": "m3d.cad",
    "run_cad_analysis": "m3d.cad.analysis",
}

__all__ = sorted(_EXPORTS)

# where AutoModel and its kin, and AutoImageProcessor, are defined: the first imported triggers the registration
_AUTO_MODULES = ("transformers.models.auto.modeling_auto", "transformers.models.auto.image_processing_auto")


def register_auto_classes() -> None:
    """Register every m3d detector (with its image processor) and the CAD scorer with transformers' Auto classes
    (importing them)."""
    importlib.import_module("m3d.detectors")
    importlib.import_module("m3d.cad")


class _RegisterWithAutoClasses:
    """Runs `register_auto_classes` right after the first of transformers' Auto modules is imported (a
    `sys.meta_path` finder: only ``find_spec`` is needed, so not `importlib.abc.MetaPathFinder`, whose module
    costs ``import m3d`` 10 ms of `importlib.resources`)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in _AUTO_MODULES:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def execute_then_register(module: Any) -> None:
            execute(module)
            register_auto_classes()

        spec.loader.exec_module = execute_then_register  # type: ignore[method-assign]
        return spec


if any(name in sys.modules for name in _AUTO_MODULES):
    register_auto_classes()
elif not any(isinstance(finder, _RegisterWithAutoClasses) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithAutoClasses())


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'm3d' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
