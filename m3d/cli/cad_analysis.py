"""`m3d cad-analysis`: CAD scores at every tampered and pristine site of an M3Dsynth dataset, with histograms."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `m3d cad-analysis`."""
    parser = subparsers.add_parser(
        "cad-analysis", help="CAD scores at every tampered and pristine site of an M3Dsynth dataset, with histograms"
    )
    parser.add_argument("--model", required=True, help="a saved CAD scorer folder")
    parser.add_argument("--data", required=True, help="an M3Dsynth dataset folder (data/<generator>/<task>/*.parquet)")
    parser.add_argument(
        "--out", required=True, help="results folder; writes OUT/cad/ (cad_scores.csv/json, hist_*.png)"
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="probability from which the verdict is malignant")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Score the dataset's sites, print each group's statistics and the files written."""
    from ..cad.analysis import run_cad_analysis

    result = run_cad_analysis(args.model, args.data, args.out, threshold=args.threshold, device=args.device)
    groups = result.summary["groups"]
    for group, stats in groups.items():
        if stats["n"]:
            print(
                f"  {group:<24} n={stats['n']:<5} mean {stats['mean']:.3f}  malignant "
                f"{stats['fraction_malignant']:.1%}"
            )
    print(f"wrote {result.folder} ({', '.join(sorted(p.name for p in result.files.values()))})")
