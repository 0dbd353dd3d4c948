"""The prefix cache: the latent after step T−K, computed once per (prompt, noise) and kept on disk.

Why it is exact: with `sampling.encoder_schedule: two_encoder` the first T−K steps are conditioned by the ORIGINAL
text encoder and run without gradients, so the latent they reach depends on the frozen UNet and encoder, the
scheduler, T, K, CFG, the resolution, the negative prompt, the prompt and the starting noise -- never on the weights
being trained. A training step then only runs the last K steps (the cache is the step's `LatentSource`):
~K/T of the sampling compute (DESIGN §1, §4: 88 → 9 TFLOP per step at T=50, K=1).

Why the noise must change: the Recipe draws its noise from `step_generator(seed, step, micro)`, which differs at
every step, so nothing would ever be reused. With the cache on, the noise of a prompt is a function of
(train.seed, prompt, variant) only (`noise_seed`): each prompt keeps `variants` fixed starting noises (default
one). The trade-off: every epoch sees the same starting latents for a prompt instead of fresh ones -- less
diversity per prompt (more epochs over few prompts can overfit those samples; use many prompts, or
`sampling.prefix_variants: N` for N noises per prompt, one drawn per step: a cache and a prefill N times larger).

Never stale: every entry is stored with the full JSON key it was computed for -- model fingerprint (a checksum of
every weight the prefix reads: the UNet and each text encoder as the adapters' `original()` context shows it, so
a changed file under the same name is noticed), scheduler and its
config, T, K, CFG, eta, resolution, negative prompt, weight precision and device type, the family, prompt and
noise seed --
and an entry whose stored key is not exactly the expected one is recomputed and replaced, never reused. Files are
fp16 safetensors (32 KB at 512²), written atomically (`tc_lite.io`), in a folder per cache identity.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tc_lite.conditioning import Cond
from tc_lite.errors import UserError
from tc_lite.io import save_safetensors_atomic, save_text_atomic
from tc_lite.prefix_rules import prefix_cache_problems

KEY_VERSION = 2  # 2: computed by tc_lite.render (eta noise from each image's own seed generator); family in key


def noise_seed(train_seed: int, prompt: str, variant: int = 0) -> int:
    """The seed of a prompt's starting noise with the cache on: stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"tc-lite-prefix:{train_seed}:{variant}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def weights_fingerprint(*modules: torch.nn.Module | None, skip: Callable[[str], bool] = lambda n: "lora_" in n) -> str:
    """A checksum of every weight of `modules` (name, shape, dtype, float64 sum, and 8 sampled values per tensor).

    One pass over the weights, no copies; catches a different checkpoint behind the same path or hub id. LoRA
    weights are skipped (the prefix runs with them disabled).
    """
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        if module is None:
            continue
        for name, t in sorted(module.state_dict().items()):
            if skip(name) or not isinstance(t, torch.Tensor):
                continue
            flat = t.detach().reshape(-1)
            # float64 positions: in fp32, n - 1 rounds up to n past 2**24 values (SD1.5's largest convs)
            sample = flat[torch.linspace(0, flat.numel() - 1, 8, dtype=torch.float64).long()] if flat.numel() else flat
            total = flat.sum(dtype=torch.float64) if t.is_floating_point() else flat.sum()
            h.update(f"{i}.{name}:{tuple(t.shape)}:{t.dtype}:{float(total)!r}:{sample.double().tolist()}".encode())
    return h.hexdigest()


