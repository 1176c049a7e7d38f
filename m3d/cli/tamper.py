"""`m3d tamper`: inject a fake nodule into, or remove one from, a scan with a saved generator pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..constants import TARGET_NODULE_DIAMETER_MM, TASKS
from .scans import (
    add_enhanced_option,
    add_location_options,
    add_scan_options,
    find_lidc_xml,
    load_scan,
    parse_location,
)

if TYPE_CHECKING:
    import numpy as np

    from ..data.ct import CTVolume


def check_sites(
    scan: Path, volume: CTVolume, task: str, locations_lps_mm: list[np.ndarray], nodules_xml: str | None
) -> None:
    """Refuse sites that break ``task``'s rule (`m3d.tamper.plan.check_site_rule`) among the nodules of the
    scan's LIDC XML: ``nodules_xml``, or the one of this series in the scan's folder or the case folder above."""
    from ..data.lidc import group_nodules, read_lidc_xml
    from ..tamper.plan import check_site_rule

    xml = Path(nodules_xml) if nodules_xml else None
    if xml is None and scan.is_dir():
        series = volume.metadata.series_instance_uid
        xml = find_lidc_xml(scan, series) or find_lidc_xml(scan.parent, series)
    if xml is None:
        raise ValueError(
            f"no LIDC annotations found for {scan}: pass --nodules XML (the series' LIDC XML) to check the site "
            f"against the {task} rule, or --ignore-site-rule"
        )
    if not xml.is_file():
        raise FileNotFoundError(f"--nodules {xml} does not exist")
    nodules = group_nodules(read_lidc_xml(xml, volume))
    for location in locations_lps_mm:
        try:
            check_site_rule(task, location, nodules)
        except ValueError as error:
            raise ValueError(f"{error} (annotations: {xml}; --ignore-site-rule forces it)") from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `m3d tamper`."""
    parser = subparsers.add_parser(
        "tamper", help="inject a fake nodule into, or remove one from, a scan with a saved generator pipeline"
    )
    parser.add_argument("--scan", required=True, help="DICOM series folder or NIfTI file")
    parser.add_argument(
        "--task",
        required=True,
        choices=TASKS,
        help="inject a fake malignant nodule at --at, or remove the nodule there",
    )
    add_location_options(parser)
    parser.add_argument("--pipeline", required=True, help="a saved m3d pipeline folder (save_pretrained)")
    parser.add_argument("--out", required=True, help="output folder: dicom/ (tampered series) + mask.nii.gz")
    parser.add_argument("--steps", type=int, default=None, help="diffusion sampling steps (DDPM pipelines)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the generation")
    parser.add_argument(
        "--nodule-diameter-mm",
        type=float,
        default=None,
        help="the size (mm) of the nodule a mask-conditioned pipeline draws at each site: the mask of its training "
        "nodules nearest that diameter (default: any of them; a folder without its bank of training masks draws a "
        f"shape of that diameter, by default in the task's range: inject {TARGET_NODULE_DIAMETER_MM['inject']}, "
        f"remove {TARGET_NODULE_DIAMETER_MM['remove']})",
    )
    parser.add_argument("--allow-outside-lung", action="store_true", help="allow a location outside the lungs")
    parser.add_argument(
        "--nodules",
        metavar="XML",
        help="the series' LIDC XML, to check each site against the task's rule (default: the LIDC XML "
        "of this series in the scan's folder or the folder above it)",
    )
    parser.add_argument(
        "--ignore-site-rule",
        action="store_true",
        help="tamper even where the rule refuses: remove needs a malignant nodule (>= 8 mm, rated "
        ">= 3) that fits the 20 mm hole; inject needs no such nodule in the hole",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier output (OUT/dicom, OUT/mask.nii.gz)"
    )
    add_enhanced_option(parser)
    add_scan_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Tamper the scan at every ``--at`` and write OUT/dicom and OUT/mask.nii.gz together."""
    import os
    import shutil

    import torch

    from ..data.dicom import check_out_dir, write_dicom_series
    from ..data.nifti import write_mask_nifti
    from ..pipelines import M3DInpaintPipeline, load_pipeline

    out = Path(args.out)
    series_dir, mask_path = out / "dicom", out / "mask.nii.gz"
    check_out_dir(series_dir, args.overwrite)  # before the generator runs
    if mask_path.exists() and not args.overwrite:
        raise FileExistsError(f"{mask_path} exists; pass --overwrite to replace it")
    volume = load_scan(Path(args.scan), args.series)
    locations = [parse_location(text, volume, args.mm) for text in args.at]
    if not args.ignore_site_rule:
        check_sites(Path(args.scan), volume, args.task, locations, args.nodules)
    pipeline = load_pipeline(args.pipeline)
    sampling = {}
    if args.steps is not None:
        if not isinstance(pipeline, M3DInpaintPipeline):
            raise ValueError(
                f"--steps sets a diffusion pipeline's sampling steps; {args.pipeline} holds a "
                f"{type(pipeline).__name__}, which has none"
            )
        sampling["num_inference_steps"] = args.steps
    if args.nodule_diameter_mm is not None:
        if not pipeline.mask_conditioned:
            raise ValueError(
                f"--nodule-diameter-mm sets the nodule a mask-conditioned pipeline draws; {args.pipeline} holds a "
                f"{type(pipeline).__name__} whose network sees no nodule mask"
            )
        sampling["nodule_diameter_mm"] = args.nodule_diameter_mm
    result = pipeline(
        volume=volume,
        locations_lps_mm=locations,
        task=args.task,
        **sampling,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="volume",
        allow_outside_lung=args.allow_outside_lung,
    )
    # both outputs are written beside their places first and moved in together: never a series without its mask
    staging = out / f".m3d-tamper.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_dicom_series(
            result.volumes[0], staging / "dicom", series_description=f"m3d {args.task}", enhanced=args.enhanced
        )
        write_mask_nifti(result.masks[0], volume, staging / "mask.nii.gz")
        if series_dir.exists():
            shutil.rmtree(series_dir)
        (staging / "dicom").replace(series_dir)
        (staging / "mask.nii.gz").replace(mask_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {series_dir} (tampered series) and {mask_path}: {int(result.masks[0].sum())} voxels changed")
