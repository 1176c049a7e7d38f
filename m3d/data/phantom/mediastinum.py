"""The mediastinum as tubes: great vessels, airways, esophagus, clavicles, lymph nodes and aortic
calcifications, from landmarks written for the nominal chest (`Anatomy.point`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import Anatomy
from .tubes import Tubes

Point = tuple[float, float, float]


@dataclass
class Mediastinum:
    vessels: list[Tubes]  # blood vessels
    airways: Tubes  # outer (wall) radii; lumen = radii * lumen_ratio
    esophagus: Tubes
    bones: Tubes  # clavicles
    artery_roots: dict[str, Point]  # side -> (x, y, z)
    bronchus_roots: dict[str, Point]
    vein_roots: dict[str, list[Point]]  # side -> [(x, y, z), ...]
    left_atrium: Point
    lymph_nodes: Tubes  # small soft-tissue ovals in the mediastinal fat
    calcifications: Tubes  # specks in the aortic wall

    @property
    def all_soft(self) -> Tubes:
        return Tubes.concat(self.vessels + [self.airways, self.esophagus])


def make_mediastinum(anatomy: Anatomy, rng: np.random.Generator) -> Mediastinum:
    """The patient's mediastinal tubes; landmarks are ``at(nominal X, depth fraction, s)`` with a little
    seeded jitter."""
    at = anatomy.point

    def jitter(scale: float = 2.0) -> float:
        """Small landmark jitter (mm, or s units for heights)."""
        return rng.normal(0.0, scale)

    heart = anatomy.heart
    heart_top_s = heart.centre_s - heart.half_height_s
    aorta = Tubes.from_polyline(
        [
            at(-5 + jitter(), 0.35, heart_top_s + 0.05),
            at(-15 + jitter(), 0.38, 0.36),
            at(-12 + jitter(), 0.40, 0.27),
            at(-3, 0.50, 0.22 + jitter(0.01)),
            at(12, 0.70, 0.21 + jitter(0.01)),
            at(22 + jitter(), 0.88, 0.25),
            at(23 + jitter(), 0.93, 0.34),
            at(16 + jitter(), 0.95, 0.80),
            at(6, 0.97, 1.40),
        ],
        np.array([15, 15, 14, 13, 12.5, 12, 11.5, 11, 10.5]) * rng.uniform(0.9, 1.15),
    )
    arch_branches = Tubes.concat(
        [
            Tubes.from_polyline([at(-4, 0.45, 0.22), at(-14, 0.5, 0.08), at(-24, 0.55, -0.2)], [6, 5.5, 5]),
            Tubes.from_polyline([at(6, 0.58, 0.21), at(9, 0.6, 0.05), at(12, 0.6, -0.2)], [4, 4, 4]),
            Tubes.from_polyline(
                [at(15, 0.72, 0.21), at(28, 0.75, 0.05), at(55, 0.7, -0.08), at(80, 0.7, -0.1)], [5, 5, 5, 5]
            ),
        ]
    )
    superior_vena_cava = Tubes.from_polyline(
        [at(-32, 0.42, -0.2), at(-33 + jitter(), 0.45, 0.3), at(-28, 0.42, heart_top_s + 0.04)], [9, 10, 10]
    )
    brachiocephalic_veins = Tubes.concat(
        [
            Tubes.from_polyline(
                [at(70, 0.35, -0.02), at(40, 0.3, 0.03), at(0, 0.22, 0.12), at(-31, 0.42, 0.16)], [6, 6, 6, 6]
            ),
            Tubes.from_polyline([at(-70, 0.45, -0.1), at(-33, 0.43, 0.08)], [7, 7]),
        ]
    )
    bifurcation = at(10 + jitter(), 0.55, 0.36)
    pulmonary_trunk = Tubes.from_polyline(
        [at(14, 0.22, heart_top_s + 0.06), at(18, 0.36, 0.43), bifurcation], [13, 13, 12]
    )
    left_artery_root = at(58 + jitter(3), 0.72 + jitter(0.02), 0.35 + jitter(0.01))
    right_artery_root = at(-60 + jitter(3), 0.62 + jitter(0.02), 0.41 + jitter(0.01))
    left_pulmonary_artery = Tubes.from_polyline([bifurcation, at(35, 0.68, 0.33), left_artery_root], [11, 10, 9])
    right_pulmonary_artery = Tubes.from_polyline(
        [bifurcation, at(-10, 0.62, 0.37), at(-40, 0.64, 0.39), right_artery_root], [11, 10.5, 10, 9]
    )
    left_atrium = at(6, 0.66, heart_top_s + 0.1)
    vein_roots = {
        "right": [at(-50 + jitter(), 0.52, 0.50 + jitter(0.01)), at(-46 + jitter(), 0.74, 0.62 + jitter(0.01))],
        "left": [at(48 + jitter(), 0.60, 0.47 + jitter(0.01)), at(44 + jitter(), 0.80, 0.60 + jitter(0.01))],
    }
    pulmonary_veins = Tubes.concat(
        [Tubes.from_polyline([root, left_atrium], [6.5, 7]) for side in ("right", "left") for root in vein_roots[side]]
    )
    inferior_vena_cava = Tubes.from_polyline([at(-14, 0.55, heart.centre_s + 0.1), at(-18, 0.62, 1.5)], [11, 11])
    azygos = Tubes.from_polyline(
        [at(-12, 1.02, 1.3), at(-13, 1.0, 0.36), at(-24, 0.72, 0.31), at(-31, 0.46, 0.31)], [4, 4, 4, 4]
    )
    carina = at(-2, 0.75, 0.34 + jitter(0.01))
    right_bronchus_root = at(-42, 0.84, 0.44)
    left_bronchus_root = at(46, 0.90, 0.47)
    airways = Tubes.concat(
        [
            Tubes.from_polyline([at(-0.5, 0.74, -0.4), at(-1, 0.75, 0.1), carina], [10.5, 10.5, 10]),
            Tubes.from_polyline([carina, at(-22, 0.8, 0.39), right_bronchus_root], [8.5, 8, 7]),
            Tubes.from_polyline([carina, at(24, 0.84, 0.41), left_bronchus_root], [7.5, 7, 6.5]),
        ]
    )
    esophagus = Tubes.from_polyline(
        [at(4, 0.95, -0.4), at(8, 0.94, 0.3), at(10, 0.93, 0.8), at(30, 0.7, 1.05), at(45, 0.5, 1.2)], [8, 8, 8, 8, 8]
    )
    clavicles = Tubes.concat(
        [
            Tubes.from_polyline(
                [
                    at(side * 18, -0.25, -0.02),
                    at(side * 60, -0.2, -0.1),
                    at(side * 120, 0.05, -0.2),
                    at(side * 150, 0.3, -0.22),
                ],
                [7, 6.5, 6, 7],
            )
            for side in (-1, 1)
        ]
    )
    return Mediastinum(
        vessels=[
            aorta,
            arch_branches,
            superior_vena_cava,
            brachiocephalic_veins,
            pulmonary_trunk,
            left_pulmonary_artery,
            right_pulmonary_artery,
            pulmonary_veins,
            inferior_vena_cava,
            azygos,
        ],
        airways=airways,
        esophagus=esophagus,
        bones=clavicles,
        artery_roots={"right": right_artery_root, "left": left_artery_root},
        bronchus_roots={"right": right_bronchus_root, "left": left_bronchus_root},
        vein_roots=vein_roots,
        left_atrium=left_atrium,
        lymph_nodes=_lymph_nodes(anatomy, rng),
        calcifications=_aortic_calcifications(aorta, rng),
    )


def _lymph_nodes(anatomy: Anatomy, rng: np.random.Generator) -> Tubes:
    """A few normal-sized nodes (short axis < 10 mm) at the usual mediastinal stations."""
    stations = [
        (-14, 0.62, 0.26),
        (-12, 0.66, 0.31),
        (10, 0.62, 0.33),
        (0, 0.9, 0.39),
        (-35, 0.7, 0.40),
        (38, 0.78, 0.37),
        (-6, 0.35, 0.2),
        (6, 0.95, 0.55),
    ]
    parts = []
    for x, fraction, s in stations:
        if rng.random() < 0.55:
            centre = np.array(
                anatomy.point(x + rng.normal(0, 3), fraction + rng.normal(0, 0.03), s + rng.normal(0, 0.015))
            )
            half_axis = rng.normal(0, 1, 3)
            half_axis *= rng.uniform(1.0, 4.0) / np.linalg.norm(half_axis)
            radius = rng.uniform(2.5, 4.5)
            radii = np.array([radius])
            parts.append(Tubes(centre[None] - half_axis, centre[None] + half_axis, radii, radii.copy()))
    return Tubes.concat(parts)


def _aortic_calcifications(aorta: Tubes, rng: np.random.Generator) -> Tubes:
    """Atherosclerotic specks on the aortic wall (common in the LIDC population of smokers)."""
    if rng.random() < 0.35:
        return Tubes.concat([])
    parts = []
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(1, len(aorta)))
        start, end = aorta.p0[i], aorta.p1[i]
        axis = end - start
        direction = axis / max(np.linalg.norm(axis), 1e-6)
        across = np.cross(direction, [0.0, 0.0, 1.0] if abs(direction[2]) < 0.9 else [1.0, 0.0, 0.0])
        across /= np.linalg.norm(across)
        around = np.cross(direction, across)
        t, angle = rng.uniform(0.05, 0.95), rng.uniform(0, 2 * np.pi)
        wall_radius = aorta.r0[i] + t * (aorta.r1[i] - aorta.r0[i]) - 0.6
        centre = start + t * axis + wall_radius * (np.cos(angle) * across + np.sin(angle) * around)
        along = direction * rng.uniform(0.5, 2.5)
        radius = rng.uniform(0.7, 1.6)
        parts.append(Tubes(centre[None] - along, centre[None] + along, np.array([radius]), np.array([radius])))
    return Tubes.concat(parts)
