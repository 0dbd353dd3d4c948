"""Sub-commands that are more than a line of glue: each module exposes `register(subparsers)` (see tc_lite/cli.py)."""
