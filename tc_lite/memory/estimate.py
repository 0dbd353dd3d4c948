"""Peak GPU memory of one training step, computed on a CPU in seconds, from shapes alone.

How: the models the preset names are built on 'meta' from their configs (no weights, no download), their
parameters are swapped for fake tensors in the training dtypes (`FakeTensorMode`: shapes and dtypes, no data),
wired as `Recipe.setup` wires them, and then the recipe's *own* `TrainStep.micro_step` and `optimizer_step` run on
them -- `PromptEncoder`, `Denoiser.run` with its checkpointed grad steps, `decode` with per-block VAE checkpointing,
`RewardMix` with its in-mix backward, the backward of −reward, clipping and the optimizer step -- under
`MemoryTracker`, which counts every storage autograd, the caller or the allocator keeps alive. A change to the
step's code changes the estimate with it. Fake kernels cost no arithmetic, so a full SD1.5 step traces in ~10 s
of CPU time, where DESIGN §4's MemTracker runs took about two minutes.

What the trace does differently from a real step, and why the peak is the same:

* **The no-grad prefix is shortened** to one step. Under `no_grad` nothing survives a step but the latents, so
  every prefix step has the same peak (tests/test_memory.py checks T=8 against T=20).
* **At most three grad steps are traced.** From the second grad step on, every step keeps the same tensors for
  the backward (with `checkpoint_unet`, just its inputs; without, its whole graph); the bytes the third step adds
  are added once per untraced step to every phase during which all grad steps' tensors are alive (grad steps,
  decode, reward and their backward). Exact: tests/test_memory.py compares it with tracing all K steps.
* **The scheduler is a stand-in** with the same latent-sized arithmetic (a DDIM/Euler step is a few tensors of
  B×4×h×w floats, kilobytes): diffusers' schedulers index their tables with tensor values, which fake tensors
  cannot do.
* **Steady state is set up explicitly**: the optimizer state exists before the step (warm-up on zero gradients),
  and with gradient accumulation the gradients already exist (a micro-step in the middle of accumulation).
* **CUDA is emulated on the CPU**: fake 'cpu' tensors stand for GPU memory and fake 'meta' tensors for host
  memory (offloaded reward weights); SDPA then takes the CPU flash kernel, whose O(N) memory matches the fused
  CUDA kernels; autocast casts as CUDA autocast does (`cuda_autocast_policy`: norms and softmax in fp32); every
  allocation is rounded to the CUDA allocator's 512-byte blocks; AdamW runs its CUDA default (`foreach`).

Not modelled (add them when sizing a card; `plan.py` does): the CUDA context and kernels (~0.3-0.6 GiB, outside
`torch.cuda.max_memory_allocated`), cuBLAS/cuDNN workspaces and allocator fragmentation.
"""

from __future__ import annotations

import contextlib
import time
import warnings
import dataclasses
from typing import Any

import torch
from torch import nn

from tc_lite.config import Config
from tc_lite.errors import UserError
from tc_lite.memory.fake_models import (
    ShapeScheduler,
    _Bnb8bitStateStandIn,
    _ClipReward,
    _materialize,
    _MetaModels,
    _module_bytes,
    _nbytes,
    _PhasedRewards,
    _ShapePrefix,
    _stream_layer_by_layer,
    _Target,
    bnb_adamw8bit_state_bytes,
)
from tc_lite.memory.result import PHASES, GiB, MemoryEstimate
from tc_lite.memory.setting import DTYPE_NAMES, describe_setting
from tc_lite.memory.tracker import MemoryTracker, cuda_autocast_policy
from tc_lite.precision import vae_dtype
from tc_lite.step import FreshNoise, StepStats, TrainStep

