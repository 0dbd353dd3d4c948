"""``python -m tc_lite plot RUN_DIR``: reward, reward-part, loss and held-out curves of a run as PNG files.

Works on a finished run, a crashed one, or one still training (it reads what metrics.jsonl holds so far).
"""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from tc_lite.plots import plot_run

    for path in plot_run(args.run_dir, out_dir=args.out, smoothing=args.smoothing):
        print(path)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot a run's reward and loss curves to RUN_DIR/plots/*.png",
                       description="Plot metrics.jsonl (and eval.jsonl) of a training run: reward, each reward "
                                   "part, loss/grad norm/lr, held-out evaluation. Prints the files written.")
    p.add_argument("run_dir", help="the run's output.dir (holds metrics.jsonl)")
    p.add_argument("--out", help="folder for the PNGs (default RUN_DIR/plots)")
    p.add_argument("--smoothing", type=float, default=0.9,
                   help="EMA weight in [0, 1) for the smoothed line (0 = raw values only); default 0.9")
    p.set_defaults(func=_run)
