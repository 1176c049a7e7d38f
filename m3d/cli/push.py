"""`m3d push`: upload an m3d dataset, pipeline or model folder to the Hugging Face Hub."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `m3d push`."""
    parser = subparsers.add_parser(
        "push", help="upload an m3d dataset, pipeline or model folder to the Hugging Face Hub"
    )
    parser.add_argument(
        "path", help="the folder (an m3d build, a saved pipeline or a saved model, with its README.md)"
    )
    parser.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the Hub repository (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Upload the folder and print where it went."""
    from ..hub import push_folder

    print(f"uploaded {args.path}: {push_folder(args.path, args.repo_id, private=args.private, token=args.token)}")
