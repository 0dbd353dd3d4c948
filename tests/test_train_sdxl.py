"""The recipe on the tiny SDXL: it learns through both text encoders, per-encoder settings take effect, training
only te2 leaves te1 alone, and the LoRA file holds the modules kohya names for SDXL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tc_lite.config import load_config
from tc_lite.train import Recipe, run_training
from tests.test_train import read_metrics

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "presets" / "tiny-sdxl-cpu.yaml"


@pytest.fixture(scope="module")
def tiny_sdxl():
    from tc_lite.models.tiny_sdxl import build_tiny_sdxl_components

    return build_tiny_sdxl_components(seed=0, pretrain=True)  # cached on disk after the first build


def cfg_for(tmp_path: Path, *overrides: str):
    return load_config(PRESET, [f"output.dir={tmp_path / 'run'}", "logging.progress=false", *overrides])


def test_tiny_sdxl_preset_learns(tmp_path, tiny_sdxl):
    cfg = cfg_for(tmp_path)
    path = run_training(cfg, log=lambda s: None)
    rows = read_metrics(Path(cfg.output.dir))
    first = sum(r["reward"] for r in rows[:10]) / 10
    last = sum(r["reward"] for r in rows[-10:]) / 10
    assert last - first > 0.04, (first, last)  # measured +0.083 (-0.013 -> +0.070), 60 steps, ~50 s on 2 cores
    sd = load_file(path)
    layers = {p: tiny_sdxl_layers(tiny_sdxl, p) for p in ("te1", "te2")}
    assert {k.split("_text_model_")[0] for k in sd} == {"lora_te1", "lora_te2"}
    assert len(sd) == 3 * 6 * (layers["te1"] + layers["te2"])  # down, up, alpha per module; 6 modules per layer
    with safe_open(path, "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


def tiny_sdxl_layers(comps, slot: str) -> int:
    encoder = comps.text_encoder if slot == "te1" else comps.text_encoder_2
    return encoder.config.num_hidden_layers


def test_per_encoder_rank_and_learning_rate(tmp_path, tiny_sdxl):
    cfg = cfg_for(tmp_path, "train.steps=2", "logging.sample_every=0",
                  "lora.per_encoder={te2: {rank: 2, alpha: 1.0, lr: 1.0e-3}}")
    recipe = Recipe(cfg, log=lambda s: None).setup()
    groups = {g["name"]: g for g in recipe.optimizer.param_groups}
    assert groups["te1"]["lr"] == cfg.optim.lr and groups["te2"]["lr"] == 1e-3
    assert {p.shape[0] for p in groups["te2"]["params"] if p.ndim == 2 and p.shape[0] < p.shape[1]} == {2}
    path = recipe.train()
    sd = load_file(path)
    te2_down = [v for k, v in sd.items() if k.startswith("lora_te2") and k.endswith("lora_down.weight")]
    te1_down = [v for k, v in sd.items() if k.startswith("lora_te1") and k.endswith("lora_down.weight")]
    assert {v.shape[0] for v in te2_down} == {2} and {v.shape[0] for v in te1_down} == {cfg.lora.rank}
    assert {float(v) for k, v in sd.items() if k.startswith("lora_te2") and k.endswith(".alpha")} == {1.0}
    rows = read_metrics(Path(cfg.output.dir))
    assert rows[0]["lr/te2"] == 1e-3 and rows[0]["lr/te1"] == cfg.optim.lr


def test_training_only_te2_leaves_te1_alone(tmp_path, tiny_sdxl):
    cfg = cfg_for(tmp_path, "train.steps=2", "logging.sample_every=0", "lora.encoders=[te2]")
    recipe = Recipe(cfg, log=lambda s: None).setup()
    te1 = {k: v.clone() for k, v in recipe.components.text_encoder.state_dict().items()}
    assert [a.key for a in recipe.adapters] == ["te2"]
    path = recipe.train()
    assert all(torch.equal(te1[k], v) for k, v in recipe.components.text_encoder.state_dict().items())
    assert all(k.startswith("lora_te2_") for k in load_file(path))


def test_gradients_reach_only_the_adapters(tmp_path, tiny_sdxl):
    cfg = cfg_for(tmp_path, "train.steps=1", "logging.sample_every=0")
    recipe = Recipe(cfg, log=lambda s: None).setup()
    from tc_lite.step import StepStats, step_generator

    recipe.trainer.micro_step(["a red square"], step_generator(0, 0, 0), StepStats())
    comps = recipe.components
    trained = {id(p) for p in recipe.params}
    for module in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
        for name, p in module.named_parameters():
            assert (p.grad is not None) <= (id(p) in trained), name
    for encoder in (comps.text_encoder, comps.text_encoder_2):  # lora_B starts at 0, so B (not A) has gradients
        grads = [p.grad for n, p in encoder.named_parameters() if "lora_B" in n]
        assert grads and sum(g.abs().sum() for g in grads if g is not None) > 0


def test_a_crashed_sdxl_run_resumes_exactly(tmp_path, tiny_sdxl, monkeypatch):
    """Both adapters' weights and both optimizer groups come back from the checkpoint: bit-identical result."""
    from tc_lite.step import TrainStep

    common = ["train.steps=4", "train.checkpoint_every=1", "logging.sample_every=0",
              "lora.per_encoder={te2: {lr: 5.0e-3}}"]
    ref = load_file(run_training(cfg_for(tmp_path / "ref", *common), log=lambda s: None))
    real, calls = TrainStep.optimizer_step, []

    def crash_after_two(self):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("simulated crash")
        return real(self)

    monkeypatch.setattr(TrainStep, "optimizer_step", crash_after_two)
    cfg = cfg_for(tmp_path / "crashed", *common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(cfg, log=lambda s: None)
    monkeypatch.setattr(TrainStep, "optimizer_step", real)
    resumed = load_file(run_training(cfg, log=lambda s: None))
    assert ref.keys() == resumed.keys() and all(torch.equal(ref[k], resumed[k]) for k in ref)


def test_vae_precision_fp32_keeps_the_vae_in_fp32_on_a_half_run(tmp_path, tiny_sdxl):
    logs: list[str] = []
    cfg = cfg_for(tmp_path, "train.steps=1", "logging.sample_every=0", "memory.precision=bf16",
                  "memory.vae_precision=fp32")
    recipe = Recipe(cfg, log=logs.append).setup()
    comps = recipe.components
    assert {p.dtype for p in comps.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in comps.unet.parameters()} == {torch.bfloat16}
    assert any("VAE decodes in fp32" in line for line in logs)
    assert recipe.train().exists()


def test_a_full_sdxl_run_is_evaluated_from_its_two_encoder_files(tmp_path, tiny_sdxl):
    from tc_lite.evaluate.run import run_result
    from tc_lite.inference import tuned_encoders

    cfg = cfg_for(tmp_path, "train.steps=1", "logging.sample_every=0", "lora.mode=full", "optim.lr=1e-3")
    run_training(cfg, log=lambda s: None)
    out = Path(cfg.output.dir)
    files = run_result(cfg, out)
    assert files == {"te1": out / "tiny_sdxl_cpu_text_encoder.safetensors",
                     "te2": out / "tiny_sdxl_cpu_text_encoder_2.safetensors"}, files
    from tc_lite.models.tiny_sdxl import build_tiny_sdxl_components

    base = build_tiny_sdxl_components()
    both = tuned_encoders(base, files)
    assert set(both) == {"te1", "te2"}
    assert set(tuned_encoders(base, str(files["te2"]))) == {"te2"}  # one full file: the slot it fits
    mixed = cfg_for(tmp_path / "mixed", "train.steps=1", "logging.sample_every=0",
                    "lora.per_encoder={te2: {mode: full, lr: 1.0e-4}}")
    run_training(mixed, log=lambda s: None)
    out = Path(mixed.output.dir)
    assert run_result(mixed, out) == {"te1": out / "tiny_sdxl_cpu.safetensors",
                                      "te2": out / "tiny_sdxl_cpu_text_encoder_2.safetensors"}


@pytest.mark.parametrize("extra", [
    ["sampling.encoder_schedule=tuned", "sampling.uncond=original", "sampling.negative_prompt=grey"],
    ["sampling.grad_steps_min=1", "sampling.grad_steps=3", "train.grad_accum=2", "lora.encoders=[te1]"],
    ["lora.mode=full", "optim.lr=1e-4", "memory.checkpoint_unet=true", "memory.checkpoint_unet_blocks=true"],
    ["sampling.prefix_cache=prefill", "train.batch_size=2"],
])
def test_sdxl_variants_run_and_update_weights(tmp_path, tiny_sdxl, extra):
    """The two-encoder and tuned schedules, random truncation, full training, block checkpointing, the cache."""
    cfg = cfg_for(tmp_path, "train.steps=2", "logging.sample_every=0", *extra)
    recipe = Recipe(cfg, log=lambda s: None).setup()
    before = [p.detach().clone() for p in recipe.params]
    assert recipe.train().exists()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, recipe.params))