__all__ = ["GiB", "MemoryEstimate", "bnb_adamw8bit_state_bytes", "estimate_memory", "_materialize"]
MAX_TRACED_PREFIX = 1  # no-grad steps actually traced; see the module docstring
MAX_TRACED_GRAD_STEPS = 3  # grad steps actually traced; the rest are extrapolated (see the module docstring)
# Phases during which the saved tensors of every grad step are alive (they get the extrapolated K - traced steps).
_HOLD_GRAD_STEPS = ("grad steps", "decode", "reward", "decode backward", "grad steps backward")


# --------------------------------------------------------------------------------------------------- the step


class _Step:
    """The fake models and training objects of one configuration, wired as `Recipe.setup` wires them, around the
    recipe's own `TrainStep`."""

    def __init__(self, cfg: Config, meta: _MetaModels, target: _Target, tracker: MemoryTracker):
        from tc_lite.conditioning import PromptEncoder
        from tc_lite.optim import build_optimizer
        from tc_lite.rewards import RewardMix

        self.cfg, self.target, self.tracker = cfg, target, tracker
        self.notes: list[str] = list(meta.notes)
        self.family, self.comps, self.adapters = meta.family, meta.components, meta.adapters
        dt = target.dtype
        memo: dict[int, Any] = {}
        encoders = meta.family.encoders(self.comps)
        held = {name: m for a in self.adapters for name, m in a.held_modules().items()}
        self.vae_dtype = vae_dtype(cfg.memory, self.comps.vae, dt)  # as the recipe keeps it (memory.vae_precision)
        with tracker.kind("parameters"):
            for m in (self.comps.unet, *encoders.values(), *held.values()):
                _materialize(m, dt, "cpu", memo)
            _materialize(self.comps.vae, self.vae_dtype, "cpu", memo)
        self.resident = self._resident(encoders, held)
        if self.vae_dtype != dt:
            self.notes.append(f"VAE kept and decoded in {DTYPE_NAMES[self.vae_dtype]} (memory.vae_precision="
                              f"{cfg.memory.vae_precision}): its weights and decode activations at twice the bytes"
                              + ("; precision auto is estimated as fp16: a bf16 card decodes it in bf16, for less"
                                 if cfg.memory.precision == "auto" and cfg.memory.vae_precision == "auto" else ""))
        self.encoder = PromptEncoder(meta.family, self.comps, self.adapters,
                                     size=(cfg.sampling.height, cfg.sampling.width))
        self.params = self.adapters.parameters()
        self.rewards = RewardMix(self._place_rewards(meta.rewards, dt, memo), device="cpu", dtype=dt, offload="none")
        if cfg.rewards.offload == "sequential":
            for _, reward, _ in self.rewards.entries:
                if isinstance(reward.module(), _ClipReward):
                    _stream_layer_by_layer(reward.module(), tracker)
            self.rewards.offload = "sequential"  # scoring windows move nothing; the hooks below do
        if cfg.optim.name == "adamw8bit":
            self.optimizer: torch.optim.Optimizer = _Bnb8bitStateStandIn(self.params)
        else:
            self.optimizer = build_optimizer(self.adapters.param_groups(), cfg.optim)  # as the recipe builds it
            if target.cuda:
                for group in self.optimizer.param_groups:  # torch's default for CUDA tensors
                    group["foreach"] = True

    def _resident(self, encoders: dict[str, nn.Module], held: dict[str, nn.Module]) -> dict[str, int]:
        """What stays on the device all run, by item: frozen weights apart from each LoRA's fp32 factors."""
        adapted = {a.key: a for a in self.adapters}
        unet_lora = adapted.get("unet")
        lora_bytes = {key: _nbytes(a.parameters()) for key, a in adapted.items() if a.kind == "lora"}
        dt = self.target.dtype
        vae_label = "vae (encoder and decoder)" + ("" if self.vae_dtype == dt else f", {DTYPE_NAMES[self.vae_dtype]}")
        resident = {"unet": _module_bytes(self.comps.unet) - lora_bytes.get("unet", 0),
                    vae_label: _module_bytes(self.comps.vae)}
        one = len(encoders) == 1 and unet_lora is None  # "lora (fp32)" is the text encoder's when it is the only one
        for key, encoder in encoders.items():
            te = "text encoder" if len(encoders) == 1 else f"text encoder {key}"
            a = adapted.get(key)
            if a is None:
                resident[f"{te} (frozen)"] = _module_bytes(encoder)
            elif a.kind == "lora":
                resident[te] = _module_bytes(a.module()) - lora_bytes[key]
                resident["lora (fp32)" if one else f"lora {key} (fp32)"] = lora_bytes[key]
            else:
                resident[f"{te} (fp32, trained)"] = _module_bytes(a.module())
        if unet_lora is not None:
            resident["lora unet (fp32)"] = lora_bytes["unet"]
            u = self.cfg.unet
            self.notes.append(f"UNet LoRA r={u.rank} on {len(unet_lora.parameters()) // 2} projections: fp32 factors "
                              "with their gradients and AdamW state; the UNet runs natively in its dtype (peft casts "
                              "to and from the fp32 branch), whose backward keeps each adapted layer's input in fp32")
            if u.drift_weight > 0:
                self.notes.append("unet.drift_weight: one more no-grad UNet call per grad step (the LoRA off), "
                                  "counted in 'grad steps'")
        for name, m in held.items():
            resident[name] = _module_bytes(m)
        return resident

    def _place_rewards(self, entries: list[tuple[str, Any, float]], dtype: torch.dtype,
                       memo: dict[int, Any]) -> list[tuple[str, Any, float]]:
        home = "cpu" if self.cfg.rewards.offload == "none" else "meta"  # fake 'meta' = host RAM
        for label, net, _ in entries:
            if not isinstance(net, _ClipReward):
                continue
            with self.tracker.kind("parameters"):
                _materialize(net, dtype, home, memo)
            net.register_forward_pre_hook(lambda mod, args: self.tracker.tag(list(mod.parameters()), "parameters"))
            nbytes = _module_bytes(net)
            where = {"none": "on the device", "cpu": "in host RAM, on the device only while scoring",
                     "sequential": "in host RAM, streamed to the device layer by layer while scoring"}[
                self.cfg.rewards.offload]
            self.resident[f"reward {label} ({net.shape.clip})"] = nbytes if home == "cpu" else 0
            self.notes.append(f"reward {label}: {net.shape.clip}, {nbytes / GiB:.2f} GiB of weights {where}")
        return entries

    def warm_up(self) -> None:
        """Steady state: optimizer state exists; mid-accumulation gradients exist (see the module docstring)."""
        tr = self.tracker
        with tr.phase("setup"), torch.no_grad():
            with tr.kind("gradients"):
                for p in self.params:
                    p.grad = torch.zeros_like(p)
            with tr.kind("optimizer"):
                self.optimizer.step()
            if self.target.cuda:  # torch keeps AdamW's step counters on the host for foreach/for-loop CUDA runs
                for state in self.optimizer.state.values():
                    if isinstance(state.get("step"), torch.Tensor):
                        self.tracker.forget(state["step"])
            if self.cfg.train.grad_accum == 1:
                self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, grad_steps: int) -> TrainStep:
        """The recipe's `TrainStep` on the fake objects, for the user's config with the no-grad prefix shortened
        and K set to the traced number of grad steps (see the module docstring; the random K draw would read a
        fake value, so K is fixed)."""
        from tc_lite.precision import Precision

        s = self.cfg.sampling
        prefix = min(s.steps - s.grad_steps, MAX_TRACED_PREFIX)
        traced = dataclasses.replace(s, steps=prefix + grad_steps, grad_steps=grad_steps, grad_steps_min=None)
        cfg = dataclasses.replace(self.cfg, sampling=traced)
        precision = Precision(torch.device("cpu"), self.target.precision, self.target.dtype,
                              torch.amp.GradScaler("cpu", enabled=False))
        unet, vae = self.comps.unet, self.comps.vae
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        channels = unet.config.in_channels
        latents: Any = (_ShapePrefix(prefix, channels, vae, s) if s.prefix_cache != "none"
                        else FreshNoise((channels, s.height // f, s.width // f), torch.device("cpu")))
        from tc_lite.adapters import drift_penalty
        from tc_lite.sampling import Denoiser

        denoiser = Denoiser(unet, ShapeScheduler(s.scheduler), precision.autocast,
                            drift=drift_penalty(cfg, self.adapters))  # as the recipe builds it
        return TrainStep(cfg, encoder=self.encoder, denoiser=denoiser,
                         vae=vae, rewards=_PhasedRewards(self.rewards, self.tracker), latents=latents,
                         params=self.params, optimizer=self.optimizer,
                         schedule=torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0),
                         precision=precision, draw_grad_steps=lambda gen: grad_steps)

    def run(self, grad_steps: int) -> int:
        """One micro-step with `grad_steps` grad steps and the optimizer step, through `TrainStep.micro_step` and
        `TrainStep.optimizer_step`. Returns the bytes each grad step leaves alive until the backward."""
        tr = self.tracker
        step = self.train_step(grad_steps)
        state = {"backward": False}
        starts: list[int] = []  # live bytes as each grad step's UNet call begins

        def unet_phase(module: nn.Module, args: Any) -> None:
            if not torch.is_grad_enabled():  # the prefix, or a grad step's drift call (unet.drift_weight)
                tr.enter_phase("grad steps" if starts else "sampling")
            elif state["backward"]:
                tr.enter_phase("grad steps backward")
            else:
                tr.enter_phase("grad steps")
                starts.append(tr.live)

        def te_output(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0]  # gradient reaches the encoder's output once every UNet call's backward is done
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda g: tr.enter_phase("encode backward"))

        def vae_phase(module: nn.Module, args: Any) -> None:
            if state["backward"]:
                return
            tr.enter_phase("decode")
            if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
                args[0].register_hook(lambda g: tr.enter_phase("grad steps backward"))

        trained = [a.module() for a in self.adapters if a.part == "text_encoder"]  # the UNet LoRA's is the UNet
        hooks = [
            self.comps.unet.register_forward_pre_hook(unet_phase),
            self.comps.vae.post_quant_conv.register_forward_pre_hook(vae_phase),
            *[te.register_forward_pre_hook(lambda m, a: None if state["backward"] else tr.enter_phase("encode"))
              for te in trained],
            *[te.register_forward_hook(te_output) for te in trained],
            *[p.register_post_accumulate_grad_hook(lambda p: tr.tag(p.grad, "gradients")) for p in self.params],
        ]
        step.rewards.on_backward = lambda: state.update(backward=True)
        try:
            with tr.phase("encode"):
                step.micro_step(["a prompt"] * self.cfg.train.batch_size, torch.Generator().manual_seed(0),
                                StepStats())
        finally:
            for h in hooks:
                h.remove()
        with tr.phase("optimizer"), tr.kind("optimizer"):
            step.optimizer_step()
        # The first grad step starts from a latent without a graph and keeps less; from the second on every step
        # keeps the same bytes, which is what the untraced steps add.
        return starts[2] - starts[1] if len(starts) >= 3 else 0


# --------------------------------------------------------------------------------------------------- entry point


class _FakeStepTracker(MemoryTracker):
    """The tracker, plus an answer for Python reads of a fake tensor's value (`bool(torch.isfinite(x).all())`,
    `float(norm)`), which have none under FakeTensorMode. The step's code only reads values to check that they
    are finite, so the answer is "yes": True, 1. (One dispatch layer instead of two: the trace is dispatch-bound.)"""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            dtype = args[0].dtype
            return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)
        return super().__torch_dispatch__(func, types, args, kwargs)


