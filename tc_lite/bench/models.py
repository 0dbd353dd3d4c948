"""Models the benchmarks build in code instead of loading: nothing is downloaded, the weights are random.

* `mid`: SD1.5's block structure, narrower and shallower (~10x cheaper than SD1.5 per pixel), with a random
  ViT-B/32-sized reward (`RandomVitReward`): CPU timing.
* `sd15`: the full-size SD1.5 architecture from the configs bundled in `tc_lite/assets/sd15` (860M UNet, 123M
  text encoder, 84M VAE), built directly on the GPU when there is one; with `tc_lite.bench.random_rewards` the
  rewards too (CLIP ViT-L/14, ViT-H/14 towers of the right shapes). Memory and time are those of the real models;
  the images and scores mean nothing.
* `sdxl`: the full-size SDXL base architecture (2.57B UNet, 123M + 695M text encoders, 84M VAE) from the configs the
  estimator reads for the preset (`SDXL.architecture`: the bundled base configs, or a replacement VAE's, so the
  fp16-fix VAE's `force_upcast: false` holds), with the real CLIP tokenizers; random weights as for `sd15`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

SD15_CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "sd15"

# A mid-size SD1-shaped model (SD1.5's block structure, narrower, shallower): ~10x cheaper than SD1.5 per pixel.
MID_UNET = {"sample_size": 32, "in_channels": 4, "out_channels": 4, "block_out_channels": [64, 128, 256, 256],
            "layers_per_block": 1, "cross_attention_dim": 256, "attention_head_dim": 8, "norm_num_groups": 32,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
MID_VAE = {"sample_size": 256, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
           "block_out_channels": [32, 64, 128, 128], "layers_per_block": 1, "norm_num_groups": 32,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
MID_TEXT = {"vocab_size": 49408, "max_position_embeddings": 77, "hidden_size": 256, "intermediate_size": 1024,
            "num_hidden_layers": 4, "num_attention_heads": 4, "projection_dim": 256, "hidden_act": "quick_gelu"}
MID_OVERRIDES = ["sampling.height=256", "sampling.width=256",
                 "rewards.terms.vit.type=tc_lite.bench.models:RandomVitReward", "rewards.terms.vit.weight=1",
                 "rewards.offload=none", "memory.device=cpu", "memory.precision=fp32"]

MODELS = ("tiny", "mid", "sd15", "sdxl")  # what `bench --model` accepts


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sd1_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def build_mid_components(seed: int = 0) -> Any:
    """The mid-size model (random weights, SD1.5's scheduler and the real CLIP tokenizer)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tc_lite.models import SDComponents, clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        comps = SDComponents(tokenizer=clip_tokenizer(), text_encoder=CLIPTextModel(CLIPTextConfig(**MID_TEXT)),
                             unet=UNet2DConditionModel(**MID_UNET), vae=AutoencoderKL(**MID_VAE),
                             scheduler=_sd1_scheduler(), source="mid")
    for m in (comps.unet, comps.vae, comps.text_encoder):
        m.eval()
    return comps


def _config(part: str, name: str = "config.json") -> dict[str, Any]:
    return json.loads((SD15_CONFIGS / part / name).read_text())


