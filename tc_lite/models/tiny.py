"""A tiny, deterministic SD1-shaped pipeline whose images really depend on the prompt.

Why pretrain at all: a randomly initialised UNet barely listens to its text input, so a text-encoder LoRA trained on
it cannot move any reward (DESIGN §6). We therefore teach the tiny model, in code, a synthetic task: a coloured shape
on grey, prompted "a {colour} {object}". The VAE is first trained as an autoencoder (a random VAE's decoder ignores
its latents), then the UNet (and text encoder) on the usual noise-prediction loss with some empty prompts, so that
classifier-free guidance works. The result is cached on disk, keyed by a version string and a hash of the whole spec.
Images are `TINY_RESOLUTION` (16) pixels square, latents 4x8x8.

Module names are SD1's (CLIP `encoder.layers.N.self_attn.q_proj`, UNet `down_blocks…attn2.to_k`), so LoRA targets,
LDM key conversion and the loaders are exercised exactly as on the real model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from tc_lite.conditioning import Cond
from tc_lite.families.base import ModelFamily
from tc_lite.models._cache import atomic_file, cache_root
from tc_lite.models.components import SDComponents
from tc_lite.models.tokenizer import clip_tokenizer

log = logging.getLogger(__name__)

TINY_VERSION = "tiny-v2"  # bump when the task, architecture or training recipe changes in a way the spec misses
TINY_RESOLUTION = 16  # pixels; the VAE downsamples 2x, so latents are 4x8x8
TINY_COLOURS = MappingProxyType(
    {  # name -> RGB in [0, 1]
        "red": (1.0, 0.0, 0.0),
        "green": (0.0, 1.0, 0.0),
        "blue": (0.0, 0.0, 1.0),
        "yellow": (1.0, 1.0, 0.0),
        "cyan": (0.0, 1.0, 1.0),
        "magenta": (1.0, 0.0, 1.0),
        "white": (1.0, 1.0, 1.0),
        "black": (0.0, 0.0, 0.0),
    }
)
TINY_OBJECTS = ("square", "circle", "bar")
_BACKGROUND = 0.5  # grey, in [0, 1]

# SD1's DDIM settings (scaled_linear 0.00085-0.012, 1000 steps, epsilon), as in its scheduler_config.json.
_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
_TEXT_ENCODER = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}
_UNET = {
    "sample_size": TINY_RESOLUTION // 2,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    # One plain and one cross-attention level each way, like SD1.5's mix, so every block kind gets converted.
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 2,  # SD1 names the head *count* so; 2 heads train ~1.5x faster on CPU than 8
    "norm_num_groups": 8,
}
TINY_VAE = {  # shared with the tiny SDXL
    "sample_size": TINY_RESOLUTION,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "norm_num_groups": 8,
}
_TRAIN = {
    "vae_steps": 300,
    "vae_lr": 2e-3,
    "vae_kl_weight": 1e-4,
    "unet_steps": 500,
    "unet_lr": 1e-3,
    # t = 1000 * u**0.5 oversamples high noise. Only the prompt can tell the colour there, but the epsilon loss scales
    # that signal by sqrt(SNR), so with uniform t the text was learnt late and by chance (seed 0 never learnt "red"
    # in 600 steps); with 0.5 both seeds tried learnt all 8 colours.
    "timestep_power": 0.5,
    "train_text_encoder": True,  # a frozen random text encoder left the colours mixed up (measured)
    "batch_size": 32,
    "empty_prompt_fraction": 0.1,
}


def tiny_prompts() -> list[str]:
    """Every prompt of the synthetic task ("a red square", …), colours major."""
    return [f"a {c} {o}" for c in TINY_COLOURS for o in TINY_OBJECTS]


def tiny_spec(seed: int = 0) -> dict[str, Any]:
    """Everything that determines the pretrained weights; its hash names the cache file."""
    return {
        "version": TINY_VERSION,
        "seed": seed,
        "resolution": TINY_RESOLUTION,
        "colours": dict(TINY_COLOURS),
        "objects": list(TINY_OBJECTS),
        "scheduler": _SCHEDULER,
        "text_encoder": _TEXT_ENCODER,
        "unet": _UNET,
        "vae": TINY_VAE,
        "train": _TRAIN,
    }


def tiny_cache_path(seed: int = 0) -> Path:
    return spec_cache_path(TINY_VERSION, tiny_spec(seed))


def spec_cache_path(version: str, spec: Mapping[str, Any]) -> Path:
    """Where a tiny model's pretrained weights are cached: named by its version and a hash of its whole spec."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "tiny" / f"{version}-{digest}.safetensors"


