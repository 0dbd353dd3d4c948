#!/usr/bin/env python
"""python run.py PRESET.yaml [key=value ...]  — the same as `python -m tc_lite train PRESET.yaml ...`."""

import sys

from tc_lite.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
