"""`python -m koclip.train --config configs/NAME.py [--workdir DIR] [--set key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import sys

from koclip.errors import KoclipError
from koclip.train import cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m koclip.train", description="train a koclip model")
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return cli.run(args)
    except KoclipError as e:
        print(f"koclip train: error: {e}", file=sys.stderr)
        return 2