def build_sd15_components(dtype: torch.dtype = torch.float16, device: torch.device | str | None = None,
                          seed: int = 0) -> Any:
    """SD1.5 at full size with random weights, from the bundled configs: built on `device` (default: the GPU if
    there is one, where initialising a billion weights takes a second) and cast to `dtype` module by module."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tc_lite.models import SDComponents, clip_tokenizer

    device = torch.device(device) if device is not None else default_device()
    sched_cfg = _config("scheduler", "scheduler_config.json")
    scheduler = getattr(diffusers, sched_cfg.get("_class_name", ""), diffusers.DDIMScheduler).from_config(sched_cfg)
    te_cfg = {k: v for k, v in _config("text_encoder").items() if not k.startswith("_")}
    devices = [] if device.type != "cuda" else [torch.cuda.current_device() if device.index is None else device.index]
    modules: dict[str, nn.Module] = {}
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name, build in (("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**te_cfg))),
                            ("unet", lambda: UNet2DConditionModel.from_config(_config("unet"))),
                            ("vae", lambda: AutoencoderKL.from_config(_config("vae")))):
            with torch.device(device):
                module = build()
            modules[name] = nn.Module.to(module, dtype=dtype).eval().requires_grad_(False)
    return SDComponents(tokenizer=clip_tokenizer(), scheduler=scheduler, source="sd15 (random weights)", **modules)


def build_sdxl_components(model_cfg: Any, dtype: torch.dtype = torch.float16, device: torch.device | str | None = None,
                           seed: int = 0) -> Any:
    """SDXL at full size with random weights, from the architecture the estimator uses for `model_cfg` (see the
    module docstring), built on `device` (default: the GPU if there is one) and cast to `dtype` module by module."""
    from types import SimpleNamespace

    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from tc_lite.families import FAMILIES
    from tc_lite.models import SDComponents
    from tc_lite.models.loading import bundled_config_dir

    arch = FAMILIES["sdxl"].architecture(SimpleNamespace(model=model_cfg))
    folder = bundled_config_dir("sdxl")
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, sched_cfg.get("_class_name", ""), diffusers.EulerDiscreteScheduler).from_config(
        sched_cfg)
    te = {k: CLIPTextConfig(**{n: v for n, v in c.items() if not n.startswith("_")})
          for k, c in arch.text_encoders.items()}
    device = torch.device(device) if device is not None else default_device()
    devices = [] if device.type != "cuda" else [torch.cuda.current_device() if device.index is None else device.index]
    modules: dict[str, nn.Module] = {}
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name, build in (("text_encoder", lambda: CLIPTextModel(te["te1"])),
                            ("text_encoder_2", lambda: CLIPTextModelWithProjection(te["te2"])),
                            ("unet", lambda: UNet2DConditionModel.from_config(arch.unet)),
                            ("vae", lambda: AutoencoderKL.from_config(arch.vae))):
            with torch.device(device):
                module = build()
            modules[name] = nn.Module.to(module, dtype=dtype).eval().requires_grad_(False)
    return SDComponents(tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
                        tokenizer_2=CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2")), scheduler=scheduler,
                        family="sdxl", source="sdxl (random weights)", extra={"force_zeros_for_empty_prompt": True},
                        **modules)


class RandomVitReward(nn.Module):
    """A randomly initialised ViT-B/32-sized CLIP image tower with a linear head: a reward with realistic cost for
    timing on machines without reward weights. Scores mean nothing."""

    def __init__(self, layers: int = 6, width: int = 384):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width,
                                                       num_hidden_layers=layers, num_attention_heads=6,
                                                       image_size=224, patch_size=32))
        self.head = nn.Linear(width, 1)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from tc_lite.rewards.preprocess import clip_preprocess

        pixels = clip_preprocess(images, 224).to(self.head.weight.dtype)
        return self.head(self.vision(pixel_values=pixels).pooler_output).squeeze(-1).float()


@contextlib.contextmanager
def model_override(name: str | None) -> Iterator[None]:
    """Make `load_model` (as the Recipe calls it, `tc_lite.train.load_model`) return the mid-size model, the
    random-weight SD1.5 or SDXL instead of the preset's; "tiny" and None change nothing (the tiny model is a source)."""
    builders: dict[str, Callable[[Any, torch.dtype], Any]] = {
        "mid": lambda model_cfg, dtype: build_mid_components(),
        "sd15": lambda model_cfg, dtype: build_sd15_components(dtype),
        "sdxl": lambda model_cfg, dtype: build_sdxl_components(model_cfg, dtype)}
    if name not in builders:
        yield
        return
    from tc_lite import train
    from tc_lite.families import FAMILIES

    family = FAMILIES["sdxl" if name == "sdxl" else "sd1"]
    original = train.load_model
    train.load_model = lambda model_cfg, dtype: (family, builders[name](model_cfg, dtype))  # type: ignore[assignment]
    try:
        yield
    finally:
        train.load_model = original
