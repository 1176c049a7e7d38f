"""Train a forensic detector on M3Dsynth: ``accelerate launch train_detector.py --detector unet --data m3dsynth ...``
(the design card's entry point; the same as ``m3d train-detector`` and ``python -m m3d.train.train_detector``).
Every option: ``python train_detector.py --help``."""

import sys

from m3d.train.train_detector import main

if __name__ == "__main__":
    sys.exit(main(prog="train_detector.py"))