def build_tiny_components(seed: int = 0, pretrain: bool = True) -> SDComponents:
    """The tiny SD1 pipeline; with `pretrain` its images follow the prompt (trained once, then loaded from cache).

    Deterministic for a given seed; leaves the caller's global RNG state untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = _build_random()
    components.source = "tiny"
    if pretrain:
        from tc_lite.families.sd1 import SD1

        load_or_pretrain(components, tiny_cache_path(seed), seed, SD1(), _TRAIN)
    for module in (components.text_encoder, components.unet, components.vae):
        module.eval()
    return components


def _build_random() -> SDComponents:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return SDComponents(
        tokenizer=clip_tokenizer(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_TEXT_ENCODER)),
        unet=UNet2DConditionModel(**_UNET),
        vae=AutoencoderKL(**TINY_VAE),
        scheduler=DDIMScheduler(**_SCHEDULER),
    )


# ---- cache -------------------------------------------------------------------------------------------------------


def load_or_pretrain(components: SDComponents, path: Path, seed: int, family: ModelFamily,
                     train: Mapping[str, Any]) -> None:
    """Load the cached weights at `path`, pretraining (`train` settings, conditioning by `family`) and caching them
    first if needed (atomic write). Shared by the tiny SD1 and SDXL models."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if not path.is_file():
        wall, cpu = time.perf_counter(), time.process_time()
        stats = _pretrain(components, seed, family, train)
        stats |= {"seconds": round(time.perf_counter() - wall, 1), "cpu_seconds": round(time.process_time() - cpu, 1)}
        log.info("pretrained the tiny %s model (cached in %s): %s", family.name, path, stats)
        tensors = {
            f"{name}.{key}": value.detach().contiguous()
            for name, module in _modules(components)
            for key, value in module.state_dict().items()
        }
        meta = {"scaling_factor": repr(components.vae.config.scaling_factor), "stats": json.dumps(stats)}
        atomic_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        for name, module in _modules(components):
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
    components.vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
    components.extra["tiny_stats"] = json.loads(meta["stats"])


def _modules(c: SDComponents) -> list[tuple[str, torch.nn.Module]]:
    named = [("text_encoder", c.text_encoder), ("text_encoder_2", c.text_encoder_2), ("unet", c.unet), ("vae", c.vae)]
    return [(name, module) for name, module in named if module is not None]


# ---- the synthetic task ------------------------------------------------------------------------------------------


def _shape_masks(size: int) -> dict[str, torch.Tensor]:
    """Centred masks on a (2*size)-canvas, so a random crop of `size` places the shape anywhere near the middle."""
    ys, xs = torch.meshgrid(torch.arange(2 * size), torch.arange(2 * size), indexing="ij")
    cy = cx = size - 0.5
    dy, dx = (ys - cy).abs(), (xs - cx).abs()
    quarter = size / 4
    return {
        "square": (dy < quarter) & (dx < quarter),
        "circle": (dy**2 + dx**2) < (quarter * 1.15) ** 2,
        "bar": (dy < quarter / 2) & (dx < quarter * 1.5),
    }


_JITTER = 3  # the shape's centre moves by up to ±3 px, so the task has 7 x 7 positions per prompt


def synthetic_images(prompt_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] for indices into `tiny_prompts()`, the shapes shifted by `offsets` ([N, 2] pixels)."""
    size = TINY_RESOLUTION
    masks = _shape_masks(size)
    colours = list(TINY_COLOURS.values())
    out = torch.full((len(prompt_ids), 3, size, size), _BACKGROUND)
    for i, pid in enumerate(prompt_ids.tolist()):
        colour, obj = divmod(pid, len(TINY_OBJECTS))
        top, left = size // 2 + int(offsets[i, 0]), size // 2 + int(offsets[i, 1])
        mask = masks[TINY_OBJECTS[obj]][top : top + size, left : left + size]
        out[i, :, mask] = torch.tensor(colours[colour]).unsqueeze(1)
    return out * 2 - 1


def synthetic_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """The whole task, enumerated: (images [N, 3, H, W] in [-1, 1], prompt index [N]) for every prompt and position."""
    shifts = torch.arange(-_JITTER, _JITTER + 1)
    offsets = torch.cartesian_prod(shifts, shifts)
    pid = torch.arange(len(tiny_prompts())).repeat_interleave(len(offsets))
    return synthetic_images(pid, offsets.repeat(len(tiny_prompts()), 1)), pid


def _pretrain(c: SDComponents, seed: int, family: ModelFamily, train: Mapping[str, Any]) -> dict[str, float]:
    """Train the VAE, then the UNet (and text encoder); returns the final losses. Uses a private, seeded RNG.

    Runs on one CPU thread: the ops are too small to gain from more (on a 2-core box one UNet step took 120 ms on
    1 thread, 154 ms on 2), and with 2 threads next to other busy processes a step took ~100x longer (spin-waiting).
    """
    images, pid = synthetic_dataset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain_steps(c, images, pid, seed, family, train)
    finally:
        torch.set_num_threads(threads)


def _pretrain_steps(c: SDComponents, images: torch.Tensor, pid: torch.Tensor, seed: int, family: ModelFamily,
                    train: Mapping[str, Any]) -> dict[str, float]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        g = torch.Generator().manual_seed(seed + 2)
        stats = {"vae_loss": _train_vae(c.vae, images, g, train)} if train["vae_steps"] else {}
        with torch.no_grad():
            latents = c.vae.encode(images).latent_dist.mean * c.vae.config.scaling_factor
        stats["unet_loss"] = _train_unet(c, latents, pid, g, family, train)
    for _, m in _modules(c):
        m.zero_grad(set_to_none=True)
    return stats


def _train_vae(vae: torch.nn.Module, images: torch.Tensor, g: torch.Generator, train: Mapping[str, Any]) -> float:
    bs, kl_weight = train["batch_size"], train["vae_kl_weight"]
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=train["vae_lr"], fused=True)
    ema = None
    for _ in range(train["vae_steps"]):
        x = images[torch.randint(0, len(images), (bs,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + kl_weight * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
    vae.eval()
    with torch.no_grad():  # scale latents to unit variance, as SD's 0.18215 does for its VAE
        std = vae.encode(images).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return round(ema, 5)


def _unet_schedule(opt: torch.optim.Optimizer, train: Mapping[str, Any]) -> Any:
    """SD1's constant learning rate, or (`unet_schedule: onecycle`) a warmup and cosine decay, which lets the tiny
    SDXL's shorter recipe use a larger peak rate."""
    if train.get("unet_schedule") == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train["unet_lr"], total_steps=train["unet_steps"],
                                                   pct_start=0.15)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _conditioning(family: ModelFamily, c: SDComponents, prompts: list[str]) -> Cond:
    """Rows: every prompt, then the unconditional one, made by the family exactly as sampling makes them.

    Where the unconditional is just the encoded "" (SD1) it is encoded in the same batch: one call, as the recipe
    that made the cached SD1 weights did (two calls round differently, and the weights would drift from the cache).
    """
    size = (TINY_RESOLUTION, TINY_RESOLUTION)
    if type(family).uncond is ModelFamily.uncond:
        return family.encode(c, prompts + [""], size=size)
    return Cond.cat(family.encode(c, prompts, size=size), family.uncond(c, "", size=size))


