"""`m3d demo`: the whole mission on the synthetic default (see `m3d.demo`)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `m3d demo`."""
    parser = subparsers.add_parser(
        "demo",
        help="the whole mission on the synthetic default: dataset, benchmark, CAD, cards, report",
        description="Phantom scans -> mini M3Dsynth (shipped phantom-trained generators) -> "
        "detectors trained briefly -> "
        "benchmark tables -> CAD check -> model cards -> report.html. Resumes where it stopped; about 10 minutes "
        "on 2 CPU cores. See m3d.demo for the steps and their settings.",
    )
    parser.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the same steps, scaled up")
    parser.add_argument("--seed", type=int, default=0, help="seeds every step")
    parser.add_argument(
        "--pipelines",
        default=None,
        metavar="DIR",
        help="generator pipelines to use instead of the shipped demo ones (<generator>-<task>/ folders)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start again: delete what an earlier run wrote in --out (needed after the shipped weights or the "
        "options changed)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Run the demo and print where its report is."""
    from ..demo import run_demo

    report = run_demo(
        args.out,
        overwrite=args.overwrite,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
        pipelines_dir=args.pipelines,
    )
    print(f"[m3d demo] report: {report.resolve()}")
