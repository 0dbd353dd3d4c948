"""Peak GPU memory of one training step, computed on a CPU in seconds, from shapes alone.

How: the models the preset names are built on 'meta' from their configs (no weights, no download), their
parameters are swapped for fake tensors in the training dtypes (`FakeTensorMode`: shapes and dtypes, no data),
wired as `Recipe.setup` wires them, and then the Recipe's *own* `micro_step` and `optimizer_step` run on them --
`TextConditioner`, `Denoiser.run` with its checkpointed grad steps, `decode` with per-block VAE checkpointing,
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tc_lite.config import Config
from tc_lite.errors import UserError
from tc_lite.memory.architectures import resolve_architecture
from tc_lite.memory.fake_models import (
    _Bnb8bitStateStandIn,
    _ClipReward,
    _materialize,
    _MetaModels,
    _module_bytes,
    _nbytes,
    _stream_layer_by_layer,
    _StubTokenizer,
    _Target,
    bnb_adamw8bit_state_bytes,
)
from tc_lite.memory.tracker import KINDS, MemoryTracker, PhasePeak, cuda_autocast_policy

GiB = 2**30
MAX_TRACED_PREFIX = 1  # no-grad steps actually traced; see the module docstring
MAX_TRACED_GRAD_STEPS = 3  # grad steps actually traced; the rest are extrapolated (see the module docstring)
# Phases during which the saved tensors of every grad step are alive (they get the extrapolated K - traced steps).
_HOLD_GRAD_STEPS = ("grad steps", "decode", "reward", "decode backward", "grad steps backward")

# Phases in step order, with the coarse group the report sums them into.
PHASES: tuple[tuple[str, str], ...] = (
    ("encode", "encode"),
    ("sampling", "sampling"),
    ("grad steps", "grad steps"),
    ("decode", "decode"),
    ("reward", "reward"),
    ("decode backward", "decode"),
    ("grad steps backward", "grad steps"),
    ("encode backward", "encode"),
    ("optimizer", "optimizer"),
)


# --------------------------------------------------------------------------------------------------- result


@dataclass
class MemoryEstimate:
    """The estimate for one configuration. Byte counts are ints; `peak` is what max_memory_allocated would show."""

    peak: int
    peak_phase: str
    peak_kinds: dict[str, int]
    phases: list[PhasePeak]
    resident: dict[str, int]  # exact (unrounded) bytes that live on the device for the whole run, by item
    optimizer_state: int  # exact bytes of optimizer state on the device
    gradients: int  # exact bytes of the trainable parameters' gradients
    setting: dict[str, Any]
    architecture: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def peak_gib(self) -> float:
        return self.peak / GiB

    def phase(self, name: str) -> PhasePeak:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(name)

    def groups(self) -> dict[str, int]:
        """Peak per coarse phase (sampling, grad steps, decode, reward, optimizer, encode): forward and backward."""
        out: dict[str, int] = {}
        for p in self.phases:
            group = dict(PHASES).get(p.name, p.name)
            out[group] = max(out.get(group, 0), p.peak)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak,
            "peak_gib": round(self.peak_gib, 3),
            "peak_phase": self.peak_phase,
            "peak_kinds_bytes": self.peak_kinds,
            "phases": [{"phase": p.name, "peak_bytes": p.peak, "peak_gib": round(p.peak / GiB, 3),
                        "kinds_bytes": p.kinds} for p in self.phases],
            "resident_bytes": self.resident,
            "optimizer_state_bytes": self.optimizer_state,
            "gradient_bytes": self.gradients,
            "setting": self.setting,
            "architecture": self.architecture,
            "notes": self.notes,
            "seconds": round(self.seconds, 2),
        }

    def format(self) -> str:
        """The table `bench memory` prints."""
        s = self.setting
        lines = [
            f"estimated peak GPU memory of one training step: {self.peak_gib:.2f} GiB (in phase '{self.peak_phase}')",
            (f"  {s['height']}x{s['width']}, batch {s['batch_size']}, T={s['steps']} K={s['grad_steps']}, "
            f"CFG {s['guidance_scale']:g}, {s['precision']}, {s['lora']}, attention {s['attention']}, "
            f"checkpoint unet={s['checkpoint_unet']} vae={s['checkpoint_vae']}, prefix cache {s['prefix_cache']}, "
            f"rewards {', '.join(s['rewards']) or 'none'} (offload {s['offload']})"),
            f"  architecture: {self.architecture}",
            "",
            f"  {'phase':<22}{'peak GiB':>9}   " + "".join(f"{k:>13}" for k in KINDS),
        ]
        for p in self.phases:
            mark = " <" if p.name == self.peak_phase else ""
            kinds = "".join(f"{p.kinds.get(k, 0) / GiB:>13.3f}" for k in KINDS)
            lines.append(f"  {p.name:<22}{p.peak / GiB:>9.3f}   {kinds}{mark}")
        lines += ["", "  resident on the device (exact):"]
        lines += [f"    {name:<30}{b / GiB:>8.3f} GiB  ({b:,} bytes)" for name, b in self.resident.items()]
        lines.append(f"    {'optimizer state':<30}{self.optimizer_state / GiB:>8.3f} GiB  ({self.optimizer_state:,} bytes)")
        lines.append(f"    {'gradients (trainable)':<30}{self.gradients / GiB:>8.3f} GiB  ({self.gradients:,} bytes)")
        lines += ["", "  not included: the CUDA context (~0.3-0.6 GiB), cuBLAS/cuDNN workspaces, allocator fragmentation"]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  ({self.seconds:.1f} s)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- stand-ins


class ShapeScheduler:
    """DDIM/Euler-shaped arithmetic with Python-float coefficients (see the module docstring)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.init_noise_sigma = 1.0 if kind == "ddim" else 14.6
        self.timesteps: list[int] = []

    def set_timesteps(self, n: int, device: Any = None) -> None:
        self.timesteps = [999 - i * (1000 // n) for i in range(n)]

    def set_begin_index(self, index: int) -> None:
        pass

    def scale_model_input(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        return x if self.kind == "ddim" else x / 2.0

    def step(self, eps: torch.Tensor, t: Any, latents: torch.Tensor, eta: float = 0.0, generator: Any = None,
             return_dict: bool = False) -> tuple[torch.Tensor]:
        if self.kind == "ddim":
            x0 = (latents - 0.5 * eps) / 0.8
            return (0.9 * x0 + 0.4 * eps,)
        return (latents + 0.1 * eps,)  # Euler: sample + dt * derivative (eps-parameterised)


# --------------------------------------------------------------------------------------------------- the step


class _Step:
    """The fake models and training objects of one configuration, wired exactly as `Recipe.setup` wires them."""

    def __init__(self, cfg: Config, meta: _MetaModels, target: _Target, tracker: MemoryTracker):
        from tc_lite.lora import lora_disabled, trainable_parameters
        from tc_lite.optim import build_optimizer
        from tc_lite.rewards import RewardMix
        from tc_lite.sampling import TextConditioner

        self.cfg, self.target, self.tracker = cfg, target, tracker
        self.notes: list[str] = list(meta.notes)
        dt = target.dtype
        memo: dict[int, Any] = {}
        unet, vae, te, original = meta.unet, meta.vae, meta.te, meta.original
        with tracker.kind("parameters"):
            for m in (unet, vae, te, original):
                if m is not None:
                    _materialize(m, dt, "cpu", memo)
        self.resident: dict[str, int] = {"unet": _module_bytes(unet), "vae (encoder and decoder)": _module_bytes(vae)}
        trainable = [p for p in te.parameters() if p.requires_grad]
        if cfg.lora.mode == "lora":
            self.resident["text encoder"] = _module_bytes(te) - _nbytes(trainable)
            self.resident["lora (fp32)"] = _nbytes(trainable)
            original_ctx = lambda: lora_disabled(te)
        else:
            self.resident["text encoder (fp32, trained)"] = _module_bytes(te)
            self.resident["original text encoder copy"] = _module_bytes(original)  # type: ignore[arg-type]
            original_ctx = contextlib.nullcontext
        self.unet, self.vae, self.te = unet, vae, te
        self.conditioner = TextConditioner(_StubTokenizer(), te, torch.device("cpu"), original=original_ctx,
                                           original_encoder=original)
        self.params = trainable_parameters(te)
        self.rewards = RewardMix(self._place_rewards(meta.rewards, dt, memo), device="cpu", dtype=dt, offload="none")
        if cfg.rewards.offload == "sequential":
            for _, reward, _ in self.rewards.entries:
                if isinstance(reward.module(), _ClipReward):
                    _stream_layer_by_layer(reward.module(), tracker)
            self.rewards.offload = "sequential"  # scoring windows move nothing; the hooks below do
        if cfg.optim.name == "adamw8bit":
            self.optimizer: torch.optim.Optimizer = _Bnb8bitStateStandIn(self.params)
        else:
            self.optimizer = build_optimizer(self.params, cfg.optim)
            if target.cuda:
                for group in self.optimizer.param_groups:  # torch's default for CUDA tensors
                    group["foreach"] = True

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

    # ------------------------------------------------------------------------------------------------ the step

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

    def recipe(self, grad_steps: int) -> Any:
        """A `Recipe` holding the fake objects, so its own `micro_step`/`optimizer_step` code runs.

        Its config is the user's with the no-grad prefix shortened and K set to the traced number of grad steps
        (see the module docstring); `draw_grad_steps` returns that K (its random draw reads a fake value).
        """
        import dataclasses

        from tc_lite.models.components import SDComponents
        from tc_lite.precision import Precision
        from tc_lite.sampling import Denoiser
        from tc_lite.train import Recipe

        s = self.cfg.sampling
        prefix = min(s.steps - s.grad_steps, MAX_TRACED_PREFIX)
        traced = dataclasses.replace(s, steps=prefix + grad_steps, grad_steps=grad_steps, grad_steps_min=None)
        cfg = dataclasses.replace(self.cfg, sampling=traced)
        r = Recipe.__new__(Recipe)
        Recipe.__init__(r, cfg, log=lambda msg: None)
        r.precision = Precision(torch.device("cpu"), self.target.precision, self.target.dtype,
                                torch.amp.GradScaler("cpu", enabled=False))
        r.components = SDComponents(tokenizer=_StubTokenizer(), text_encoder=self.te, unet=self.unet, vae=self.vae,
                                    scheduler=None)
        r.text_encoder, r.conditioner, r.params = self.te, self.conditioner, self.params
        r.rewards = _PhasedRewards(self.rewards, self.tracker)
        r.optimizer = self.optimizer
        r.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        r.denoiser = Denoiser(self.unet, ShapeScheduler(s.scheduler), r.precision.autocast)
        r.step, r.bad_steps = 0, 0
        r.draw_grad_steps = lambda gen: grad_steps
        with torch.no_grad():
            r.uncond_base = self.conditioner.base([s.negative_prompt])
        if s.prefix_cache != "none":  # Recipe.generate_latents then starts from the cached latent
            r.prefix_cache = _ShapePrefix(prefix, self.unet.config.in_channels, self.vae, s)
        return r

    def run(self, grad_steps: int) -> int:
        """One micro-step with `grad_steps` grad steps and the optimizer step, through `Recipe.micro_step` and
        `Recipe.optimizer_step`. Returns the bytes each grad step leaves alive until the backward."""
        from tc_lite.train import StepStats

        tr = self.tracker
        recipe = self.recipe(grad_steps)
        state = {"backward": False}
        starts: list[int] = []  # live bytes as each grad step's UNet call begins

        def unet_phase(module: nn.Module, args: Any) -> None:
            if not torch.is_grad_enabled():
                tr.enter_phase("sampling")
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

        hooks = [
            self.unet.register_forward_pre_hook(unet_phase),
            self.vae.post_quant_conv.register_forward_pre_hook(vae_phase),
            self.te.register_forward_pre_hook(lambda m, a: None if state["backward"] else tr.enter_phase("encode")),
            self.te.register_forward_hook(te_output),
            *[p.register_post_accumulate_grad_hook(lambda p: tr.tag(p.grad, "gradients")) for p in self.params],
        ]
        recipe.rewards.on_backward = lambda: state.update(backward=True)
        try:
            with tr.phase("encode"):
                recipe.micro_step(["a prompt"] * self.cfg.train.batch_size, torch.Generator().manual_seed(0),
                                  StepStats())
        finally:
            for h in hooks:
                h.remove()
        with tr.phase("optimizer"), tr.kind("optimizer"):
            recipe.optimizer_step()
        # The first grad step starts from a latent without a graph and keeps less; from the second on every step
        # keeps the same bytes, which is what the untraced steps add.
        return starts[2] - starts[1] if len(starts) >= 3 else 0


class _PhasedRewards:
    """The reward mix, entered as the 'reward' phase. The gradient reaching the images marks the start of the
    backward through the decoder (and, for the UNet hook, that UNet calls from now on are recomputations)."""

    def __init__(self, mix: Any, tracker: MemoryTracker):
        self.mix, self.tracker = mix, tracker
        self.entries = mix.entries
        self.on_backward: Callable[[], None] = lambda: None

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> Any:
        self.tracker.enter_phase("reward")
        if images.requires_grad:
            images.register_hook(self._backward_starts)
        return self.mix(images, prompts)

    def _backward_starts(self, grad: torch.Tensor) -> None:
        self.on_backward()
        self.tracker.enter_phase("decode backward")


class _ShapePrefix:
    """Stands in for `PrefixCache`: the cached fp16 latent, read on the host and moved to the device."""

    def __init__(self, start: int, channels: int, vae: nn.Module, s: Any):
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        self.start, self.shape = start, (int(channels), s.height // f, s.width // f)
        self.variants = 1  # which of a prompt's noises a step draws does not change memory

    def latents(self, prompts: list[str], variant: int = 0) -> torch.Tensor:
        host = torch.empty((len(prompts), *self.shape), dtype=torch.float16, device="meta")
        return host.to("cpu").float()


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
    target = _Target.of(cfg)
    arch = resolve_architecture(cfg)
    tracker = _FakeStepTracker("cpu", round_to if round_to is not None else (512 if target.cuda else 1))
    policy = cuda_autocast_policy() if target.cuda and fp32_norms else contextlib.nullcontext()
    if attention_backend is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}[attention_backend]
        policy_outer: contextlib.AbstractContextManager = sdpa_kernel([backend])
    else:
        policy_outer = contextlib.nullcontext()
    meta = _MetaModels.build(cfg, arch)
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
    setting = {
        "height": s.height, "width": s.width, "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
        "steps": s.steps, "grad_steps": s.grad_steps, "guidance_scale": s.guidance_scale,
        "precision": target.precision + ("" if target.cuda else " (cpu)"),
        "lora": f"LoRA r={cfg.lora.rank}" if cfg.lora.mode == "lora" else "full encoder",
        "optimizer": cfg.optim.name, "attention": cfg.memory.attention,
        "checkpoint_unet": cfg.memory.checkpoint_unet, "checkpoint_vae": cfg.memory.checkpoint_vae,
        "prefix_cache": s.prefix_cache, "offload": cfg.rewards.offload,
        "rewards": [f"{label}" for label, t in cfg.rewards.terms.items() if t.weight != 0],
    }
    return MemoryEstimate(
        peak=tracker.peak, peak_phase=tracker.peak_phase, peak_kinds=tracker.peak_kinds, phases=phases,
        resident=step.resident, optimizer_state=optimizer_state, gradients=gradients, setting=setting,
        architecture=arch.source, notes=notes, seconds=time.perf_counter() - t0)
