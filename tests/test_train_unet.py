"""The recipe with a UNet LoRA on the tiny SD1: the TE+UNet demo learns and writes one kohya file with both kinds of
modules, staging trains what it says when it says, a UNet-only run leaves the encoder alone, a killed run resumes
bit for bit, and the run's file is evaluated (and sampled) with its UNet part applied."""

from __future__ import annotations

import copy
import json
import re
import signal
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tc_lite.checkpoint import list_checkpoints
from tc_lite.config import load_config
from tc_lite.train import Recipe, run_training
from tests.test_resume import start, wait_for_steps
from tests.test_train import read_metrics

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "presets" / "tiny-te-unet-cpu.yaml"


def demo_cfg(tmp_path: Path, *overrides: str):
    return load_config(DEMO, [f"output.dir={tmp_path / 'run'}", "logging.progress=false", *overrides])


def test_te_unet_demo_learns_and_writes_one_file_with_both_kinds_of_modules(tmp_path, tiny_components):
    cfg = demo_cfg(tmp_path, "logging.sample_every=0")
    path = run_training(cfg, log=lambda s: None)
    rows = read_metrics(Path(cfg.output.dir))
    first = sum(r["reward"] for r in rows[:10]) / 10
    last = sum(r["reward"] for r in rows[-10:]) / 10
    assert last - first > 0.05, (first, last)  # measured +0.130 (0.018 -> 0.149)
    sd = load_file(path)
    te = [k for k in sd if k.startswith("lora_te_text_model_encoder_layers_")]
    unet = [k for k in sd if k.startswith("lora_unet_")]
    assert len(te) == 2 * 6 * 3 and len(unet) > 0 and len(te) + len(unet) == len(sd)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert all(sd[k].float().abs().sum() > 0 for k in unet if k.endswith("lora_up.weight"))  # the UNet trained
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v1"
    assert float(meta["ss_unet_lr"]) == cfg.unet.lr and float(meta["ss_text_encoder_lr"]) == cfg.optim.lr


def _lora_b(recipe: Recipe, key: str) -> torch.Tensor:
    adapter = next(a for a in recipe.adapters if a.key == key)
    return torch.cat([p.detach().flatten().clone() for p in adapter.parameters()])


def test_staged_training_trains_the_text_encoder_first_then_the_unet(tmp_path, tiny_components):
    cfg = demo_cfg(tmp_path, "train.steps=6", "unet.stage=after_te", "unet.start_step=3",
                   "logging.sample_every=0")
    r = Recipe(cfg, log=lambda s: None).setup()
    te0, unet0 = _lora_b(r, "te"), _lora_b(r, "unet")
    for _ in range(3):
        r.train_step()
    te3, unet3 = _lora_b(r, "te"), _lora_b(r, "unet")
    assert not torch.equal(te3, te0) and torch.equal(unet3, unet0)  # stage 1: the text encoder only
    for _ in range(3):
        r.train_step()
    assert torch.equal(_lora_b(r, "te"), te3) and not torch.equal(_lora_b(r, "unet"), unet3)  # stage 2: the UNet


def test_unet_only_run_leaves_the_text_encoder_alone(tmp_path, tiny_components):
    cfg = demo_cfg(tmp_path, "train.steps=3", "lora.encoders=[]", "logging.sample_every=0")
    path = run_training(cfg, log=lambda s: None)
    sd = load_file(path)
    assert sd and all(k.startswith("lora_unet_") for k in sd)
    with safe_open(path, "pt") as f:
        assert f.metadata()["tc_lite_component"] == "unet"


