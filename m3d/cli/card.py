"""`m3d card`: write the model card (README.md) of a saved pipeline, detector or CAD folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `m3d card`."""
    parser = subparsers.add_parser(
        "card", help="write the model card (README.md) of a saved pipeline, detector or CAD folder"
    )
    parser.add_argument("path", help="the saved folder")
    parser.add_argument(
        "--name", default=None, help="model name in the card and its model-index (default: the folder name)"
    )
    parser.add_argument(
        "--real-data", action="store_true", help="trained on real scans: drop the phantom-weights caveat"
    )
    parser.add_argument(
        "--results",
        default=None,
        metavar="CELL_JSON",
        help="a finished benchmark cell (RESULTS/cells/<cell>.json of m3d bench): its test metrics go in the card",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Write the card (with a benchmark cell's test metrics) and print its path."""
    import json

    from ..model_cards import benchmark_card_results, write_model_card

    results = benchmark_card_results(json.loads(Path(args.results).read_text())) if args.results else ()
    card = write_model_card(args.path, results, name=args.name, phantom_trained=not args.real_data)
    print(f"wrote {card}")
