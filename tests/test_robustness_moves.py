"""The counter-moves of benchmarks/robustness.py do what they say, on synthetic crops."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from m3d.train.detector_data import Crop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
robustness = importlib.import_module("robustness")


def crop(fake: bool) -> Crop:
    rng = np.random.default_rng(1)
    hu = np.rint(rng.normal(-850, 25, (12, 32, 32))).astype(np.int16)
    mask = np.zeros(hu.shape, bool)
    if fake:
        mask[4:8, 10:20, 12:22] = True
    return Crop(hu, mask, hu.shape, None, {"site_in_crop_zyx": [6, 15, 17]})


def test_noise_level_is_recovered_from_the_laplacian():
    noise = np.random.default_rng(0).normal(0, 30, (4, 64, 64))
    assert robustness.noise_std_hu(noise - 700) == pytest.approx(30, rel=0.05)


def test_local_moves_change_only_the_fakes_tampered_box():
    original = crop(True)
    box = robustness.tampered_box(original)
    assert [s.stop - s.start for s in box] == [4, 10, 10]
    for move in robustness.LOCAL_MOVES:
        moved = robustness.counter_move(original, move, np.random.default_rng(0), 16, 1.5)
        changed = moved.hu != original.hu
        inside = np.zeros(changed.shape, bool)
        inside[box] = True
        assert changed[inside].mean() > 0.5 and not changed[~inside].any(), move
        pristine = crop(False)
        assert robustness.counter_move(pristine, move, np.random.default_rng(0), 16, 1.5) is pristine
    blurred = robustness.counter_move(original, "blur", np.random.default_rng(0), 16, 1.5)
    assert blurred.hu[box].std() < 0.5 * original.hu[box].std()


def test_requantize_and_reslice():
    original = crop(True)
    coarse = robustness.counter_move(crop(False), "requantize", np.random.default_rng(0), 16, 1.5)  # pristine too
    assert not (coarse.hu % 16).any()
    coarse = robustness.counter_move(original, "requantize", np.random.default_rng(0), 16, 1.5)
    assert not (coarse.hu % 16).any() and np.abs(coarse.hu.astype(int) - original.hu).max() <= 8
    thick = robustness.counter_move(original, "reslice", np.random.default_rng(0), 16, 1.5)
    assert thick.valid == (8, 32, 32) and thick.hu.shape == (8, 32, 32) and thick.mask.shape == (8, 32, 32)
    np.testing.assert_array_equal(thick.hu[0], original.hu[0])  # slice 0 is kept; slice 1 sits at 1.5 old slices
    np.testing.assert_array_equal(
        thick.hu[1], np.rint((original.hu[1].astype(float) + original.hu[2]) / 2).astype(np.int16)
    )
    assert thick.mask.any() and thick.mask.sum() < original.mask.sum()