def _extrapolate(tracker: MemoryTracker, extra: int) -> None:
    """Add the saved tensors of the grad steps not traced to every phase during which they would be alive."""
    if extra <= 0:
        return
    for name in _HOLD_GRAD_STEPS:
        record = tracker.phases.get(name)
        if record is not None:
            record.peak += extra
            record.kinds = {**record.kinds, "activations": record.kinds.get("activations", 0) + extra}
    top = max(tracker.phases.values(), key=lambda r: r.peak)
    tracker.peak, tracker.peak_phase, tracker.peak_kinds = top.peak, top.name, dict(top.kinds)


def estimate_memory(cfg: Config, *, round_to: int | None = None, exact: bool = False, fp32_norms: bool = True,
                    attention_backend: str | None = None) -> MemoryEstimate:
    """Estimate the peak device memory of one steady-state training step of `cfg` (no GPU, no weights).

    `round_to`: allocation granularity (default 512 bytes for a CUDA target, 1 for a CPU one). `exact`: trace every
    grad step instead of three plus extrapolation (slower for large K; the two agree, see tests/test_memory.py).
    For comparisons only: `fp32_norms=False` drops CUDA autocast's fp32 norms (CPU autocast semantics, as in
    DESIGN §4's trace; since the frozen UNet and VAE run natively, only the text encoder's norms are affected);
    `attention_backend="math"` forces unfused attention.
    """
    t0 = time.perf_counter()
    s = cfg.sampling
    if s.grad_steps > s.steps:
        raise UserError(f"sampling.grad_steps: {s.grad_steps} > sampling.steps ({s.steps})")
    from tc_lite.families import family_for

    target = _Target.of(cfg)
    family = family_for(cfg.model)
    arch = family.architecture(cfg)
    tracker = _FakeStepTracker("cpu", round_to if round_to is not None else (512 if target.cuda else 1))
    policy = cuda_autocast_policy() if target.cuda and fp32_norms else contextlib.nullcontext()
    if attention_backend is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}[attention_backend]
        policy_outer: contextlib.AbstractContextManager = sdpa_kernel([backend])
    else:
        policy_outer = contextlib.nullcontext()
    meta = _MetaModels.build(cfg, family, arch)
    from torch._subclasses.fake_tensor import FakeTensorMode

    traced = s.grad_steps if exact else min(s.grad_steps, MAX_TRACED_GRAD_STEPS)
    with FakeTensorMode(allow_non_fake_inputs=True), tracker, policy, policy_outer, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. float() of a fake loss; they speak of the trace, not of the run
        step = _Step(cfg, meta, target, tracker)
        step.warm_up()
        per_step = step.run(traced)
        optimizer_state = sum(_nbytes([t]) for st in step.optimizer.state.values() for name, t in st.items()
                              if isinstance(t, torch.Tensor) and not (target.cuda and name == "step"))
        if isinstance(step.optimizer, _Bnb8bitStateStandIn):
            optimizer_state = bnb_adamw8bit_state_bytes(step.params)
        gradients = sum(p.numel() * 4 for p in step.params)
    _extrapolate(tracker, (s.grad_steps - traced) * per_step)
    phases = [tracker.phases[name] for name, _ in PHASES if name in tracker.phases]
    k_min = s.grad_steps_min
    notes = [*arch.notes, *step.notes]
    if k_min is not None:
        notes.append(f"random truncation: estimated at the largest K ({s.grad_steps}); "
                     + ("memory is flat in K with checkpoint_unet" if cfg.memory.checkpoint_unet
                        else f"K={k_min} needs less"))
    if not target.cuda:
        notes.append("memory.device=cpu: this is CPU RAM for the step, in the preset's precision")
    setting = describe_setting(cfg, family, target.precision, target.cuda, step.vae_dtype)
    return MemoryEstimate(
        peak=tracker.peak, peak_phase=tracker.peak_phase, peak_kinds=tracker.peak_kinds, phases=phases,
        resident=step.resident, optimizer_state=optimizer_state, gradients=gradients, setting=setting,
        architecture=arch.source, notes=notes, seconds=time.perf_counter() - t0)