def test_sdxl_prefix_cache_tail_equals_the_uncached_run(tmp_path, tiny_sdxl):
    """The cached latent after step T-K continues exactly as denoising from its noise would (fp16 file rounding)."""
    from tc_lite.sampling import DenoisePlan

    cfg = cfg_for(tmp_path, "sampling.prefix_cache=lazy", "train.steps=1", "logging.sample_every=0")
    recipe = Recipe(cfg, log=lambda s: None).setup()
    cache, trainer, prompts = recipe.prefix_cache, recipe.trainer, ["a red square", "a green bar"]
    k, s = cfg.sampling.grad_steps, cfg.sampling
    plan = DenoisePlan(s.steps, k, s.guidance_scale, checkpoint=False)
    with torch.no_grad():
        cond = trainer.conditioning(prompts)
        cached, start = cache.starting_latents(prompts, torch.Generator().manual_seed(0), k)
        assert start == s.steps - k and cache.misses == 2
        noise = torch.cat([cache.noise(cache.seed_for(p)) for p in prompts])
        full = trainer.denoiser.run(noise, plan, **cond)
        tail = trainer.denoiser.run(cached, plan, start=start, **cond)
    torch.testing.assert_close(tail, full, rtol=2e-2, atol=2e-3 * float(full.abs().max()))


def test_partial_attention_targets_warn_at_start_for_a1111(tmp_path, tiny_sdxl):
    logs: list[str] = []
    cfg = cfg_for(tmp_path, "train.steps=1", "logging.sample_every=0", "lora.targets=[q_proj,v_proj]")
    Recipe(cfg, log=logs.append).setup()
    assert any("A1111 ignores te2's attention LoRA" in line for line in logs)
