"""The training recipe: load → sample → decode → score → update → export, driven by one Config.

`Recipe.setup()` turns config sections into objects; `Recipe.train()` is the loop. One optimizer step is
`grad_accum` micro-steps of: encode prompts, denoise (no-grad prefix, grad tail), decode, score, backward(−reward).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Config, save_config
from .data import PromptSampler, load_prompts
from .decode import configure_vae, decode
from .errors import UserError
from .export import export_kohya, kohya_metadata
from .lora import add_lora, enable_full_finetune, lora_disabled, trainable_parameters
from .models import freeze_and_cast, load_components
from .optim import build_optimizer, build_schedule
from .outputs import MetricsLog, ProgressBar, make_grid
from .precision import resolve_precision, set_attention
from .rewards import RewardMix, build_reward
from .sampling import Cond, DenoisePlan, Denoiser, TextConditioner, make_scheduler
from .tracking import HeldOutEval, make_tracker


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """Noise for (step, micro-step) depends only on these numbers, so a run is reproducible and resumable."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro) % 2**63)


@dataclass
class StepStats:
    loss: float = 0.0
    reward: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    grad_steps: list[int] = field(default_factory=list)


class Recipe:
    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg.output.dir)
        self.ckpt_dir = self.out / "checkpoints"
        self._stop_signal: int | None = None
        self.prefix_cache = None  # set in setup() when sampling.prefix_cache is on

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self) -> "Recipe":
        from .memory.plan import apply_memory_plan

        cfg = self.cfg = apply_memory_plan(self.cfg, log=self.log)  # memory.plan: auto picks the switches; else as is
        self._prepare_output_dir()
        self.precision = p = resolve_precision(cfg.memory)
        if p.device.type == "cpu" and cfg.memory.cpu_threads:
            torch.set_num_threads(cfg.memory.cpu_threads)
        seed_everything(cfg.train.seed)
        prompts = load_prompts(cfg.data.prompts, column=cfg.data.column)

        comps = load_components(cfg.model.source, dtype=p.weight_dtype, config_dir=cfg.model.config_dir,
                                allow_pickle=cfg.model.allow_pickle, revision=cfg.model.revision)
        freeze_and_cast(comps, p.weight_dtype)
        for m in (comps.unet, comps.vae, comps.text_encoder):
            m.to(p.device)
        self.components = comps
        self.attention = set_attention(comps.unet, cfg.memory.attention, p.device, warn=self.log)
        configure_vae(comps.vae, cfg.memory.checkpoint_vae)

        self.text_encoder, self.conditioner = self._setup_text_encoder(comps)
        warn_long_prompts(prompts, comps.tokenizer, self.log)
        self.params = trainable_parameters(self.text_encoder)
        self.rewards = RewardMix(
            [(label, build_reward(term.type or label, args=term.args, target=term.target), term.weight)
             for label, term in cfg.rewards.terms.items() if term.weight != 0],
            device=p.device, dtype=p.weight_dtype, offload=cfg.rewards.offload)
        self.sampler = PromptSampler(prompts, cfg.train.batch_size, cfg.train.seed)
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.schedule = build_schedule(self.optimizer, cfg.optim, cfg.train.steps)
        self.denoiser = Denoiser(comps.unet, make_scheduler(cfg.sampling.scheduler, comps.scheduler), p.autocast)
        self.uncond_base = self.conditioner.base([cfg.sampling.negative_prompt])
        if cfg.sampling.prefix_cache != "none":
            from .prefix_cache import for_recipe

            s = cfg.sampling
            root = Path(s.prefix_cache_dir).expanduser() if s.prefix_cache_dir else self.out / "prefix_cache"
            self.prefix_cache = for_recipe(self, root=root, variants=s.prefix_variants)
            if cfg.sampling.prefix_cache == "prefill":
                self.prefix_cache.prefill(prompts, batch_size=cfg.train.batch_size, log=self.log)
        self.step = 0
        self.bad_steps = 0
        self._resume()
        save_config(cfg, self.out / "config.yaml")
        self.tracker = make_tracker(cfg.logging.tensorboard, self.out / "tensorboard", log=self.log)
        self.evaluator = HeldOutEval(cfg.eval, self.out, log=self.log, resume_step=self.step, train_prompts=prompts,
                                     batch_size=cfg.train.batch_size)
        n_train = sum(x.numel() for x in self.params)
        self.log(f"tc-lite: {comps.source} on {p.device} ({p.name}, attention {self.attention}); "
                 f"{cfg.lora.mode} with {n_train:,} trainable parameters; {len(prompts)} prompts; "
                 f"rewards {', '.join(f'{n}×{w:g}' for n, _, w in self.rewards.entries)}")
        return self

    def _prepare_output_dir(self) -> None:
        final = self.out / f"{self.cfg.output.name}.safetensors"
        if final.exists() and not self.cfg.output.overwrite:
            raise UserError(f"output.dir: {self.out} already holds a finished run ({final.name}); "
                            "choose another output.dir or set output.overwrite=true")
        if self.cfg.train.resume is None and list_checkpoints(self.ckpt_dir) and not self.cfg.output.overwrite:
            raise UserError(f"output.dir: {self.out} holds an unfinished run; continue it with train.resume=auto, "
                            "or start over with output.overwrite=true")
        if self.cfg.output.overwrite and final.exists():
            final.unlink()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"output.dir: cannot write to {self.out} ({e.strerror}); choose a writable folder") from None

    def _setup_text_encoder(self, comps: Any) -> tuple[torch.nn.Module, TextConditioner]:
        cfg, device = self.cfg, self.precision.device
        if cfg.lora.mode == "lora":
            te = add_lora(comps.text_encoder, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                          dropout=cfg.lora.dropout, targets=cfg.lora.targets)
            te.to(device)
            return te, TextConditioner(comps.tokenizer, te, device, original=lambda: lora_disabled(te))
        original = copy.deepcopy(comps.text_encoder).requires_grad_(False)  # the paper's full fine-tune needs the untouched copy
        te = enable_full_finetune(comps.text_encoder).to(device)
        return te, TextConditioner(comps.tokenizer, te, device, original_encoder=original)

    # ------------------------------------------------------------------------------------------------ one step

    def draw_grad_steps(self, gen: torch.Generator) -> int:
        s = self.cfg.sampling
        lo = s.grad_steps_min if s.grad_steps_min is not None else s.grad_steps
        return int(torch.randint(lo, s.grad_steps + 1, (1,), generator=gen))

    def conditioning(self, prompts: list[str]) -> dict[str, Cond]:
        """The embeddings for both phases; see the `sampling.encoder_schedule` and `sampling.uncond` docs in base.yaml."""
        s = self.cfg.sampling
        late = self.conditioner.tuned(prompts)
        uncond_late = self.uncond_base if s.uncond == "original" else self.conditioner.tuned([s.negative_prompt])
        if s.encoder_schedule == "two_encoder":
            return dict(early=self.conditioner.base(prompts), uncond_early=self.uncond_base, late=late, uncond_late=uncond_late)
        return dict(early=late, uncond_early=uncond_late, late=late, uncond_late=uncond_late)

    def generate_latents(self, prompts: list[str], gen: torch.Generator, grad_steps: int) -> torch.Tensor:
        if self.prefix_cache is not None:  # start from the cached latent after step T-K (noise fixed per prompt)
            from .prefix_cache import cached_generate_latents

            return cached_generate_latents(self, prompts, gen, grad_steps)
        s, comps = self.cfg.sampling, self.components
        plan = DenoisePlan(s.steps, grad_steps, s.guidance_scale, self.cfg.memory.checkpoint_unet, s.eta)
        f = comps.vae_scale_factor
        noise = self.denoiser.initial_latents(len(prompts), comps.latent_channels, s.height // f, s.width // f,
                                              gen, self.precision.device)
        return self.denoiser.run(noise, plan, generator=gen, **self.conditioning(prompts))

    def micro_step(self, prompts: list[str], gen: torch.Generator, stats: StepStats) -> None:
        k = self.draw_grad_steps(gen)
        latents = self.generate_latents(prompts, gen, k)
        images = decode(self.components.vae, latents, self.precision.autocast)
        total, parts = self.rewards(images, prompts)
        loss = -total.mean() / self.cfg.train.grad_accum
        self.precision.scaler.scale(loss).backward()
        stats.loss += loss.item()
        stats.reward += total.mean().item() / self.cfg.train.grad_accum
        for name, v in parts.items():
            stats.parts[name] = stats.parts.get(name, 0.0) + float(v.mean()) / self.cfg.train.grad_accum
        stats.grad_steps.append(k)

    def optimizer_step(self) -> tuple[float, bool]:
        """Unscale, clip, step. Returns (grad norm, whether the update was applied)."""
        scaler, clip = self.precision.scaler, self.cfg.optim.grad_clip
        scaler.unscale_(self.optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip if clip is not None else math.inf))
        finite = math.isfinite(norm)
        if finite or scaler.is_enabled():  # the scaler skips non-finite steps itself and lowers its scale
            scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:  # as accelerate does: a skipped update does not advance the LR schedule either
            self.schedule.step()
        return norm, finite

    def step_was_good(self, loss: float, applied: bool) -> bool:
        """Whether a step counts toward `train.max_bad_steps`. With fp16 loss scaling, overflowing gradients are the
        GradScaler's business: it skips the step and halves its scale (from 65536, a few skips at the start of a
        run are normal). Only once the scale has fallen below 1 do non-finite gradients mean a real fault."""
        if not math.isfinite(loss):
            return False
        scaler = self.precision.scaler
        return applied or (scaler.is_enabled() and scaler.get_scale() >= 1.0)

    # ------------------------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "trainable": {n: p.detach().cpu() for n, p in self.text_encoder.named_parameters() if p.requires_grad},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "schedule": self.schedule.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "bad_steps": self.bad_steps,
            "config": self.cfg.to_dict(),
        }

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.ckpt_dir, self.step, self.state_dict(), self.cfg.train.keep_checkpoints)

    def _resume(self) -> None:
        resume = self.cfg.train.resume
        if resume is None or self.cfg.output.overwrite:
            return
        if resume == "auto":
            found = list_checkpoints(self.ckpt_dir)
            if not found:
                return
            path = found[-1]
        else:
            path = Path(resume)
        state = load_checkpoint(path)
        params = dict((n, p) for n, p in self.text_encoder.named_parameters() if p.requires_grad)
        if set(params) != set(state["trainable"]):
            raise UserError(f"train.resume: {path} was saved for different trainable weights (lora.mode/rank/targets "
                            "changed?); resume with the settings it was made with or start a new output.dir")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["trainable"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.scaler.load_state_dict(state["scaler"])
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.bad_steps = state["bad_steps"]
        self.step = state["step"]
        MetricsLog.truncate(self.out / "metrics.jsonl", self.step)
        self.log(f"resumed from {path} at step {self.step}")

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_signal = signum
        self.log(f"{signal.Signals(signum).name}: saving a checkpoint after this step (press again to stop now)")

    @contextlib.contextmanager
    def _signals(self):
        """Ctrl-C / SIGTERM finish the current step, checkpoint, then stop; only the main thread can install handlers."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    # ------------------------------------------------------------------------------------------------ loop

    def train(self) -> Path:
        cfg = self.cfg
        metrics = MetricsLog(self.out / "metrics.jsonl")
        bar = ProgressBar(total=cfg.train.steps, initial=self.step, enabled=cfg.logging.progress)
        if cfg.logging.sample_every and self.step == 0:
            self.save_samples(0)
        self.evaluate(self.step)  # step 0: the base model's held-out reward, the bar to beat
        t_last = time.perf_counter()
        with self._signals():
            while self.step < cfg.train.steps:
                record = self.train_step()
                now = time.perf_counter()
                record["sec"], t_last = now - t_last, now
                if self.step % cfg.logging.log_every == 0 or self.step == cfg.train.steps:
                    metrics.write(record)
                    self.tracker.log_scalars(record, self.step)
                bar.update(record)
                if cfg.logging.sample_every and self.step % cfg.logging.sample_every == 0:
                    self.save_samples(self.step)
                stop_early = self.evaluate(self.step)
                every = cfg.train.checkpoint_every
                if self._stop_signal is not None or (every and self.step % every == 0 and self.step < cfg.train.steps):
                    path = self.save_checkpoint()
                if self._stop_signal is not None:
                    bar.close()
                    metrics.close()
                    raise Interrupted(f"stopped at step {self.step}; checkpoint {path}. "
                                      f"Run the same command again to resume (train.resume: auto).", self._stop_signal)
                if stop_early:
                    self.log(self.evaluator.stop_message())
                    break
        bar.close()
        if cfg.logging.sample_every and self.step % cfg.logging.sample_every:
            self.save_samples(self.step)
        path = self.export()
        metrics.close()
        self.tracker.close()
        self.write_plots()
        self.log(f"done: {path}")
        return path

    def evaluate(self, step: int) -> bool:
        """Held-out evaluation when `eval.every` says so (see tc_lite.tracking); True when early stopping says stop.

        A new best is also exported as `<name>_best.safetensors` when early stopping is on, so stopping after
        `eval.patience` worse evaluations still leaves the best weights (the final file holds the last ones).
        """
        record = self.evaluator.maybe_evaluate(step, self.render_eval, self.rewards)
        if record is not None:
            self.tracker.log_scalars(record, step, prefix="eval/")
            if record["best"] and step > 0 and self.cfg.eval.patience:
                self.export(self.out / f"{self.cfg.output.name}_best.safetensors")
        return self.evaluator.should_stop

    def render_eval(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """`render` with the encoder in eval mode (no LoRA dropout), as the sample grids use it."""
        was_training = self.text_encoder.training
        self.text_encoder.eval()
        try:
            return self.render(prompts, seeds)
        finally:
            self.text_encoder.train(was_training)

    def write_plots(self) -> None:
        """Reward/loss curves to <out>/plots (also `python -m tc_lite plot`); a plot never fails a finished run."""
        from .plots import plot_run

        try:
            plot_run(self.out)
        except Exception as e:  # noqa: BLE001
            self.log(f"plots skipped: {e}")

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (grad_accum micro-steps); returns its metrics record."""
        cfg = self.cfg
        stats = StepStats()
        try:
            for micro in range(cfg.train.grad_accum):
                self.micro_step(next(self.sampler), step_generator(cfg.train.seed, self.step, micro), stats)
        except torch.OutOfMemoryError:
            raise UserError(out_of_memory_message(cfg)) from None
        norm, applied = self.optimizer_step()
        self.step += 1
        self.bad_steps = 0 if self.step_was_good(stats.loss, applied) else self.bad_steps + 1
        if self.bad_steps >= cfg.train.max_bad_steps:
            raise UserError(
                f"{self.bad_steps} consecutive steps had a non-finite loss or gradient (last at step {self.step}); "
                "likely causes: optim.lr too high, fp16 overflow (try memory.precision=bf16 or fp32), or a reward "
                "returning extreme values. The last good checkpoint is kept in " + str(self.ckpt_dir))
        record = {"step": self.step, "loss": stats.loss, "reward": stats.reward,
                  **{f"reward/{k}": v for k, v in stats.parts.items()},
                  "grad_norm": norm, "skipped": not applied, "bad_steps": self.bad_steps,
                  "lr": self.schedule.get_last_lr()[0], "grad_steps": stats.grad_steps}
        if self.precision.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return record

    # ------------------------------------------------------------------------------------------------ outputs

    @torch.no_grad()
    def render(self, prompts: list[str], seeds: list[int], tuned: bool = True) -> torch.Tensor:
        """Images [N,3,H,W] for every (prompt, seed), with the tuned encoder on all steps (what users will get)."""
        s, comps = self.cfg.sampling, self.components
        images = []
        for prompt in prompts:
            for seed in seeds:
                gen = torch.Generator().manual_seed(seed)
                cond = self.conditioner.tuned([prompt]) if tuned else self.conditioner.base([prompt])
                uncond = self.conditioner.tuned([s.negative_prompt]) if tuned else self.uncond_base
                f = comps.vae_scale_factor
                noise = self.denoiser.initial_latents(1, comps.latent_channels, s.height // f, s.width // f, gen,
                                                      self.precision.device)
                plan = DenoisePlan(s.steps, 0, s.guidance_scale, False, s.eta)
                latents = self.denoiser.run(noise, plan, early=cond, late=cond, uncond_early=uncond,
                                            uncond_late=uncond, generator=gen)
                images.append(decode(comps.vae, latents, self.precision.autocast).cpu())
        return torch.cat(images)

    def save_samples(self, step: int) -> Path:
        lg = self.cfg.logging
        images = self.render_eval(lg.sample_prompts, lg.sample_seeds)
        path = self.out / "samples" / f"step_{step:06d}.png"
        grid = make_grid(images, rows=len(lg.sample_prompts), labels=lg.sample_prompts, path=path)
        self.tracker.log_image("samples", grid, step)
        return path

    def export(self, path: Path | None = None) -> Path:
        """Write the run's result: the kohya LoRA, or for `lora.mode: full` the whole encoder (canonical names).

        The full encoder is written with `text_model.…` names whatever transformers builds (the §3 trap), and in
        fp32 when `output.save_precision` would round away more than 1% of the weight change (a full fine-tune at
        lr 1e-6 moves weights below fp16's resolution, so an fp16 file could silently be the base model).
        """
        from .export import encoder_state_dict, export_encoder, save_dtype_of, update_retention

        cfg = self.cfg
        dtype = save_dtype_of(cfg.output.save_precision)
        if cfg.lora.mode == "full":
            tuned = encoder_state_dict(self.text_encoder)
            lost = update_retention(tuned, encoder_state_dict(self.conditioner.original_encoder), dtype)
            if lost > 0.01 and dtype != torch.float32:
                self.log(f"output.save_precision={cfg.output.save_precision} would lose {lost:.1%} of the encoder's "
                         "weight change to rounding; writing fp32 instead")
                dtype = torch.float32
            path = path or self.out / f"{cfg.output.name}_text_encoder.safetensors"
            return export_encoder(tuned, path, save_dtype=dtype, config=self.text_encoder.config,
                                  metadata={"tc_lite_config": json.dumps(cfg.to_dict()),
                                            "tc_lite_base_model": cfg.model.source, "tc_lite_steps": self.step})
        meta = kohya_metadata(
            output_name=cfg.output.name, rank=cfg.lora.rank, alpha=cfg.lora.alpha, lr=cfg.optim.lr,
            seed=cfg.train.seed, steps=self.step, mixed_precision=self.precision.name, optimizer=cfg.optim.name,
            base_model=cfg.model.source, extra={"tc_lite_config": json.dumps(cfg.to_dict())})
        return export_kohya(self.text_encoder, path or self.out / f"{cfg.output.name}.safetensors", metadata=meta,
                            save_dtype=dtype)

def warn_long_prompts(prompts: list[str], tokenizer: Any, log: Callable[[str], None]) -> int:
    """CLIP sees at most 77 tokens (start and end included); say how many prompts lose their tail."""
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
    long = [p for p, n in zip(prompts, lengths) if n > limit]
    if long:
        log(f"warning: {len(long)} of {len(prompts)} prompts are longer than the text encoder's {limit} tokens and "
            f"are truncated, e.g. {long[0][:80]!r}...")
    return len(long)


class Interrupted(UserError):
    """Ctrl-C or SIGTERM: the run saved a checkpoint and stopped; exit code 128 + signal, as shells expect."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def out_of_memory_message(cfg: Config, estimate: Callable[[Config], float | None] | None = None) -> str:
    """What to change after a CUDA OOM: the estimator's figure for this config beside the card's size, and the
    keys that lower memory. `estimate` (GiB, or None when it cannot tell) is injectable for tests."""
    from .memory.plan import detected_vram_gb

    need = (estimate or estimated_peak_gib)(cfg)
    card = detected_vram_gb()
    sizes = ""
    if need is not None:
        sizes = (f"tc-lite estimates this step at {need:.2f} GiB plus ~0.5 GiB of CUDA context"
                 + (f", on a {card:.1f} GiB card" if card else "") + ". ")
    vram = f"{card:.0f}" if card else "<your card's GB>"
    halve = cfg.train.batch_size // 2
    keys = ["memory.checkpoint_unet=true", "memory.checkpoint_vae=true", "rewards.offload=cpu (or sequential)",
            *([f"train.batch_size={halve} with train.grad_accum={cfg.train.grad_accum * 2}"] if halve else []),
            "a smaller sampling.height/width", "memory.precision=fp16"]
    return (f"out of GPU memory during a training step. {sizes}Let tc-lite choose settings that fit with "
            f"memory.plan=auto memory.vram_gb={vram}, or lower memory by hand with (roughly in order of cost): "
            + ", ".join(keys) + ". Other programs on the GPU count too (nvidia-smi). The last good checkpoint is kept.")


def estimated_peak_gib(cfg: Config) -> float | None:
    """The memory estimator's peak for `cfg`, or None if it cannot estimate it (an unknown architecture, say)."""
    try:
        from .memory.estimate import GiB
        from .memory.plan import cached_estimate

        return cached_estimate(cfg)["peak_bytes"] / GiB
    except Exception:  # noqa: BLE001 -- a message helper must never raise over the error it explains
        return None


def run_training(cfg: Config, log: Callable[[str], None] = print) -> Path:
    return Recipe(cfg, log).setup().train()
