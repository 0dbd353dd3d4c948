"""``python -m tc_lite eval``: base model vs LoRAs on the same prompts and seeds, every reward, one report.

Two ways to say what to compare:

    python -m tc_lite eval --model stable-diffusion-v1-5/stable-diffusion-v1-5 --lora a.safetensors --lora b.safetensors \\
        --prompts PartiPrompts.tsv --rewards aesthetic,clip,pickscore,hpsv2 --seeds 4 --out outputs/eval
    python -m tc_lite eval --run outputs/aesthetic          # the run's model, LoRA, sampling settings and rewards

The logic lives in ``tc_lite.evaluate``; this module only maps arguments onto its ``EvalSettings`` fields (heavy
imports inside ``_run``).
"""

from __future__ import annotations

import argparse
from typing import Any


def _run(args: argparse.Namespace) -> int:
    from tc_lite.errors import UserError
    from tc_lite.evaluate import EvalSettings, evaluate, evaluate_run

    options: dict[str, Any] = {
        "seeds": args.seeds,
        "num_prompts": args.num_prompts,
        "column": args.column,
        "reward_args": args.reward_arg,
        "lora_weight": args.weight,
        "tuned_steps": args.tuned_steps,
        "device": args.device,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "grid_prompts": args.grid_prompts,
        "save_images": args.save_images,
        "progress": not args.no_progress,
        "names": args.names,
    }
    optional = {"prompts": args.prompts, "rewards": args.rewards, "out_dir": args.out, "steps": args.steps,
                "guidance": args.guidance, "scheduler": args.scheduler, "height": args.height, "width": args.width,
                "negative_prompt": args.negative_prompt}
    options.update({k: v for k, v in optional.items() if v is not None})
    if args.run is not None:
        if args.model is not None:
            options["model"] = args.model
        evaluate_run(args.run, loras=args.lora or None, **options)
        return 0
    if args.model is None:
        raise UserError("eval: give --model SRC (hub id, diffusers folder, .safetensors checkpoint or 'tiny') "
                        "or --run RUN_DIR (a finished training run)")
    if args.rewards is None:
        raise UserError("eval: --rewards is required with --model, e.g. --rewards aesthetic,clip,pickscore,hpsv2")
    evaluate(args.model, args.lora or [], EvalSettings(**options))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="compare the base model with LoRAs on held-out prompts; writes report.md and report.html",
        description="Generate with the base model and each LoRA on the same prompts and seeds, score every image "
                    "with every reward, and write report.md, a self-contained report.html, summary.json and "
                    "scores.jsonl: mean ± standard error per reward per model, the paired win rate against the "
                    "base model, a diversity measure that flags collapse, and side-by-side grids.")
    src = p.add_argument_group("what to compare")
    src.add_argument("--model", help="base model: hub id, diffusers folder, single-file .safetensors, or 'tiny'")
    src.add_argument("--lora", action="append", metavar="FILE",
                     help="a LoRA (kohya/diffusers/peft) or full-encoder .safetensors; repeat for several")
    src.add_argument("--run", metavar="RUN_DIR",
                     help="a finished training run: its model, LoRA, sampling settings and rewards are the defaults")
    src.add_argument("--names", nargs="+", help="labels for the LoRAs in the report (default: file names)")
    data = p.add_argument_group("prompts and scoring")
    data.add_argument("--prompts", help="prompt file (.txt, .csv/.tsv such as PartiPrompts.tsv, .jsonl) or "
                                        "builtin:NAME (default builtin:heldout)")
    data.add_argument("--column", help="CSV/TSV column or JSONL key (default prompt, or Prompt as in Parti-Prompts)")
    data.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    data.add_argument("--rewards", help="comma-separated reward names, e.g. aesthetic,clip,pickscore,hpsv2")
    data.add_argument("--reward-arg", action="append", default=[], metavar="LABEL.KEY=VALUE",
                      help="a reward argument, e.g. clip.model=/models/clip-vit-large-patch14 (repeatable)")
    data.add_argument("--seeds", default="4", help="a count (4 = seeds 0..3) or a list (0,5,9); default 4; "
                                                     "diversity needs at least 2")
    gen = p.add_argument_group("generation (defaults: the model's size, DDIM 25 steps, CFG 7.5)")
    gen.add_argument("--weight", type=float, default=1.0, help="LoRA weight (0 = base model, 1 = tuned)")
    gen.add_argument("--tuned-steps", type=int, help="use the tuned encoder only for the last N steps (paper: 15 of 25)")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance", type=float)
    gen.add_argument("--scheduler", choices=["ddim", "euler", "dpm++"])
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--batch-size", type=int, default=4, help="images per UNet batch (memory grows linearly)")
    gen.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    gen.add_argument("--precision", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    out = p.add_argument_group("output")
    out.add_argument("--out", help="output folder (default outputs/eval, or RUN_DIR/eval with --run)")
    out.add_argument("--grid-prompts", type=int, default=8, help="side-by-side grids for the first N prompts")
    out.add_argument("--save-images", action="store_true", help="also save every image under OUT/images/")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
