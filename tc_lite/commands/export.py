"""`python -m tc_lite export RUN_DIR --format kohya|peft|diffusers|merged`: re-export a run in another format.

The source is the run's finished output (`<name>.safetensors`, or `<name>_text_encoder.safetensors` for a full
fine-tune), a checkpoint given with `--checkpoint`, or, for an unfinished run, its newest checkpoint. The base model
comes from the run's `config.yaml`; it is loaded only when needed (merged exports, checkpoints, SVD extraction).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tc_lite.errors import UserError

if TYPE_CHECKING:  # torch is imported inside the functions, so `python -m tc_lite --help` stays fast
    import torch

FORMATS = ("kohya", "peft", "diffusers", "merged")
_DEFAULT_PRECISION = {"kohya": "fp16", "peft": "fp16", "diffusers": "fp16", "merged": "fp32"}
_LOSSY_UPDATE = 0.01  # warn when half precision loses more than 1% of a merged encoder's weight change


@dataclass
class RunWeights:
    """What a run produced, read from its final file or a checkpoint."""

    run_dir: Path
    cfg: Any  # tc_lite.config.Config
    kind: str  # "lora" (kohya state dict) or "encoder" (canonical encoder state dict)
    weights: dict[str, torch.Tensor]
    label: str  # the file it came from, for messages and metadata
    step: int | None  # training step, when known
    from_checkpoint: bool = False
    file_metadata: dict[str, str] = field(default_factory=dict)
    _base: Any = None  # (family, components) of the base model, loaded on first use

    def base_model(self) -> tuple[Any, Any]:
        """The run's base model (fp32, CPU) through its family, loaded from `model.source` in config.yaml."""
        if self._base is None:
            import torch

            from tc_lite.families import load_model
            from tc_lite.models import freeze_and_cast

            family, comps = load_model(self.cfg.model, torch.float32)
            freeze_and_cast(comps, torch.float32)
            self._base = family, comps
        return self._base

    def base_model_version(self) -> str:
        from tc_lite.families import family_for

        return family_for(self.cfg.model).kohya_base_model_version

    def base_encoder(self) -> torch.nn.Module:
        """The base text encoder the merged/peft/diffusers formats are written for (the family's first slot)."""
        family, comps = self.base_model()
        return family.slots[0].encoder(comps).eval()


def _final_file(run_dir: Path, cfg: Any) -> Path:
    suffix = "_text_encoder" if cfg.lora.mode == "full" else ""
    return run_dir / f"{cfg.output.name}{suffix}.safetensors"


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None,
             log: Callable[[str], None] = print) -> RunWeights:
    """Read a run folder: its config and the weights of its final output or of a checkpoint."""
    from tc_lite.checkpoint import list_checkpoints
    from tc_lite.config import load_config

    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run folder {str(run)!r} does not exist; pass the output.dir of a training run")
    if not (run / "config.yaml").is_file():
        raise UserError(f"{str(run)!r} has no config.yaml, so it is not a tc-lite run folder; pass the output.dir "
                        "of a training run (it needs config.yaml to know the base model)")
    cfg = load_config(run / "config.yaml")
    if checkpoint is None:
        final = _final_file(run, cfg)
        if final.is_file():
            from tc_lite.export import read_kohya, read_tuned

            kind, weights = read_tuned(final)
            meta = read_kohya(final)[1]
            step = int(meta["ss_steps"]) if meta.get("ss_steps", "").isdigit() else None
            return RunWeights(run, cfg, kind, weights, str(final), step, file_metadata=meta)
        found = list_checkpoints(run / "checkpoints")
        if not found:
            raise UserError(f"{str(run)!r} holds neither {final.name} nor checkpoints/step_*.pt; train first, or "
                            "pass --checkpoint FILE")
        checkpoint = found[-1]
        log(f"{run} is not finished; exporting its newest checkpoint {Path(checkpoint).name}")
    return _from_checkpoint(run, cfg, Path(checkpoint))


