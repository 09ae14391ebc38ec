"""The `attnserve` command: serve, translate, caption, batch, models, train, export, eval, bench.

Training and export import torch lazily, so the serving commands work without it.
"""

from __future__ import annotations

import argparse
import logging
import sys

from attnserve.cli import bench, model_commands, serving, tools


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="attnserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (serving, model_commands, bench, tools):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `attnserve` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