def _train_unet(c: SDComponents, latents: torch.Tensor, pid: torch.Tensor, g: torch.Generator, family: ModelFamily,
                train: Mapping[str, Any]) -> float:
    prompts = tiny_prompts()
    bs, empty = train["batch_size"], len(prompts)  # row `empty` of the conditioning is the unconditional one
    train_te = train["train_text_encoder"]
    encoders = list(family.encoders(c).values())
    params = list(c.unet.parameters()) + ([p for e in encoders for p in e.parameters()] if train_te else [])
    for encoder in encoders:
        encoder.train(train_te)
    c.unet.train()
    with torch.no_grad():
        fixed = _conditioning(family, c, prompts)
    opt = torch.optim.Adam(params, lr=train["unet_lr"], fused=True)
    schedule = _unet_schedule(opt, train)
    alphas = c.scheduler.alphas_cumprod
    ema = None
    for _ in range(train["unet_steps"]):
        idx = torch.randint(0, len(latents), (bs,), generator=g)
        drop = torch.rand(bs, generator=g) < train["empty_prompt_fraction"]
        rows = torch.where(drop, torch.full_like(idx, empty), pid[idx])
        cond = (_conditioning(family, c, prompts) if train_te else fixed).select(rows)
        t = (len(alphas) * torch.rand(bs, generator=g) ** train["timestep_power"]).long()
        noise = torch.randn(latents[idx].shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents[idx] + (1 - a).sqrt() * noise
        loss = F.mse_loss(c.unet(noisy, t, cond.hidden, added_cond_kwargs=cond.added).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
    c.unet.eval()
    for encoder in encoders:
        encoder.eval()
    return round(ema, 5)


# ---- saving ------------------------------------------------------------------------------------------------------


def save_tiny_model(out_dir: Path, single_file: Path | None = None, *, components: SDComponents | None = None) -> None:
    """Write the tiny model as a diffusers folder and, optionally, as an A1111-style LDM single-file checkpoint.

    `components` lets a caller save a model it already built (default: `build_tiny_components()`).
    """
    from tc_lite.families.sd1 import SD1
    from tc_lite.models.ldm_keys import ldm_state_dict

    c = components or build_tiny_components()
    write_pipeline(c, SD1(), out_dir, single_file, ldm_state_dict, TINY_VERSION)


def write_pipeline(c: SDComponents, family: ModelFamily, out_dir: Path, single_file: Path | None,
                   ldm_tensors: Callable[[SDComponents], dict[str, torch.Tensor]], version: str) -> None:
    """`c` as the family's diffusers folder and, with `single_file`, as one original-layout `.safetensors` file
    (`ldm_tensors` names the weights as A1111/ComfyUI do), written atomically."""
    from safetensors.torch import save_file

    family.pipeline(c).save_pretrained(str(out_dir), safe_serialization=True)
    if single_file is not None:
        tensors = {k: v.contiguous() for k, v in ldm_tensors(c).items()}
        meta = {"format": "pt", "tc_lite": version}
        Path(single_file).parent.mkdir(parents=True, exist_ok=True)
        atomic_file(Path(single_file), lambda tmp: save_file(tensors, str(tmp), metadata=meta))
