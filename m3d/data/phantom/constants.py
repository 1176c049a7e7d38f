"""The phantom's named constants: the CT value range, the nominal chest its landmarks are written for, the
ranges the patient's anatomy is drawn from (``(low, high)`` of a uniform draw unless noted) and fixed
tissue values (HU)."""

from __future__ import annotations

HU_CLIP = (-1024, 3071)  # the range a 12-bit CT stores

# -- the nominal chest ---------------------------------------------------------------------------------
# thoracic cavity half-width (X) and half-depth (Y) the anatomical landmarks are written for (mm)
NOMINAL_CAVITY_HALF_AXES_MM = (130.0, 85.0)

# -- the patient (drawn per seed) -----------------------------------------------------------------------
APEX_MARGIN_MM = (5.0, 30.0)  # scan top above the lung apex
BASE_MARGIN_MM = (15.0, 45.0)  # scan bottom below the deepest diaphragm recess
LUNG_LENGTH_MM = (150.0, 330.0)  # apex to deepest recess, clipped to this range
CAVITY_HALF_WIDTH_MM = (118.0, 142.0)
CAVITY_DEPTH_RATIO = (0.6, 0.72)  # cavity half-depth / half-width
SUBCUTANEOUS_FAT_GAMMA = (2.5, 5.0)  # shape, scale (mm) of a gamma draw ...
SUBCUTANEOUS_FAT_MM = (3.0, 30.0)  # ... clipped to this range
CAVITY_OUTLINE_WOBBLE = 0.012  # sd of the outline's Fourier amplitudes (harmonics 2..6, times 1/sqrt(k-1))
CAVITY_CENTRE_Y_MM = (-15.0, 0.0)
POSTERIOR_FAT_EXCESS = (0.0, 0.8)  # extra subcutaneous fat over the back, as a fraction
BREAST_PROBABILITY = 0.4
BREAST_MM = (0.0, 35.0)
CHEST_WALL_MUSCLE_MM = (6.0, 11.0)
RIB_THICKNESS_MM = (6.0, 8.0)  # radial
RIB_HEIGHT_MM = (9.0, 13.0)  # cranio-caudal
FIRST_RIB_S = (-0.07, -0.03)  # anatomical height of the first rib at the back
RIB_SPACING_S = (0.083, 0.092)
RIB_ANTERIOR_DROP_S = (0.4, 0.5)  # how much lower a rib runs at the front than at the back
RIB_JITTER_S = 0.006  # sd of each rib's height offset
VERTEBRA_RADIUS_MM = (15.0, 19.0)  # times sqrt(scale_x * scale_y)
DISC_FRACTION = (0.16, 0.22)  # of a vertebral level
RIGHT_DOME_TOP_S = (0.66, 0.74)  # the right hemidiaphragm stands higher (liver)
LEFT_DOME_TOP_S = (0.72, 0.8)
RIGHT_DOME_X_MM = (45.0, 65.0)  # to the right of the midline (negative X); nominal chest
LEFT_DOME_X_MM = (50.0, 70.0)
DOME_Y_OFFSET_MM = (-10.0, 10.0)
DOME_HALF_WIDTH_MM = (85.0, 100.0)  # nominal chest
DOME_HALF_DEPTH_MM = (95.0, 110.0)
APEX_HEIGHT_S = (0.09, 0.12)  # how far the apex falls off away from its top
HEART_CENTRE_X_MM = (15.0, 30.0)  # left of the midline; nominal chest
HEART_DEPTH_FRACTION = (0.26, 0.36)  # from the anterior wall (0) to the vertebral front (1)
HEART_CENTRE_S = (0.68, 0.76)
HEART_HALF_LENGTH_MM = (58.0, 70.0)  # in-plane semi-axes of the heart ellipsoid; nominal chest
HEART_HALF_WIDTH_MM = (42.0, 52.0)
HEART_HALF_HEIGHT_S = (0.16, 0.2)
HEART_AXIS_ANGLE_DEG = (30.0, 45.0)
PERICARDIAL_FAT_MM = (2.0, 7.0)
HEART_TOP_S = (0.5, 0.56)  # where the heart hangs from the great vessels
CONTRAST_PROBABILITY = 0.25
TABLE_PROBABILITY = 0.85
TABLE_GAP_MM = (3.0, 12.0)  # between the patient's back and the table
FISSURE_VISIBILITY = (0.3, 1.0)
LEFT_OBLIQUE_FISSURE_S = ((0.2, 0.3), (0.55, 0.7))  # s at the back, extra s at the front
RIGHT_OBLIQUE_FISSURE_S = ((0.28, 0.38), (0.5, 0.65))
HORIZONTAL_FISSURE_S = (0.42, 0.5)
BODY_SIZE_VARIATION = (0.0, 0.04)  # relative amplitude of the slow body-size change along z ...
BODY_SIZE_PERIOD_MM = (150.0, 300.0)  # ... and its period
STOMACH_AIR = (0.0, 1.0)  # how much gas the stomach holds

# -- tissue values (HU; drawn per patient where a range) -------------------------------------------------
LUNG_HU = (-880.0, -835.0)
LUNG_DEPENDENT_GRADIENT_HU = (30.0, 90.0)  # denser towards the back (the patient is supine)
LUNG_TEXTURE_HU = (10.0, 20.0)
FAT_HU = (-110.0, -90.0)
MUSCLE_HU = (35.0, 50.0)
LIVER_HU = (50.0, 65.0)
CONTRAST_BLOOD_HU = (150.0, 260.0)
BLOOD_HU = (35.0, 48.0)
SCANNER_NOISE_HU = (10.0, 22.0)  # noise sd
NOISE_GRAIN_MM = (0.45, 0.7)  # noise correlation length
AIR_HU = -1000.0
SKIN_HU = 30.0
GLANDULAR_HU = 25.0
FISSURE_HU = -450.0
GAS_HU = -990.0  # stomach gas
AIRWAY_LUMEN_HU = -995.0
CLAVICLE_HU = 600.0
AORTIC_CALCIFICATION_HU = (450.0, 900.0)

# -- nodules (painted from the readers' ratings) ---------------------------------------------------------
SOLID_NODULE_HU = (15.0, 55.0)
GROUND_GLASS_HU = (-680.0, -520.0)
CALCIFICATION_HU = (300.0, 800.0)
SOLID_FRACTION_BY_TEXTURE = {1: 0.0, 2: 0.3, 3: 0.55, 4: 0.8, 5: 1.0}  # LIDC texture 1 ground glass .. 5 solid
