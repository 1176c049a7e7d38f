"""The names every part of m3d agrees on: tampering tasks, generators, example labels, dataset splits and the
attack's cube.

Plain tuples with no imports, so that any module (and the command line's ``choices``) can use them
without loading the libraries behind the rest of the package.
"""

from __future__ import annotations

TASKS = ("inject", "remove")  # grow a malignant nodule > 10 mm / replace one by a benign one < 8 mm
FAKE_GENERATORS = ("pix2pix", "cyclegan", "ddpm")  # the paper's three generators (M3Dsynth's "DM" is the DDPM)
GENERATORS = ("real", *FAKE_GENERATORS)  # "real": the pristine scan at the same site
LABELS = ("pristine", "fake")
SPLITS = ("train", "validation", "test")

CUBE_SIZE = 32  # voxels at CUBE_SPACING_MM: CT-GAN's 32 mm cube around a site
CUBE_SPACING_MM = 1.0
HOLE_SIZE = 20  # voxels: CT-GAN's centre hole, [6, 26) on each axis, the region a generator fills
# The equivalent diameter (mm) of the nodule a mask-conditioned generator is asked to draw, drawn uniformly in
# this range per site: a malignant nodule > 10 mm that fits the hole (`m3d.tamper.nodule_shape`), a benign one < 8 mm
TARGET_NODULE_DIAMETER_MM = {"inject": (12.0, 17.0), "remove": (3.0, 7.0)}
