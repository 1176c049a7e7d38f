"""`m3d detect`: run a saved detector over a scan: volume score and 3-D localization map."""

from __future__ import annotations

import argparse
from pathlib import Path

from .scans import add_scan_options, load_scan


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `m3d detect`."""
    parser = subparsers.add_parser("detect", help="run a saved detector over a scan: volume score and 3-D map")
    parser.add_argument("--model", required=True, help="a saved detector folder (save_pretrained)")
    parser.add_argument("--scan", required=True, help="DICOM series folder or NIfTI file")
    parser.add_argument("--out", default=None, help="write the localization map as NIfTI (.nii.gz)")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="decision threshold on the volume score (default: the model's volume_threshold, calibrated "
        "by m3d train-detector on crops of its training crop size; a whole scan's max over more slices runs higher)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--bf16", action="store_true", help="run in bfloat16")
    add_scan_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Print the scan's score and verdict; write the map with ``--out``."""
    import torch

    from ..detectors import detect_volume, load_detector

    model = load_detector(args.model).to(args.device)
    if args.bf16:
        model = model.to(torch.bfloat16)
    volume = load_scan(Path(args.scan), args.series)
    result = detect_volume(model, volume, batch_size=args.batch_size, progress=True)
    top = int(result.slice_scores.argmax())
    threshold = model.config.volume_threshold if args.threshold is None else args.threshold
    print(
        f"score {result.score:.4f}  (max over {volume.shape[0]} slices, at slice {top})  -> "
        f"{'MANIPULATED' if result.score > threshold else 'pristine'} at threshold {threshold:.4g}"
    )
    if args.out:
        if result.localization is None:
            raise ValueError(f"{type(model).__name__} does not localize: it has no map to write")
        from ..data.nifti import write_map_nifti

        write_map_nifti(result.localization, volume, args.out)
        print(f"wrote {args.out}")
