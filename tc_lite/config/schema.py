"""The config schema: one dataclass per preset section, with defaults and value ranges (presets/base.yaml documents
every key; a test keeps the two in sync)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


def _range(lo: float | None = None, hi: float | None = None, **kw: Any) -> dict:
    return {"min": lo, "max": hi, **kw}


@dataclass
class ModelConfig:
    source: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id, diffusers folder, .safetensors file, or "tiny"
    family: Literal["auto", "sd1", "sdxl"] = "auto"  # auto: read from the source's configs or keys
    config_dir: str | None = None  # diffusers config folder for a single-file checkpoint (default: bundled SD1.5)
    allow_pickle: bool = False  # .ckpt/.pt files can run code when loaded; refuse unless this is true
    revision: str | None = None
    vae: str | None = None  # a replacement VAE (hub id, diffusers VAE folder, .safetensors file): e.g. SDXL fp16-fix


@dataclass
class EncoderOverride:
    """Per-encoder settings (`lora.per_encoder.te2`); null keeps the `lora`/`optim` section's value."""

    mode: Literal["lora", "full"] | None = None
    rank: int | None = field(default=None, metadata=_range(1, 1024))
    alpha: float | None = field(default=None, metadata=_range(1e-6))
    lr: float | None = field(default=None, metadata=_range(0.0, 1.0, exclusive_min=True))


@dataclass
class LoraConfig:
    mode: Literal["lora", "full"] = "lora"
    rank: int = field(default=8, metadata=_range(1, 1024))
    alpha: float = field(default=8.0, metadata=_range(1e-6))
    dropout: float = field(default=0.0, metadata=_range(0.0, 0.99))
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    encoders: list[str] | None = None  # which text encoders train (null: all; SD1 [te], SDXL [te1, te2])
    per_encoder: dict[str, EncoderOverride] = field(default_factory=dict)


# The UNet projections a LoRA may adapt: every transformer block's attention, feed-forward and in/out projections,
# as kohya trains them (module-path suffixes; tc_lite.unet_lora).
UNET_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
                                 "proj_out")


@dataclass
class UNetConfig:
    """A LoRA on the UNet beside (or, with `lora.encoders: []`, instead of) the text-encoder adapters."""

    mode: Literal["none", "lora"] = "none"
    rank: int = field(default=4, metadata=_range(1, 1024))
    alpha: float = field(default=4.0, metadata=_range(1e-6))
    dropout: float = field(default=0.0, metadata=_range(0.0, 0.99))
    targets: list[str] = field(default_factory=lambda: list(UNET_TARGETS))
    lr: float | None = field(default=None, metadata=_range(0.0, 1.0, exclusive_min=True))  # null: optim.lr
    stage: Literal["joint", "after_te"] = "joint"  # after_te: text encoders stop training when the UNet starts
    start_step: int = field(default=0, metadata=_range(0))  # optimizer step at which the UNet LoRA starts training
    drift_weight: float = field(default=0.0, metadata=_range(0.0))  # penalty on the tuned UNet's drift from the base


@dataclass
class SamplingConfig:
    scheduler: Literal["ddim", "euler", "dpm++"] = "ddim"
    steps: int = field(default=25, metadata=_range(1, 1000))
    grad_steps: int = field(default=5, metadata=_range(1, 1000))
    grad_steps_min: int | None = field(default=None, metadata=_range(1, 1000))
    guidance_scale: float = field(default=7.5, metadata=_range(1.0, 50.0))
    negative_prompt: str = ""
    height: int = field(default=512, metadata=_range(8, 4096))
    width: int = field(default=512, metadata=_range(8, 4096))
    eta: float = field(default=0.0, metadata=_range(0.0, 1.0))
    encoder_schedule: Literal["two_encoder", "tuned"] = "two_encoder"
    prefix_cache: Literal["none", "lazy", "prefill"] = "none"
    prefix_variants: int = field(default=1, metadata=_range(1, 64))
    prefix_cache_dir: str | None = None
    uncond: Literal["original", "tuned"] = "tuned"


@dataclass
class RewardTerm:
    type: str | None = None  # registry name or "package.module:Class"; defaults to the term's key
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)
    target: float | None = None  # hinge: no reward for going above this value (limits reward hacking)


@dataclass
class RewardsConfig:
    offload: Literal["cpu", "none", "sequential"] = "cpu"
    terms: dict[str, RewardTerm] = field(default_factory=lambda: {"clip": RewardTerm(weight=1.0)})


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = field(default=1e-4, metadata=_range(0.0, 1.0, exclusive_min=True))
    weight_decay: float = field(default=0.0, metadata=_range(0.0, 1.0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = field(default=1e-8, metadata=_range(0.0, 1.0, exclusive_min=True))
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = field(default=0, metadata=_range(0))
    grad_clip: float | None = field(default=1.0, metadata=_range(0.0, exclusive_min=True))


@dataclass
class MemoryConfig:
    device: Literal["auto", "cuda", "cpu"] = "auto"
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    attention: Literal["sdpa", "xformers", "auto"] = "sdpa"
    checkpoint_unet: bool = True
    checkpoint_unet_blocks: bool = False  # also checkpoint inside each UNet call, block by block (SDXL at 1024²)
    checkpoint_vae: bool = True
    vae_precision: Literal["auto", "weights", "fp32"] = "auto"  # auto: fp32 where fp16 would overflow (SDXL's VAE)
    cpu_threads: int | None = field(default=None, metadata=_range(1, 1024))  # CPU runs: torch threads (null: default)
    plan: Literal["manual", "auto"] = "manual"  # auto: choose memory switches so the estimate fits vram_gb
    # None: the CUDA card's total memory (plan: auto only)
    vram_gb: float | None = field(default=None, metadata=_range(1.0, 1024.0))


@dataclass
class TrainConfig:
    steps: int = field(default=1000, metadata=_range(1))
    batch_size: int = field(default=1, metadata=_range(1, 1024))
    grad_accum: int = field(default=1, metadata=_range(1, 1024))
    seed: int = field(default=0, metadata=_range(0))
    resume: str | None = "auto"  # auto: continue from the newest checkpoint in output.dir if any; a path; null: never
    checkpoint_every: int = field(default=100, metadata=_range(0))  # 0: only on interrupt
    keep_checkpoints: int = field(default=2, metadata=_range(1))
    max_bad_steps: int = field(default=5, metadata=_range(1))  # consecutive non-finite steps before the run stops


@dataclass
class DataConfig:
    prompts: str | None = None  # .txt/.csv/.tsv/.jsonl, or null for the shipped list
    column: str | None = None


@dataclass
class OutputConfig:
    dir: str = "outputs/run"
    name: str = "tc_lite"
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    overwrite: bool = False


@dataclass
class LoggingConfig:
    log_every: int = field(default=1, metadata=_range(1))
    sample_every: int = field(default=100, metadata=_range(0))  # 0 disables sample grids during training
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a mountain lake at sunset"])
    sample_seeds: list[int] = field(default_factory=lambda: [0, 1])
    progress: bool = True
    tensorboard: bool = False  # also log to <output.dir>/tensorboard when the tensorboard package is installed


@dataclass
class EvalConfig:
    every: int = field(default=0, metadata=_range(0))  # held-out evaluation every N steps; 0 disables
    prompts: str = "builtin:heldout"
    num_prompts: int = field(default=8, metadata=_range(1))
    seeds: list[int] = field(default_factory=lambda: [0])
    patience: int = field(default=0, metadata=_range(0))  # early stop after N evals without improvement; 0: never


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

