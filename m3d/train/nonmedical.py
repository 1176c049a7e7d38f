"""The non-medical side of the preliminary experiment: real/fake pictures for a general-purpose detector.

Users pass any ``imagefolder`` (``real/`` and ``fake/`` class folders). Offline, `make_standin_images`
writes an honest small stand-in instead — it is NOT a real-photo data set: "real" images are procedural
natural-ish textures (1/f colour noise with soft blobs and edges), "fake" ones are real-like images
whose random rectangle was repainted by an untrained up-sampling generator (nearest x2 + 3x3 conv
stages, the periodic up-sampling trace of GAN decoders). Every output that uses it says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

STANDIN_NOTE = (
    "non-medical side = m3d's procedural STAND-IN (1/f colour textures; fakes repainted by an untrained "
    "up-sampling generator), not real photographs; pass --nonmedical DIR for a real imagefolder"
)
STANDIN_README = f"""# Non-medical real/fake images: procedural stand-in

Made by `m3d.train.nonmedical.make_standin_images` because no real image folder was given.
{STANDIN_NOTE}.
Layout: `real/*.png`, `fake/*.png` (a `datasets` imagefolder).
"""


def _upsample(array: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a ``(h, w, c)`` array to ``(size, size, c)``."""
    h, w = array.shape[:2]
    ys, xs = np.linspace(0, h - 1, size), np.linspace(0, w - 1, size)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = array[y0][:, x0] * (1 - fx) + array[y0][:, x1] * fx
    bottom = array[y1][:, x0] * (1 - fx) + array[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def natural_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``(size, size, 3)`` float image in [0, 1]: octaves of colour noise (1/f) plus soft blobs."""
    image = np.zeros((size, size, 3))
    octave = 4
    while octave <= size:
        image += _upsample(rng.normal(size=(octave, octave, 3)), size) * (octave**-0.8)
        octave *= 2
    y, x = np.mgrid[:size, :size] / size
    for _ in range(int(rng.integers(2, 5))):
        cy, cx, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.3)
        blob = 1 / (1 + np.exp((np.hypot(y - cy, x - cx) - radius) * 40))
        image += blob[..., None] * rng.normal(0, 0.6, 3)
    image = image @ rng.normal(0, 1, (3, 3)) * 0.5 + image  # correlated colour channels
    low, high = np.percentile(image, (1, 99))
    return np.clip((image - low) / (high - low), 0, 1)


def generated_patch(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An untrained up-sampling generator's ``(height, width, 3)`` output in [0, 1]."""
    stages = 3
    x = rng.normal(size=(-(-height // 2**stages), -(-width // 2**stages), 8))
    for _ in range(stages):
        x = x.repeat(2, axis=0).repeat(2, axis=1)  # nearest-neighbour up-sampling
        kernel = rng.normal(0, 1 / np.sqrt(9 * x.shape[2]), (3, 3, x.shape[2], 8))
        padded = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
        x = sum(padded[i : i + x.shape[0], j : j + x.shape[1]] @ kernel[i, j] for i in range(3) for j in range(3))
        x = np.where(x > 0, x, 0.2 * x)
    rgb = np.tanh(x[:height, :width, :3] / (x.std() + 1e-6))
    return (rgb + 1) / 2


def make_standin_images(out: str | Path, n_per_class: int = 64, size: int = 64, seed: int = 0) -> Path:
    """Write the stand-in imagefolder (``out/real``, ``out/fake``, README.md); returns ``out``.
    Skips the work when ``out`` already holds a complete one."""
    from PIL import Image

    out = Path(out)
    if (out / "README.md").is_file():
        return out
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    rng = np.random.default_rng([seed, 0x0A7])
    for label in ("real", "fake"):
        (tmp / label).mkdir(parents=True, exist_ok=True)
        for number in range(n_per_class):
            image = natural_texture(rng, size)
            if label == "fake":
                height, width = (int(rng.integers(size // 4, size // 2 + 1)) for _ in range(2))
                top, left = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
                patch = generated_patch(rng, height, width)
                region = image[top : top + height, left : left + width]  # matched to the region's mean and contrast
                region[:] = (patch - patch.mean()) * region.std() / (patch.std() + 1e-6) + region.mean()
            Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(
                tmp / label / f"{label}_{number:04d}.png"
            )
    (tmp / "README.md").write_text(STANDIN_README)
    os.replace(tmp, out)
    return out
