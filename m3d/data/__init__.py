"""CT data: `CTVolume` with its geometry, DICOM and NIfTI I/O, resampling, lung masks, LIDC-IDRI
annotations and the synthetic chest CT (import the submodules: `m3d.data.dicom`, `m3d.data.lidc`, ...)."""

from .ct import CTMetadata, CTVolume

__all__ = ["CTMetadata", "CTVolume"]
