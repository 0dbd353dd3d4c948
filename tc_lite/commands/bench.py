"""`python -m tc_lite bench memory|speed PRESET [overrides]`: how much GPU memory and time one training step takes.

`bench memory` estimates the peak GPU memory of one training step of the model the preset names from shapes alone
(`tc_lite.memory.estimate_memory`: no GPU, no download, ~10-40 s), by phase and by kind. On a CUDA machine it also
runs real steps (`--measure`, the default there) and prints `torch.cuda.max_memory_allocated` beside the estimate.

`bench speed` times, on whatever device is present: (a) the no-grad sampling phase (the one `Renderer`) beside
diffusers' `StableDiffusionPipeline` with the same model, scheduler, steps and CFG; (b) one training step (the
recipe's `TrainStep`) beside the sum of its parts measured separately; (c) a step with the prefix cache as its
latent source beside one without; (d) steps per hour.

`--model tiny|mid|sd15|sdxl` swaps the preset's model for one built in code (random weights; timing and memory
only, nothing downloaded): the built-in tiny one, a mid-size SD-shaped one (CPU timing), or the full-size SD1.5 or
SDXL base architecture with random-weight rewards of the right architectures (GPU). The code lives in `tc_lite.bench`.
"""

from __future__ import annotations

import argparse

from tc_lite.bench.memory import measure_peak, run_memory
from tc_lite.bench.speed import format_speed, interleaved, run_speed, speed_report

__all__ = ["format_speed", "interleaved", "measure_peak", "register", "speed_report"]


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="estimate GPU memory, or time the training step, of a preset")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    m = bsub.add_parser("memory", help="estimated peak GPU memory of one training step (no GPU, no download)")
    m.add_argument("preset", help="YAML preset, e.g. presets/aesthetic.yaml")
    m.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=4")
    m.add_argument("--json", action="store_true", help="print JSON instead of the table")
    m.add_argument("--exact", action="store_true", help="trace every grad step instead of extrapolating from three")
    m.add_argument("--measure", dest="measure", action="store_true", default=None,
                   help="also run real steps and print torch.cuda.max_memory_allocated (default on CUDA machines)")
    m.add_argument("--no-measure", dest="measure", action="store_false")
    m.add_argument("--model", choices=["sd15", "sdxl"], default=None,
                   help="measure on SD1.5 or SDXL base and rewards with random weights of the right architectures "
                        "(no download)")
    m.set_defaults(func=run_memory)
    s = bsub.add_parser("speed", help="time sampling and a training step against diffusers and their parts")
    s.add_argument("preset")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--model", choices=["tiny", "mid", "sd15", "sdxl"], default=None,
                   help="replace the preset's model by one built in code, random weights: tiny or mid (CPU timing), "
                        "sd15 or sdxl (full-size SD1.5 / SDXL base and rewards, GPU timing without a download)")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_speed)