class PrefixCache:
    """Latents after step `start = T−K` per (prompt, noise seed), on disk; computes what is missing.

    A `LatentSource` for `tc_lite.step.TrainStep`. `renderer` (a `tc_lite.render.Renderer` for the sampling
    settings) computes missing prefixes; `compute_conditioning(prompts) -> (early, uncond_early)` gives the
    ORIGINAL conditioning. `identity` is everything else the prefix depends on (see `prefix_identity`); its hash
    names the cache folder.
    """

    def __init__(self, root: str | Path, identity: dict[str, Any], *, renderer: Any,
                 compute_conditioning: Callable[[list[str]], tuple[Cond, Cond]], train_seed: int = 0,
                 variants: int = 1, dtype: torch.dtype = torch.float16):
        s = identity["sampling"]
        problems = prefix_cache_problems(SimpleNamespace(**{"grad_steps_min": None, **s}))  # the identity keeps no K range
        if problems:
            raise UserError("; ".join(problems))
        self.renderer = renderer
        self.latent_shape = tuple(int(x) for x in renderer.latent_shape)
        self.identity = {"version": KEY_VERSION, **identity, "latent_shape": list(self.latent_shape)}
        self.start = int(s["steps"]) - int(s["grad_steps"])
        self.device = renderer.device
        self.train_seed = int(train_seed)
        self.variants = max(1, int(variants))
        self.dtype = dtype
        self.compute_conditioning = compute_conditioning
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()
        self.folder = Path(root).expanduser() / digest[:20]
        self.hits = 0
        self.misses = 0

    # ---------------------------------------------------------------------------------------------- keys

    def entry_key(self, prompt: str, seed: int) -> dict[str, Any]:
        return {"identity": self.identity, "prompt": prompt, "noise_seed": int(seed), "dtype": str(self.dtype)}

    def _path(self, key: dict[str, Any]) -> Path:
        return self.folder / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32] + ".safetensors")

    def seed_for(self, prompt: str, variant: int = 0) -> int:
        return noise_seed(self.train_seed, prompt, variant % self.variants)

    # ---------------------------------------------------------------------------------------------- read/write

    def _read(self, key: dict[str, Any]) -> torch.Tensor | None:
        path = self._path(key)
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                stored = (f.metadata() or {}).get("key")
                if stored != json.dumps(key, sort_keys=True):
                    return None  # stale or a hash collision: recompute, never reuse
                latent = f.get_tensor("latent")
        except Exception:  # noqa: BLE001 -- a truncated or foreign file is a miss; the atomic rewrite replaces it
            return None
        return latent if tuple(latent.shape) == (1, *self.latent_shape) else None

    def _write(self, key: dict[str, Any], latent: torch.Tensor) -> None:
        if not (self.folder / "identity.json").is_file():
            save_text_atomic(json.dumps(self.identity, indent=2, sort_keys=True) + "\n", self.folder / "identity.json")
        save_safetensors_atomic({"latent": latent.to(self.dtype)}, self._path(key),
                                metadata={"key": json.dumps(key, sort_keys=True)})

    # ---------------------------------------------------------------------------------------------- compute

    def noise(self, seed: int) -> torch.Tensor:
        return self.renderer.noise(seed)[0].cpu()

    @torch.no_grad()
    def compute(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """The prefix latents for `prompts` (float32, on the device), computed now, without the cache. Rows are
        independent (per-row noise, and per-row eta noise), so a latent does not depend on its batch."""
        if self.start == 0:  # K = T: nothing to cache but the noise (Denoiser.run scales it at start=0)
            return torch.cat([self.renderer.noise(s)[0] for s in seeds])
        early, uncond = self.compute_conditioning(prompts)
        return self.renderer.latents(seeds, early=early, uncond_early=uncond, stop=self.start)

    def latents(self, prompts: list[str], variant: int | Sequence[int] = 0) -> torch.Tensor:
        """Cached prefix latents for a batch (float32 on the device); misses are computed together and stored.
        `variant`: which of the prompt's `variants` noises, for the whole batch or per prompt."""
        picks = [variant] * len(prompts) if isinstance(variant, int) else list(variant)
        seeds = [self.seed_for(p, v) for p, v in zip(prompts, picks)]
        keys = [self.entry_key(p, s) for p, s in zip(prompts, seeds)]
        rows: list[torch.Tensor | None] = [self._read(k) for k in keys]
        missing = [i for i, r in enumerate(rows) if r is None]
        self.hits += len(prompts) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = self.compute([prompts[i] for i in missing], [seeds[i] for i in missing])
            for j, i in enumerate(missing):
                stored = fresh[j : j + 1].to(self.dtype).cpu()
                self._write(keys[i], stored)
                rows[i] = stored
        return torch.cat([r.to(self.device, torch.float32) for r in rows])  # type: ignore[union-attr]

    def starting_latents(self, prompts: list[str], gen: torch.Generator, grad_steps: int) -> tuple[torch.Tensor, int]:
        """`LatentSource.starting_latents`: the cached latent after step T−K (the step then runs only the last K steps). With
        variants, one of each prompt's noises is drawn from the step's generator, which then drives eta as usual."""
        if self.start != self.renderer.plan.steps - grad_steps:
            raise UserError(f"sampling.prefix_cache: the cache holds the latent after step {self.start}, but this "
                            f"step has K={grad_steps} of T={self.renderer.plan.steps}; unset sampling.grad_steps_min")
        picks: int | list[int] = 0  # one noise per prompt: draw nothing, so `gen` drives eta as without variants
        if self.variants > 1:
            picks = torch.randint(self.variants, (len(prompts),), generator=gen).tolist()
        return self.latents(prompts, variant=picks), self.start

    def prefill(self, prompts: Sequence[str], batch_size: int = 4, log: Callable[[str], None] = print) -> int:
        """Fill the cache for every prompt and variant before training; returns how many latents were computed."""
        todo = [(p, v) for v in range(self.variants) for p in dict.fromkeys(prompts)]
        todo = [(p, v) for p, v in todo if self._read(self.entry_key(p, self.seed_for(p, v))) is None]
        if todo:
            log(f"prefix cache: computing {len(todo)} latents (T-K={self.start} steps each) into {self.folder}")
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            for v in sorted({v for _, v in chunk}):
                self.latents([p for p, vv in chunk if vv == v], variant=v)
        return len(todo)


def prefix_identity(cfg: Any, family: Any, components: Any, *, precision: str, device: torch.device,
                    adapters: Any = None) -> dict[str, Any]:
    """Everything a prefix latent depends on except the prompt and its noise (see the module docstring): the
    family, the weights the prefix reads (UNet and every text encoder, under the adapters' `original()`), the
    sampling settings, precision and device type."""
    import contextlib

    from tc_lite.sampling import make_scheduler

    s = cfg.sampling
    sched = make_scheduler(s.scheduler, components.scheduler)
    sched_config = {k: v for k, v in dict(sched.config).items() if not k.startswith("_")}
    with adapters.original() if adapters is not None else contextlib.nullcontext():
        fingerprint = weights_fingerprint(components.unet, *family.encoders(components).values())
    tokenizers = [slot.tokenizer(components) for slot in family.slots]
    return {
        "model": {
            "family": family.name,
            "source": str(components.source or cfg.model.source),
            "revision": cfg.model.revision,
            "fingerprint": fingerprint,
            "tokenizer": [[len(t), int(t.model_max_length)] for t in tokenizers if t is not None] or None,
        },
        "sampling": {
            "scheduler": s.scheduler, "scheduler_config": json.loads(json.dumps(sched_config, default=str)),
            "steps": s.steps, "grad_steps": s.grad_steps, "guidance_scale": s.guidance_scale, "eta": s.eta,
            "height": s.height, "width": s.width, "negative_prompt": s.negative_prompt,
            "encoder_schedule": s.encoder_schedule,
        },
        "precision": precision,
        "device": device.type,
    }


def build_prefix_cache(cfg: Any, family: Any, components: Any, adapters: Any, encoder: Any, precision: Any,
                       run_dir: Path) -> PrefixCache:
    """The cache `sampling.prefix_cache` asks for: in `sampling.prefix_cache_dir`, else `<run>/prefix_cache`."""
    from tc_lite.render import RenderPlan, Renderer

    s = cfg.sampling
    problems = prefix_cache_problems(s, adapters)
    if problems:
        raise UserError("; ".join(problems))
    root = Path(s.prefix_cache_dir).expanduser() if s.prefix_cache_dir else Path(run_dir) / "prefix_cache"
    identity = prefix_identity(cfg, family, components, precision=precision.name, device=precision.device,
                               adapters=adapters)
    renderer = Renderer(components, RenderPlan.from_sampling(s, tuned_steps=0), precision.autocast)
    uncond = encoder.uncond_base(s.negative_prompt)
    return PrefixCache(root, identity, renderer=renderer, compute_conditioning=lambda ps: (encoder.base(ps), uncond),
                       train_seed=cfg.train.seed, variants=s.prefix_variants)
