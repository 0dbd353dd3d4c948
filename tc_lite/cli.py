"""Command line: `python -m tc_lite <command>`. User errors print one message and exit non-zero, no traceback.

Each command lives in its own module exposing `register(subparsers)`, which adds a parser whose `func(args) -> int`
runs it; heavy imports happen inside `func`, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .errors import UserError

# Modules that contribute sub-commands (each has `register(subparsers)`).
COMMAND_MODULES = [
    "tc_lite.cli",
    "tc_lite.commands.eval",
    "tc_lite.commands.plot",
    "tc_lite.commands.export",
    "tc_lite.commands.sample",
    "tc_lite.commands.bench",
]


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .preflight import preflight

    cfg = load_config(args.preset, args.overrides)
    preflight(cfg, source=args.preset)  # reward args, LoRA targets, prompt files, model paths: before any model loads
    from .train import run_training  # heavy (diffusers, peft): only once the config is known to be sound

    run_training(cfg)
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from .models import save_tiny_model, save_tiny_sdxl_model

    out = Path(args.out_dir)
    single = Path(args.single_file) if args.single_file else None
    save = save_tiny_sdxl_model if args.family == "sdxl" else save_tiny_model
    save(out, single_file=single)
    print(f"tiny {args.family} model saved to {out}" + (f" and {single}" if single else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a text-encoder LoRA from a preset")
    t.add_argument("preset", help="YAML preset, e.g. presets/tiny-cpu.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 train.steps=200")
    t.set_defaults(func=_train)
    m = sub.add_parser("tiny-model", help="save the tiny built-in pipeline as a diffusers folder (for tests and demos)")
    m.add_argument("out_dir")
    m.add_argument("--single-file", help="also write an A1111-style single-file .safetensors checkpoint here "
                                        "(SD1: LDM layout; SDXL: SGM layout)")
    m.add_argument("--family", choices=("sd1", "sdxl"), default="sd1",
                   help="sd1: the tiny SD1 pipeline (default); sdxl: the tiny SDXL one (two text encoders)")
    m.set_defaults(func=_tiny_model)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tc_lite", description="TextCraftor-style reward fine-tuning of the SD text encoder.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:  # ConfigError included (exit code 2)
        _report(e)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _report(error: UserError) -> None:
    """One message per run: with several processes (accelerate launch, torchrun) the others stay quiet about what
    every process says alike (a config error, a stop), and name themselves for their own errors."""
    import os

    from .errors import ConfigError
    from .interrupts import Interrupted

    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"error: {error}", file=sys.stderr)
    elif not isinstance(error, ConfigError | Interrupted):
        print(f"error (process {rank}): {error}", file=sys.stderr)
