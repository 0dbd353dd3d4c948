"""A training run's result read back from its folder (final files or a checkpoint), for `tc_lite export`.

What a run trained is per encoder slot: a LoRA (all such slots share one kohya file, under the family's prefixes)
or the whole encoder (one canonical file per slot); and optionally a UNet LoRA (`lora_unet_` modules in the same
kohya file). The base model comes from the run's `config.yaml` and is loaded only when needed (merged exports,
checkpoints, SVD extraction); the peft and diffusers formats need only the UNet's module tree, built from its config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tc_lite.errors import UserError

if TYPE_CHECKING:  # torch is imported inside the functions, so `python -m tc_lite --help` stays fast
    import torch


@dataclass
class RunWeights:
    """What a run produced: the LoRA of its LoRA-trained slots and the weights of its fully trained ones."""

    run_dir: Path
    cfg: Any  # tc_lite.config.Config
    lora: dict[str, torch.Tensor]  # kohya state dict (every LoRA slot's prefix, lora_unet); empty if no LoRA
    encoders: dict[str, dict[str, torch.Tensor]]  # slot name -> canonical state dict of each fully trained encoder
    label: str  # the file it came from, for messages and metadata
    step: int | None  # training step, when known
    from_checkpoint: bool = False
    file_metadata: dict[str, str] = field(default_factory=dict)
    _base: Any = None  # (family, components) of the base model, loaded on first use

    def family(self) -> Any:
        from tc_lite.families import family_for

        return family_for(self.cfg.model)

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

    def unet_tree(self) -> torch.nn.Module:
        """The base UNet's module tree, to place a UNet LoRA's kohya names: the loaded base UNet when there is one,
        else one built on 'meta' from the run's UNet config (no weights read)."""
        if self._base is not None:
            return self._base[1].unet
        from tc_lite.export.unet import meta_unet

        return meta_unet(self.family().architecture(self.cfg).unet)

    def base_encoders(self) -> dict[str, torch.nn.Module]:
        """Every slot's base text encoder, by slot name, in the family's order."""
        family, comps = self.base_model()
        return {s.name: s.encoder(comps).eval() for s in family.slots}


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
        from tc_lite.export.trained import result_paths
        from tc_lite.families import family_for

        lora_file, full_files = result_paths(cfg, family_for(cfg.model), run)
        wanted = ([lora_file] if lora_file else []) + list(full_files.values())
        if all(p.is_file() for p in wanted):
            return _from_files(run, cfg, lora_file, full_files)
        found = list_checkpoints(run / "checkpoints")
        if not found:
            missing = ", ".join(p.name for p in wanted if not p.is_file())
            raise UserError(f"{str(run)!r} holds neither {missing} nor checkpoints/step_*.pt; train first, or "
                            "pass --checkpoint FILE")
        checkpoint = found[-1]
        log(f"{run} is not finished; exporting its newest checkpoint {Path(checkpoint).name}")
    return _from_checkpoint(run, cfg, Path(checkpoint))


def _from_files(run: Path, cfg: Any, lora_file: Path | None, full_files: dict[str, Path]) -> RunWeights:
    from tc_lite.export import read_kohya, read_tuned

    lora = read_tuned(lora_file)[1] if lora_file else {}
    encoders = {slot: read_tuned(p)[1] for slot, p in full_files.items()}
    first = lora_file or next(iter(full_files.values()))
    meta = read_kohya(first)[1]
    steps = meta.get("ss_steps", meta.get("tc_lite_steps", ""))
    return RunWeights(run, cfg, lora, encoders, str(first), int(steps) if steps.isdigit() else None,
                      file_metadata=meta)


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
    rw = RunWeights(run, cfg, {}, {}, str(path), int(state.get("step", 0)) or None, from_checkpoint=True)
    family, base = rw.base_model()
    comps = copy.copy(base)
    for slot in family.slots:  # adapters change the encoders in place: give them copies
        slot.set_encoder(comps, copy.deepcopy(slot.encoder(base)))
    if cfg.unet.mode == "lora":  # and the UNet, which a UNet LoRA is injected into
        comps.unet = copy.deepcopy(base.unet)
    adapters = build_adapters(cfg, family, comps)
    try:
        adapters.load_state_dict(state["adapters"], str(path))
    except (UserError, RuntimeError) as e:
        raise UserError(
            f"--checkpoint {str(path)!r} does not fit the run in {str(run)!r} (lora.mode={cfg.lora.mode}, "
            f"rank {cfg.lora.rank}, unet.mode={cfg.unet.mode}, base {cfg.model.source}): {str(e).splitlines()[0]} "
            "It comes from another run or "
            "base model; pass a checkpoint of this run, or the RUN_DIR it belongs to") from None
    for a in adapters:
        if a.kind == "lora":
            rw.lora.update(a.kohya_tensors())
        else:
            rw.encoders[a.key] = encoder_state_dict(a.module())
    return rw
