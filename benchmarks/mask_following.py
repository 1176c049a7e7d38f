"""Do the shipped mask-conditioned injectors draw the nodule they are given, and what are they given?

    .venv/bin/python benchmarks/mask_following.py               # the three shipped injectors, 20 phantoms

Per injector: its bank of training-nodule masks (`m3d.pipelines.NoduleMaskBank`), how many of those masks reach the
faces of the 20 mm hole and along how many face voxels (a nodule cut to the hole, which a generator that follows it
draws with straight edges, lies along hundreds; one scaled to just fit the hole, `fit_mask_in_hole`, touches each face
in a patch of about 25), and,
at the held-out injection sites of `benchmarks/eval_demo_pipelines.py` given one bank mask each, the Dice of the grown
nodule (`m3d.tamper.quality.nodule_mask`, with the pristine chest wall left out as `chest_wall_check.py` does) with
that mask, at the sites at the chest wall and away from it.

Writes ``benchmarks/results/mask_following_cpu.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from chest_wall_check import INJECTORS, held_out_sites  # the scripts beside this one (their folder is on sys.path)
from eval_demo_pipelines import DEMO_DIR
from m3d.pipelines import load_pipeline
from m3d.tamper.cube import hole_mask, hu_to_unit, unit_to_hu
from m3d.tamper.nodule_shape import bank_nodule_mask
from m3d.tamper.quality import nodule_mask

ROOT = Path(__file__).resolve().parents[1]
FACE_VOXELS = 20  # a mask along this many of the hole's face voxels is cut by the hole, not touched by a vessel


def face_voxels(masks: np.ndarray) -> np.ndarray:
    """How many voxels of each ``(N, e, e, e)`` mask lie on the faces of its box."""
    box = np.ones(masks.shape[1:], bool)
    faces = box & ~ndimage.binary_erosion(box)
    return masks[:, faces].sum(1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def main(argv: list[str] | None = None) -> dict:
    held_out = held_out_sites(__doc__, ROOT / "benchmarks" / "results" / "mask_following_cpu.json", argv)
    sites, at_wall = held_out.pristine["inject"], held_out.at_wall
    report = {**held_out.report, "pipelines": {}}
    for name in INJECTORS:
        pipe = load_pipeline(DEMO_DIR / name)
        bank = pipe.nodule_mask_bank.masks
        rng = np.random.default_rng(0)
        given = np.stack([bank_nodule_mask(rng, bank) for _ in sites])
        out = pipe(
            cubes=hu_to_unit(sites)[:, None],
            nodule_masks=given,
            generator=torch.Generator().manual_seed(0),
            progress=False,
        )
        grown = np.where(hole_mask(), unit_to_hu(out.cubes[:, 0]), sites)
        scores = np.array(
            [dice(nodule_mask(cube, leave_out=wall), mask) for cube, wall, mask in zip(grown, held_out.walls, given)]
        )
        on_faces = face_voxels(bank)
        report["pipelines"][name] = {
            "bank_masks": len(bank),
            "masks_reaching_the_hole_faces": int((on_faces > 0).sum()),
            f"masks_along_{FACE_VOXELS}_or_more_face_voxels": int((on_faces >= FACE_VOXELS).sum()),
            "face_voxels_median": float(np.median(on_faces)),
            "face_voxels_max": int(on_faces.max()),
            "dice_median_at_chest_wall": round(float(np.median(scores[at_wall])), 3),
            "dice_median_away_from_chest_wall": round(float(np.median(scores[~at_wall])), 3),
        }
        print(json.dumps({name: report["pipelines"][name]}), flush=True)
    return held_out.write(report)


if __name__ == "__main__":
    main()
