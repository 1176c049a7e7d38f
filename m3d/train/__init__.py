"""Training entry points (Accelerate): `m3d.train.train_generator` (the three tampering generators) and
the training cubes they learn from (`m3d.train.cubes`)."""
