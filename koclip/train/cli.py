"""`koclip train --config configs/NAME.py [--workdir DIR] [--set key=value ...]`: the one entry point
of training from a shell (`python -m koclip.train ...` runs it too)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from koclip.train.config import load_config
from koclip.train.train import PeerLostError, train_and_evaluate


def run(args) -> int:
    logging.getLogger("absl").setLevel(logging.WARNING)
    cfg = load_config(args.config, args.overrides)
    workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
    try:
        summary = train_and_evaluate(cfg, workdir)
    except PeerLostError as e:
        # Exit now: a normal exit runs JAX's shutdown, which waits at a barrier for every
        # process (the lost one never comes) until the heartbeat timeout aborts this one.
        print(f"koclip train: error: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model contrastively (koclip.train)")
    p.add_argument("--config", required=True, help="a config file with get_config(), e.g. configs/tiny.py")
    p.add_argument("--workdir", help="checkpoints, logs and the exported model (default: runs/<config name>); "
                                     "an existing one is resumed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set learning_rate=1e-4")
    p.set_defaults(func=run)