def _read_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise UserError(f"--checkpoint {str(path)!r} does not exist; pass a RUN_DIR/checkpoints/step_NNNNNN.pt file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickle/zip errors of a foreign or truncated file)
        raise UserError(f"--checkpoint {str(path)!r} is not a readable tc-lite checkpoint ({type(e).__name__}: {e}); "
                        "pass a RUN_DIR/checkpoints/step_NNNNNN.pt file") from None
    if not isinstance(state, dict) or not isinstance(state.get("adapters"), dict):
        raise UserError(f"--checkpoint {str(path)!r} has no adapter weights; it was not written by tc-lite training "
                        "(or by a tc-lite older than its model-family layout)")
    return state


def _from_checkpoint(run: Path, cfg: Any, path: Path) -> RunWeights:
    """The checkpoint's adapter state, applied to the run's adapters on a fresh copy of the base model."""
    import copy

    from tc_lite.adapters import build_adapters
    from tc_lite.export import encoder_state_dict

    state = _read_checkpoint(path)
    rw = RunWeights(run, cfg, "lora", {}, str(path), int(state.get("step", 0)) or None, from_checkpoint=True)
    family, base = rw.base_model()
    comps = copy.copy(base)
    for slot in family.slots:  # adapters change the encoders in place: give them copies
        slot.set_encoder(comps, copy.deepcopy(slot.encoder(base)))
    adapters = build_adapters(cfg.lora, family, comps)
    try:
        adapters.load_state_dict(state["adapters"], str(path))
    except (UserError, RuntimeError) as e:
        raise UserError(
            f"--checkpoint {str(path)!r} does not fit the run in {str(run)!r} (lora.mode={cfg.lora.mode}, "
            f"rank {cfg.lora.rank}, base {cfg.model.source}): {str(e).splitlines()[0]} It comes from another run or "
            "base model; pass a checkpoint of this run, or the RUN_DIR it belongs to") from None
    if adapters.kinds == {"lora"}:
        rw.weights = {k: v for a in adapters for k, v in a.kohya_tensors().items()}
    else:
        rw.kind, rw.weights = "encoder", encoder_state_dict(adapters.adapters[0].module())
    return rw


def _default_out(rw: RunWeights, fmt: str, rank: int | None) -> Path:
    stem = rw.cfg.output.name + (f"_step{rw.step:06d}" if rw.from_checkpoint and rw.step else "")
    if rank is not None:
        stem += f"_r{rank}"
    name = {"kohya": f"{stem}.safetensors", "peft": f"{stem}_peft", "diffusers": f"{stem}_diffusers",
            "merged": f"{stem}_text_encoder.safetensors"}[fmt]
    return rw.run_dir / "export" / name


def export_run(run_dir: str | Path, fmt: str, *, out: str | Path | None = None, save_precision: str | None = None,
               checkpoint: str | Path | None = None, rank: int | None = None,
               log: Callable[[str], None] = print) -> Path:
    """Export a run (or one of its checkpoints) as `fmt`; returns the written file or folder."""
    from tc_lite.export import save_dtype_of

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    dtype = save_dtype_of(save_precision or _DEFAULT_PRECISION[fmt])
    rw = load_run(run_dir, checkpoint, log)
    if rank is not None and rw.kind == "lora":
        raise UserError("--rank extracts a LoRA from a full fine-tune (lora.mode: full); this run trained a LoRA "
                        f"of rank {rw.cfg.lora.rank} already: drop --rank")
    dest = Path(out) if out is not None else _default_out(rw, fmt, rank)
    if fmt == "merged":
        return _export_merged(rw, dest, dtype, log)
    lora, extra = rw.weights, {}
    if rw.kind == "encoder":
        if rank is None:
            raise UserError(f"{rw.label} is a full fine-tuned text encoder: export it with --format merged, or as "
                            f"a LoRA with --format {fmt} --rank R (extracted by SVD, error reported)")
        from tc_lite.export import encoder_state_dict, extract_lora

        lora, report = extract_lora(encoder_state_dict(rw.base_encoder()), rw.weights, rank)
        log(f"SVD extraction, {report}")
        extra = {"tc_lite_svd_rel_error": f"{report.rel_error:.6g}",
                 "tc_lite_svd_untargeted_change": f"{report.untargeted_change:.6g}"}
    return _export_lora(rw, lora, fmt, dest, dtype, extra, log)


def _export_lora(rw: RunWeights, lora: dict[str, torch.Tensor], fmt: str, dest: Path, dtype: torch.dtype,
                 extra: dict[str, str], log: Callable[[str], None]) -> Path:
    from tc_lite.export import (
        export_diffusers,
        export_peft,
        kohya_metadata,
        lora_groups,
        write_kohya,
    )

    groups = lora_groups(lora, rw.label)
    rank, alpha = int(groups[0][1].shape[0]), groups[0][3]
    what = f"{len(groups)} modules, rank {rank}, alpha {alpha:g}, {str(dtype).removeprefix('torch.')}"
    if fmt == "kohya":
        cfg, meta = rw.cfg, rw.file_metadata
        metadata = kohya_metadata(
            output_name=dest.stem, rank=rank, alpha=alpha, lr=cfg.optim.lr, seed=cfg.train.seed,
            steps=rw.step or 0, mixed_precision=meta.get("ss_mixed_precision", cfg.memory.precision),
            optimizer=cfg.optim.name, base_model=cfg.model.source,
            base_model_version=meta.get("ss_base_model_version", rw.base_model_version()),
            resolution=(cfg.sampling.width, cfg.sampling.height),
            extra={"tc_lite_config": json.dumps(cfg.to_dict()), "tc_lite_source": Path(rw.label).name, **extra})
        path = write_kohya(lora, dest, metadata=metadata, save_dtype=dtype)
        log(f"wrote kohya LoRA ({what}) to {path}\n  A1111: copy to models/Lora, prompt <lora:{dest.stem}:1>; "
            "ComfyUI: models/loras, LoraLoader (strength_clip)")
    elif fmt == "peft":
        if dest.suffix == ".safetensors":
            raise UserError(f"--out {str(dest)!r}: a peft adapter is a folder (adapter_config.json + weights); "
                            "give a folder path")
        path = export_peft(lora, dest, save_dtype=dtype, base_model=rw.cfg.model.source, source=rw.label)
        log(f"wrote peft adapter ({what}) to {path}/\n  PeftModel.from_pretrained(text_encoder, '{path}')")
    else:
        path = export_diffusers(lora, dest, save_dtype=dtype, source=rw.label)
        log(f"wrote diffusers LoRA ({what}) to {path}\n  pipe.load_lora_weights('{path.parent}')")
    return path


def _export_merged(rw: RunWeights, dest: Path, dtype: torch.dtype, log: Callable[[str], None]) -> Path:
    from tc_lite.export import (
        encoder_state_dict,
        export_encoder,
        load_encoder_weights,
        merge_lora,
        update_retention,
    )
    from tc_lite.inference import plain_copy

    base_te = rw.base_encoder()
    base = encoder_state_dict(base_te)
    if rw.kind == "lora":
        tuned = merge_lora(base, rw.weights, source=rw.label)
    else:
        load_encoder_weights(plain_copy(base_te), rw.weights, source=rw.label)  # same architecture as the base?
        tuned = rw.weights
    lost = update_retention(tuned, base, dtype)
    name = str(dtype).removeprefix("torch.")
    if lost > _LOSSY_UPDATE:
        log(f"warning: storing the encoder in {name} loses {lost:.1%} of the fine-tuning's weight change "
            "(it is smaller than that precision's resolution); use --save-precision fp32")
    path = export_encoder(tuned, dest, save_dtype=dtype, config=base_te.config,
                          metadata={"tc_lite_source": Path(rw.label).name, "tc_lite_base_model": rw.cfg.model.source})
    log(f"wrote merged text encoder ({len(tuned)} tensors, {name}; {lost:.2%} of the weight change lost to "
        f"rounding) to {path}")
    return path


def _run(args: argparse.Namespace) -> int:
    export_run(args.run_dir, args.format, out=args.out, save_precision=args.save_precision,
               checkpoint=args.checkpoint, rank=args.rank)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a run as kohya / peft / diffusers LoRA or a merged text encoder",
        description="Export a finished run (or one of its checkpoints) in another format. Default output: "
                    "RUN_DIR/export/<name>….")
    p.add_argument("run_dir", help="the run's output.dir (holds config.yaml)")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", help="output file (kohya, merged) or folder (peft, diffusers; merged to a folder "
                                 "gives config.json + model.safetensors)")
    p.add_argument("--save-precision", choices=["fp16", "bf16", "fp32"],
                   help="weights dtype (default fp16 for LoRAs, fp32 for merged: fp16 can erase small updates)")
    p.add_argument("--checkpoint", help="export this RUN_DIR/checkpoints/step_NNNNNN.pt instead of the final output")
    p.add_argument("--rank", type=int, help="full fine-tunes only: extract a LoRA of this rank by SVD")
    p.set_defaults(func=_run)