def test_resume_after_sigkill_matches_an_uninterrupted_te_unet_run(tmp_path, tiny_components):
    extra = (f"unet.mode=lora", "unet.lr=5e-3", "unet.drift_weight=0.5")
    ref = start(tmp_path / "ref", *extra)
    assert ref.wait(timeout=300) == 0, ref.communicate()
    out = tmp_path / "killed"
    proc = start(out, *extra)
    wait_for_steps(out, proc, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(out / "checkpoints")
    again = start(out, *extra)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert "resumed from" in stdout + stderr
    a, b = load_file(tmp_path / "ref" / "tiny_cpu.safetensors"), load_file(out / "tiny_cpu.safetensors")
    assert any(k.startswith("lora_unet_") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run differs"
    ref_rows = read_metrics(tmp_path / "ref")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["drift"] for r in rows] == [r["drift"] for r in ref_rows]


def test_a_te_unet_run_is_evaluated_and_sampled_with_its_unet_part(tmp_path, tiny_components):
    """eval on the run: the LoRA's images differ from the base model's by more than the text part alone makes
    them, i.e. the UNet part is applied; `sample` renders it at weight 1 and weight 0 (the base, exactly)."""
    from tc_lite.evaluate import evaluate_run
    from tc_lite.inference import generate
    from tc_lite.unet_lora import split_unet_lora

    cfg = demo_cfg(tmp_path, "train.steps=20", "logging.sample_every=0", "eval.prompts=builtin:tiny")
    path = run_training(cfg, log=lambda s: None)
    result = evaluate_run(Path(cfg.output.dir), num_prompts=4, seeds=2, steps=cfg.sampling.steps, progress=False,
                          log=lambda s: None)
    summary = json.loads((Path(cfg.output.dir) / "eval" / "summary.json").read_text())
    base, tuned = summary["models"][0], summary["models"][1]
    assert tuned["diversity"] is not None and base["diversity"] is not None
    assert result is not None
    te_only, _ = split_unet_lora(load_file(path))
    comps = copy.deepcopy(tiny_components)
    kw = dict(steps=cfg.sampling.steps, guidance=cfg.sampling.guidance_scale, height=16, width=16)
    with torch.no_grad():
        base_img = generate(comps, ["a blue square"], [0], **kw)
        full = generate(comps, ["a blue square"], [0], loras=[(path, 1.0)], **kw)
        text = generate(comps, ["a blue square"], [0], loras=[(te_only, 1.0)], **kw)
        zero = generate(comps, ["a blue square"], [0], loras=[(path, 0.0)], **kw)
        again = generate(comps, ["a blue square"], [0], **kw)
    assert torch.equal(zero, base_img) and torch.equal(again, base_img)  # generate leaves no LoRA switched on
    assert (full - text).abs().max() > 1e-3  # the UNet part changes the image beyond the text part


def test_a_tiny_sdxl_run_trains_a_unet_lora_under_sgm_names(tmp_path):
    """SDXL: the same adapter, kohya's SGM block names (`lora_unet_input_blocks_4_1_…`), beside both encoders."""
    from tc_lite.models.tiny_sdxl import build_tiny_sdxl_components

    build_tiny_sdxl_components(seed=0, pretrain=True)  # cached on disk after the first build
    cfg = load_config(ROOT / "presets" / "tiny-sdxl-cpu.yaml",
                      [f"output.dir={tmp_path / 'run'}", "logging.progress=false", "logging.sample_every=0",
                       "train.steps=3", "unet.mode=lora", "unet.lr=5e-3"])
    sd = load_file(run_training(cfg, log=lambda s: None))
    prefixes = {re.match(r"lora_(te1|te2|unet_input_blocks|unet_middle_block|unet_output_blocks)_", k)[1] for k in sd}
    assert prefixes == {"te1", "te2", "unet_input_blocks", "unet_middle_block", "unet_output_blocks"}
    assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks")) for k in sd)
    assert any(k.endswith("_transformer_blocks_0_attn2_to_k.lora_up.weight") and sd[k].abs().sum() > 0 for k in sd)


def test_the_unet_part_of_every_lora_format_is_applied_at_inference(tmp_path, tiny_components):
    """kohya, diffusers and peft exports of a TE+UNet LoRA give the same UNet through `UNetLoRAMix` (and a
    text-encoder-only source gives none)."""
    from tc_lite.export import export_diffusers, export_peft
    from tc_lite.unet_lora import add_unet_lora, split_unet_lora, unet_kohya_state_dict
    from tc_lite.lora import lora_layers
    from tc_lite.unet_mix import UNetLoRAMix

    trained = copy.deepcopy(tiny_components.unet)
    add_unet_lora(trained, rank=4, alpha=2.0)
    with torch.no_grad():
        for _, layer in lora_layers(trained):
            layer.lora_B["tc_lite"].weight.normal_(0, 0.1)
    kohya = unet_kohya_state_dict(trained, "sd_v1")
    sources = {"kohya": kohya,
               "diffusers": export_diffusers(kohya, tmp_path / "d", save_dtype=torch.float32, unet=trained),
               "peft": export_peft(kohya, tmp_path / "p", save_dtype=torch.float32, unet=trained)}
    x, h = torch.randn(1, 4, 8, 8), torch.randn(1, 77, tiny_components.unet.config.cross_attention_dim)
    with torch.no_grad():
        want = trained(x, 10, encoder_hidden_states=h).sample
        for name, source in sources.items():
            unet = copy.deepcopy(tiny_components.unet)
            mix = UNetLoRAMix(unet, [source, split_unet_lora(kohya)[0]])
            assert mix.names[1] is None, name  # nothing for the UNet in a text-encoder-only source
            with mix.applied([1.0, 1.0]):
                torch.testing.assert_close(unet(x, 10, encoder_hidden_states=h).sample, want, atol=1e-5, rtol=0)
