"""Thin runner: ``python experiments/run.py experiments/configs/NAME.yaml [--set key=value ...]``.

The same as ``jaxprune run ...``; the logic lives in the library (``jaxprune.commands.run``).
"""

import sys

from jaxprune.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
