"""`python -m koclip.train ARGS` runs `koclip train ARGS`."""

import sys

from koclip.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
