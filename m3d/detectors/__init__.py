"""Forensic detectors as transformers models, one folder each (``configuration_*`` + ``modeling_*``).

Importing this package registers every detector with transformers' Auto classes, so a saved detector
loads with ``AutoModel.from_pretrained(path)``. All share `M3DDetectorConfig` (with the CT slice
transform), `DetectorOutput` and `detect_volume` (slice-wise inference into a 3-D map; Slab3D, m3d's own,
reads a slab of slices around each one).
"""

from .hpfcn import HPFCNConfig, HPFCNForForgeryDetection
from .image_processing_m3d import M3DCTImageProcessor, register_image_processors
from .mantranet import ManTraNetConfig, ManTraNetForForgeryDetection
from .modeling_utils import (
    BayarConv2d,
    BayarConv3d,
    DetectorOutput,
    M3DDetectorConfig,
    M3DDetectorPreTrainedModel,
    apply_bayar_constraint,
    load_detector,
    register_bayar_constraint,
    register_detector,
)
from .mvssnet import MVSSNetConfig, MVSSNetForForgeryDetection
from .resnet_gp import ResNetGPConfig, ResNetGPForForgeryDetection
from .slab3d import Slab3DConfig, Slab3DForForgeryDetection
from .trufor import TruForConfig, TruForForForgeryDetection
from .unet import UNetConfig, UNetForForgeryDetection
from .volume import VolumeDetection, detect_volume
from .xception import XceptionConfig, XceptionForForgeryDetection

# name used on the command line and in benchmark tables -> (config class, model class)
DETECTORS = {
    "xception": (XceptionConfig, XceptionForForgeryDetection),
    "unet": (UNetConfig, UNetForForgeryDetection),
    "hpfcn": (HPFCNConfig, HPFCNForForgeryDetection),
    "mantranet": (ManTraNetConfig, ManTraNetForForgeryDetection),
    "mvssnet": (MVSSNetConfig, MVSSNetForForgeryDetection),
    "trufor": (TruForConfig, TruForForForgeryDetection),
    "slab3d": (Slab3DConfig, Slab3DForForgeryDetection),  # m3d's own volumetric detector
    "resnet_gp": (ResNetGPConfig, ResNetGPForForgeryDetection),
}
for _config_class, _model_class in DETECTORS.values():
    register_detector(_config_class, _model_class)
register_image_processors()

__all__ = [
    "DETECTORS",
    "load_detector",
    "BayarConv2d",
    "BayarConv3d",
    "DetectorOutput",
    "HPFCNConfig",
    "HPFCNForForgeryDetection",
    "M3DCTImageProcessor",
    "M3DDetectorConfig",
    "M3DDetectorPreTrainedModel",
    "MVSSNetConfig",
    "MVSSNetForForgeryDetection",
    "ManTraNetConfig",
    "ManTraNetForForgeryDetection",
    "ResNetGPConfig",
    "ResNetGPForForgeryDetection",
    "Slab3DConfig",
    "Slab3DForForgeryDetection",
    "TruForConfig",
    "TruForForForgeryDetection",
    "UNetConfig",
    "UNetForForgeryDetection",
    "VolumeDetection",
    "XceptionConfig",
    "XceptionForForgeryDetection",
    "apply_bayar_constraint",
    "detect_volume",
    "register_bayar_constraint",
]
