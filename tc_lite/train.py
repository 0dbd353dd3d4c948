"""The training recipe: load → sample → decode → score → update → export, driven by one Config.

`Recipe.setup()` turns config sections into objects (the model family and its components, the adapters, the
prompt encoder, the rewards, the starting-latent source, the optimizer) and wires them into one `TrainStep`;
`Recipe.train()` is the loop around it: metrics, samples, held-out evaluation, checkpoints, export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .adapters import active_adapters, build_adapters, drift_penalty
from .checkpoint import checkpoint_path, load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from .conditioning import PromptEncoder
from .config import Config, save_config
from .data import PromptSampler, load_prompts, warn_long_prompts
from .decode import configure_vae
from .distributed import Processes
from .errors import UserError
from .families import load_model
from .interrupts import Interrupted, StopRequest
from .memory.oom import out_of_memory_message
from .models import freeze_and_cast
from .optim import build_optimizer, build_schedule
from .outputs import MetricsLog, NullMetricsLog, ProgressBar, make_grid
from .precision import resolve_precision, set_attention
from .render import RenderPlan, Renderer
from .rewards import RewardMix, build_reward
from .run_folder import RunFolder
from .sampling import Denoiser, make_scheduler
from .step import FreshNoise, StepStats, TrainStep, step_generator
from .tracking import HeldOutEval, make_tracker

__all__ = ["Interrupted", "Recipe", "StepStats", "run_training", "step_generator"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Recipe:
    def __init__(self, cfg: Config, log: Callable[[str], None] = print, processes: Processes | None = None):
        self.cfg = cfg
        # One process writes and talks (tc_lite.distributed); the others train and stay quiet.
        self.processes = processes or Processes.from_env(cpu=cfg.memory.device == "cpu")
        self.log = log if self.processes.is_main else (lambda s: None)
        self.processes.quiet()
        self.out = Path(cfg.output.dir)
        self.run_folder = RunFolder(self.out, cfg.output.name)  # one run per folder (see tc_lite.run_folder)
        self.stop = StopRequest(self.log)
        self.prefix_cache = None  # set in setup() when sampling.prefix_cache is on
        self.started_at: float | None = None

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self) -> "Recipe":
        from .memory.plan import apply_memory_plan
        from .preflight import preflight

        preflight(self.cfg)  # reward args, lora targets, data and model paths: before minutes of loading
        procs = self.processes
        # memory.plan: auto picks the switches (else as is); the main process decides for every process
        cfg = self.cfg = procs.broadcast_object(apply_memory_plan(self.cfg, log=self.log) if procs.is_main else None)
        prepared = self.run_folder.prepare(overwrite=cfg.output.overwrite, resume=cfg.train.resume) if procs.is_main \
            else None
        self.resume_from = procs.broadcast_object(prepared)
        self.precision = p = resolve_precision(cfg.memory)
        if p.device.type == "cpu" and cfg.memory.cpu_threads:
            torch.set_num_threads(cfg.memory.cpu_threads)
        seed_everything(cfg.train.seed)
        prompts = load_prompts(cfg.data.prompts, column=cfg.data.column)

        self.family, comps = load_model(cfg.model, p.weight_dtype)
        freeze_and_cast(comps, p.weight_dtype, cfg.memory)  # the VAE in fp32 where fp16 would overflow (SDXL's)
        if next(comps.vae.parameters()).dtype != p.weight_dtype:
            self.log("the VAE decodes in fp32 (it overflows in fp16); model.vae: madebyollin/sdxl-vae-fp16-fix or "
                     "memory.precision: bf16 (where the card has it) avoid the extra memory")
        for m in (comps.unet, comps.vae, *self.family.encoders(comps).values()):
            m.to(p.device)
        self.components = comps
        self.attention = set_attention(comps.unet, cfg.memory.attention, p.device, warn=self.log)
        configure_vae(comps.vae, cfg.memory.checkpoint_vae)

        self.adapters = build_adapters(cfg, self.family, comps)
        from .export.kohya import a1111_warning  # said now, not only when the file is written hours later

        lora_tensors = {k: v for a in self.adapters if a.kind == "lora" and a.part == "text_encoder"
                        for k, v in a.kohya_tensors().items()}
        if warning := a1111_warning(lora_tensors):
            self.log(warning)
        for a in self.adapters:
            a.module().to(p.device)
        self.encoder = PromptEncoder(self.family, comps, self.adapters, size=(cfg.sampling.height, cfg.sampling.width))
        warn_long_prompts(self.family, comps, prompts, self.log)
        self.params = self.adapters.parameters()
        procs.broadcast_parameters(self.params)  # every process starts from the main process's weights
        if procs.count > 1:
            seed_everything(cfg.train.seed + 1_000_003 * procs.index)  # LoRA dropout etc. differ per process
        self.rewards = RewardMix(
            [(label, build_reward(term.type or label, args=term.args, target=term.target), term.weight)
             for label, term in cfg.rewards.terms.items() if term.weight != 0],
            device=p.device, dtype=p.weight_dtype, offload=cfg.rewards.offload)
        # One global stream of batches (batch_size x processes); each process takes its own rows (`_my_prompts`).
        self.sampler = PromptSampler(prompts, cfg.train.batch_size * procs.count, cfg.train.seed)
        self.optimizer = build_optimizer(self.adapters.param_groups(), cfg.optim)
        self.schedule = build_schedule(self.optimizer, cfg.optim, cfg.train.steps)
        self.trainer = TrainStep(cfg, encoder=self.encoder, denoiser=self._denoiser(), vae=comps.vae,
                                 rewards=self.rewards, latents=self._latent_source(prompts), params=self.params,
                                 optimizer=self.optimizer, schedule=self.schedule, precision=p)
        self.renderer = Renderer(comps, RenderPlan.from_sampling(cfg.sampling), p.autocast)
        self.step = 0
        self.bad_steps = 0
        self._resume()
        if procs.is_main:
            save_config(cfg, self.out / "config.yaml")
        self.tracker = make_tracker(cfg.logging.tensorboard and procs.is_main, self.out / "tensorboard", log=self.log)
        eval_cfg = cfg.eval if procs.is_main else dataclasses.replace(cfg.eval, every=0)  # the main process evaluates
        self.evaluator = HeldOutEval(eval_cfg, self.out, log=self.log, resume_step=self.step, train_prompts=prompts,
                                     batch_size=cfg.train.batch_size)
        n_train = sum(x.numel() for x in self.params)
        self.log(f"tc-lite: {comps.source} ({self.family.label}) on {p.device} ({p.name}, attention {self.attention}); "
                 f"{self.adapters.describe()} with {n_train:,} trainable parameters; {len(prompts)} prompts; "
                 f"rewards {', '.join(f'{n}×{w:g}' for n, _, w in self.rewards.entries)}")
        if procs.count > 1:
            self.log(f"data parallel: {procs.count} processes × batch {cfg.train.batch_size} × accumulation "
                     f"{cfg.train.grad_accum} = global batch {self.global_batch} per optimizer step")
        return self

    @property
    def global_batch(self) -> int:
        """Prompts per optimizer step over all processes (per-device batch × processes × accumulation)."""
        return self.cfg.train.batch_size * self.processes.count * self.cfg.train.grad_accum

    def _my_prompts(self, batch: list[str]) -> list[str]:
        return batch[self.processes.shard(self.cfg.train.batch_size)]

    def _denoiser(self) -> Denoiser:
        return Denoiser(self.components.unet, make_scheduler(self.cfg.sampling.scheduler, self.components.scheduler),
                        self.precision.autocast, drift=drift_penalty(self.cfg, self.adapters))

    def _latent_source(self, prompts: list[str]) -> Any:
        """Fresh noise every step, or with `sampling.prefix_cache` the cached latent after step T−K."""
        s, comps = self.cfg.sampling, self.components
        if s.prefix_cache == "none":
            f = comps.vae_scale_factor
            return FreshNoise((comps.latent_channels, s.height // f, s.width // f), self.precision.device,
                              shard=(self.processes.index, self.processes.count))
        from .prefix_cache import build_prefix_cache

        self.prefix_cache = build_prefix_cache(self.cfg, self.family, comps, self.adapters, self.encoder,
                                               self.precision, self.out)
        if s.prefix_cache == "prefill":  # each process fills its share; entries are written atomically
            procs = self.processes
            self.prefix_cache.prefill(prompts[procs.index :: procs.count], batch_size=self.cfg.train.batch_size,
                                      log=self.log)
            procs.barrier()
        return self.prefix_cache

    # ------------------------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "adapters": self.adapters.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "schedule": self.schedule.state_dict(),
            "sampler": self.sampler.state_dict(),
            **rng_states(self.processes),  # every process's, gathered (a collective with several processes)
            "bad_steps": self.bad_steps,
            "started_at": self.started_at,
            "config": self.cfg.to_dict(),
        }

    def save_checkpoint(self) -> Path:
        """The main process writes what every process needs (each one's RNG state included)."""
        state = self.state_dict()  # collective with several processes: every process gathers
        path = checkpoint_path(self.run_folder.checkpoints, self.step)
        if self.processes.is_main:
            path = save_checkpoint(self.run_folder.checkpoints, self.step, state, self.cfg.train.keep_checkpoints)
        self.processes.barrier()  # nobody reads or resumes from a checkpoint still being written
        return path

    def _resume(self) -> None:
        path = self.resume_from
        if path is None:
            return
        state = self.processes.broadcast_state(load_checkpoint(path) if self.processes.is_main else None)
        if "adapters" not in state:
            raise UserError(f"train.resume: {path} was written by an older tc-lite (no adapter state); start a new "
                            "output.dir, or resume it with the tc-lite version that wrote it")
        self.adapters.load_state_dict(state["adapters"], str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.scaler.load_state_dict(state["scaler"])
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.load_state_dict(state["sampler"])
        restore_rng_states(state, self.processes, path)
        self.bad_steps = state["bad_steps"]
        self.started_at = state.get("started_at")
        self.step = state["step"]
        if self.processes.is_main:
            self.run_folder.truncate_after(self.step)
        self.log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------------------------------------ loop

    def train(self) -> Path:
        cfg = self.cfg
        self.started_at = self.processes.broadcast_object(self.started_at or time.time())
        main = self.processes.is_main  # the one writer: metrics, bar, samples, eval, checkpoints, export, plots
        metrics = MetricsLog(self.out / "metrics.jsonl") if main else NullMetricsLog()
        bar = ProgressBar(total=cfg.train.steps, initial=self.step, enabled=cfg.logging.progress and main)
        if cfg.logging.sample_every and self.step == 0:
            self.save_samples(0)
        self.evaluate(self.step)  # step 0: the base model's held-out reward, the bar to beat
        t_last = time.perf_counter()
        with self.stop.installed():
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
                stop_early = self.processes.broadcast_object(self.evaluate(self.step))
                stopping = self.processes.any(self.stop.signum is not None)  # a signal to any process stops all
                every = cfg.train.checkpoint_every
                if stopping or (every and self.step % every == 0 and self.step < cfg.train.steps):
                    path = self.save_checkpoint()
                if stopping:
                    bar.close()
                    metrics.close()
                    raise Interrupted(f"stopped at step {self.step}; checkpoint {path}. "
                                      f"Run the same command again to resume (train.resume: auto).",
                                      self.stop.signum or signal.SIGTERM)
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
        self.processes.barrier()  # every process ends with the run's files written
        self.log(f"done: {path}")
        return path

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (grad_accum micro-steps of the `TrainStep`); returns its metrics record."""
        cfg, trainer = self.cfg, self.trainer
        stats = StepStats()
        try:
            for micro in range(cfg.train.grad_accum):
                trainer.micro_step(self._my_prompts(next(self.sampler)),
                                   step_generator(cfg.train.seed, self.step, micro), stats)
        except torch.OutOfMemoryError:
            raise UserError(out_of_memory_message(cfg)) from None
        self.adapters.drop_grads(active_adapters(cfg, self.adapters, self.step))  # unet.stage / unet.start_step
        self.processes.average_gradients(self.params)  # data parallel: the global batch's mean gradient
        norm, applied = trainer.optimizer_step()
        self.step += 1
        self._global_stats(stats)
        self.bad_steps = 0 if trainer.step_was_good(stats.loss, applied) else self.bad_steps + 1
        if self.bad_steps >= cfg.train.max_bad_steps:
            raise UserError(
                f"{self.bad_steps} consecutive steps had a non-finite loss or gradient (last at step {self.step}); "
                "likely causes: optim.lr too high, fp16 overflow (try memory.precision=bf16 or fp32), or a reward "
                "returning extreme values. The last good checkpoint is kept in " + str(self.run_folder.checkpoints))
        record = {"step": self.step, "loss": stats.loss, "reward": stats.reward,
                  **{f"reward/{k}": v for k, v in stats.parts.items()},
                  "grad_norm": norm, "skipped": not applied, "bad_steps": self.bad_steps,
                  "lr": self.schedule.get_last_lr()[0], "grad_steps": stats.grad_steps}
        if stats.drift is not None:
            record["drift"] = stats.drift
        groups = self.optimizer.param_groups
        if len({g["lr"] for g in groups}) > 1:  # per-encoder learning rates (lora.per_encoder): log each
            record |= {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(groups)}
        if self.precision.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if self.processes.count > 1:
            record["global_batch"] = self.global_batch
        return record

    def _global_stats(self, stats: StepStats) -> None:
        """The step's loss and rewards over the global batch (each process measured its own share)."""
        if self.processes.count == 1:
            return
        local = {"loss": stats.loss, "reward": stats.reward, **{f"part/{k}": v for k, v in stats.parts.items()}}
        if stats.drift is not None:
            local["drift"] = stats.drift
        mean = self.processes.mean(local)
        stats.loss, stats.reward = mean["loss"], mean["reward"]
        stats.parts = {k: mean[f"part/{k}"] for k in stats.parts}
        stats.drift = mean.get("drift")

    def evaluate(self, step: int) -> bool:
        """Held-out evaluation when `eval.every` says so (see tc_lite.tracking); True when early stopping says stop.

        A new best is also exported as `<name>_best.safetensors` when early stopping is on, so stopping after
        `eval.patience` worse evaluations still leaves the best weights (the final file holds the last ones).
        """
        record = self.evaluator.maybe_evaluate(step, self.render, self.rewards)
        if record is not None:
            self.tracker.log_scalars(record, step, prefix="eval/")
            if record["best"] and step > 0 and self.cfg.eval.patience:
                self.export(self.out / f"{self.cfg.output.name}_best.safetensors")
        return self.evaluator.should_stop

    def write_plots(self) -> None:
        """Reward/loss curves to <out>/plots (also `python -m tc_lite plot`); a plot never fails a finished run."""
        from .plots import plot_run

        if not self.processes.is_main:
            return
        try:
            plot_run(self.out)
        except Exception as e:  # noqa: BLE001
            self.log(f"plots skipped: {e}")

    # ------------------------------------------------------------------------------------------------ outputs

    @torch.no_grad()
    def render(self, prompts: list[str], seeds: list[int], tuned: bool = True) -> torch.Tensor:
        """Images [N,3,H,W] for every (prompt, seed), with the tuned encoder on all steps (what users will get),
        adapters in eval mode (no LoRA dropout); `tuned=False` renders the base model."""
        neg = self.cfg.sampling.negative_prompt
        with self.adapters.eval_mode(), contextlib.nullcontext() if tuned else self.adapters.original():
            # every adapter off for the base model: its encoders' outputs are then the original ones
            cond, uncond = self.encoder.tuned(list(prompts)), self.encoder.uncond_tuned(neg)
            return self.renderer.render(cond, uncond, seeds)

    def save_samples(self, step: int) -> Path | None:
        if not self.processes.is_main:
            return None
        lg = self.cfg.logging
        images = self.render(lg.sample_prompts, lg.sample_seeds)
        path = self.out / "samples" / f"step_{step:06d}.png"
        grid = make_grid(images, rows=len(lg.sample_prompts), labels=lg.sample_prompts, path=path)
        self.tracker.log_image("samples", grid, step)
        return path

    def export(self, path: Path | None = None) -> Path:
        """Write the run's result (see `tc_lite.export.trained`): the kohya LoRA, or the full encoder."""
        from .export.trained import export_trained, result_paths

        if not self.processes.is_main:  # where the main process writes it
            kohya, full = result_paths(self.cfg, self.family, path=path)
            return kohya or next(iter(full.values()))
        return export_trained(self.adapters, self.family, self.cfg, steps=self.step, precision=self.precision.name,
                              started_at=self.started_at, path=path, log=self.log, processes=self.processes.count)


def run_training(cfg: Config, log: Callable[[str], None] = print) -> Path:
    recipe = Recipe(cfg, log)
    try:
        return recipe.setup().train()
    except RuntimeError as e:  # data parallel: another process died (the launcher stops the rest)
        if recipe.processes.lost_peer(e):
            raise UserError(f"another process of this run stopped ({str(e)[:200]}); stopping too. The newest "
                            f"checkpoint in {recipe.run_folder.checkpoints} is kept: fix what stopped it (its own "
                            "message above) and rerun the same launch command") from None
        raise
    finally:
        recipe.processes.close()
