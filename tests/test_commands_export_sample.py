"""`tc_lite export` and `tc_lite sample` end to end on real (2-step) tiny training runs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tc_lite.cli import main
from tc_lite.commands.export import export_run
from tc_lite.errors import UserError
from tc_lite.export import read_kohya, read_tuned

PRESET = Path(__file__).resolve().parents[1] / "presets" / "tiny-cpu.yaml"
A1111_KEYS = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", "ss_v2": "False"}


def _train(out: Path, *overrides: str) -> list[str]:
    from tc_lite.config import load_config
    from tc_lite.train import run_training

    logs: list[str] = []
    cfg = load_config(PRESET, ["train.steps=2", "train.batch_size=1", "train.checkpoint_every=1",
                               "logging.sample_every=0", "logging.progress=false", f"output.dir={out}", *overrides])
    run_training(cfg, log=logs.append)
    return logs


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lora_run")
    _train(run)
    return run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """lr 1e-6 as in the paper: the update is below fp16's resolution, the trap Recipe.export must avoid."""
    run = tmp_path_factory.mktemp("full_run")
    return run, _train(run, "lora.mode=full", "optim.lr=1e-6", "output.save_precision=fp16")


def _prompt_ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids


def test_export_every_format_from_a_finished_run(lora_run, tiny_components, capsys):
    from transformers import CLIPTextModel

    from tc_lite.lora import load_kohya_state_dict

    for fmt in ("kohya", "peft", "diffusers", "merged"):
        assert main(["export", str(lora_run), "--format", fmt]) == 0, fmt
    out = capsys.readouterr().out
    assert "models/Lora" in out and "load_lora_weights" in out and "PeftModel" in out
    exp = lora_run / "export"
    assert sorted(p.name for p in exp.iterdir()) == ["tiny_cpu.safetensors", "tiny_cpu_diffusers", "tiny_cpu_peft",
                                                     "tiny_cpu_text_encoder.safetensors"]
    trained, train_meta = read_kohya(lora_run / "tiny_cpu.safetensors")
    again, meta = read_kohya(exp / "tiny_cpu.safetensors")
    assert trained.keys() == again.keys() and all(torch.equal(trained[k], again[k]) for k in trained)
    for md in (train_meta, meta):  # what A1111 reads to list it as SD1 under its alias
        assert A1111_KEYS.items() <= md.items() and md["ss_output_name"] == "tiny_cpu"
        assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert (md["ss_network_dim"], float(md["ss_network_alpha"]), md["ss_steps"]) == ("4", 4.0, "2")
    # peft, diffusers and the merged encoder all carry the same weight change
    te = load_kohya_state_dict(copy.deepcopy(tiny_components.text_encoder), trained)
    ids = _prompt_ids(tiny_components.tokenizer, ["a red square", "a white bar"])
    with torch.no_grad():
        want = te(ids)[0]
        for src in ("tiny_cpu_peft", "tiny_cpu_diffusers"):
            kind, sd = read_tuned(exp / src)
            other = load_kohya_state_dict(copy.deepcopy(tiny_components.text_encoder), sd)
            assert kind == "lora" and (other(ids)[0] - want).abs().max() < 1e-5, src
        from tc_lite.export import load_encoder_weights

        merged = copy.deepcopy(tiny_components.text_encoder)
        load_encoder_weights(merged, read_tuned(exp / "tiny_cpu_text_encoder.safetensors")[1], source="merged")
        assert (merged(ids)[0] - want).abs().max() < 1e-5
        assert isinstance(merged, CLIPTextModel)


def test_export_from_a_checkpoint(lora_run, tmp_path):
    ckpt = lora_run / "checkpoints" / "step_000001.pt"
    path = export_run(lora_run, "kohya", checkpoint=ckpt, save_precision="fp32", log=lambda _: None)
    assert path.name == "tiny_cpu_step000001.safetensors"
    tensors, meta = read_kohya(path)
    trainable = torch.load(ckpt, weights_only=True)["adapters"]["te"]
    a = next(v for k, v in trainable.items() if k.endswith("layers.0.self_attn.q_proj.lora_A.tc_lite.weight"))
    assert torch.equal(tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"], a)
    assert meta["ss_steps"] == "1" and len(tensors) == 2 * 6 * 3  # 2 layers x 6 modules x (down, up, alpha)


def test_full_run_exports_canonical_encoder_and_svd_lora(full_run, tiny_components, capsys):
    run, logs = full_run
    final = run / "tiny_cpu_text_encoder.safetensors"
    with safe_open(str(final), "pt") as f:
        keys = list(f.keys())
        assert all(k.startswith("text_model.") for k in keys)
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}  # fp16 would have erased the update
    assert any("writing fp32 instead" in line for line in logs)
    _, sd = read_tuned(final)
    base = tiny_components.text_encoder.state_dict()
    assert any(not torch.equal(sd["text_model." + k], v) for k, v in base.items() if "position_ids" not in k)

    with pytest.raises(UserError, match="--format merged.*--rank|--rank.*merged"):
        export_run(run, "kohya", log=lambda _: None)
    assert main(["export", str(run), "--format", "kohya", "--rank", "32", "--save-precision", "fp32"]) == 0
    full_rank = capsys.readouterr().out
    assert main(["export", str(run), "--format", "kohya", "--rank", "1"]) == 0
    low_rank = capsys.readouterr().out

    def error(text: str) -> float:
        return float(text.split("relative error ")[1].split("%")[0]) / 100

    assert error(full_rank) < 1e-4 and error(low_rank) > 10 * max(error(full_rank), 1e-6)
    _, meta = read_kohya(run / "export" / "tiny_cpu_r1.safetensors")
    assert meta["ss_network_dim"] == "1" and float(meta["tc_lite_svd_rel_error"]) == pytest.approx(error(low_rank), rel=1e-2)
    assert main(["export", str(run), "--format", "merged"]) == 0


def test_export_errors_are_user_errors(lora_run, full_run, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--format", "kohya"]) == 1
    assert "missing" in capsys.readouterr().err
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(UserError, match="config.yaml"):
        export_run(tmp_path / "not_a_run", "kohya")
    with pytest.raises(UserError, match="--format 'onnx'.*kohya"):
        export_run(lora_run, "onnx")
    with pytest.raises(UserError, match="drop --rank"):
        export_run(lora_run, "kohya", rank=2)
    # a checkpoint of a different architecture: the full-encoder run's checkpoint given to the LoRA run, and a
    # LoRA checkpoint whose rank does not match the run's base/config
    other = full_run[0] / "checkpoints" / "step_000001.pt"
    with pytest.raises(UserError, match="does not fit the run"):
        export_run(lora_run, "kohya", checkpoint=other)
    state = torch.load(lora_run / "checkpoints" / "step_000001.pt", weights_only=True)
    state["adapters"]["te"] = {k: torch.zeros(8, v.shape[1]) if "lora_A" in k else v
                               for k, v in state["adapters"]["te"].items()}
    torch.save(state, tmp_path / "step_000009.pt")
    with pytest.raises(UserError, match="does not fit the run.*another run or base model"):
        export_run(lora_run, "kohya", checkpoint=tmp_path / "step_000009.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt.*not a readable"):
        export_run(lora_run, "kohya", checkpoint=tmp_path / "junk.pt")


def test_sample_grid_compares_weights(lora_run, tmp_path, tiny_components, capsys):
    from tc_lite.inference import generate

    out = tmp_path / "grid.png"
    lora = lora_run / "tiny_cpu.safetensors"
    argv = ["sample", "--model", "tiny", "--lora", str(lora), "--prompt", "a red square", "--prompt", "a blue bar",
            "--seeds", "0", "1", "--weight", "0", "0.5", "1.5", "--steps", "3", "--guidance", "4", "--out", str(out)]
    assert main(argv) == 0
    assert "columns = base, w=0.5, w=1.5" in capsys.readouterr().out
    grid = Image.open(out).convert("RGB")
    cell = 128  # 16-px images upscaled 8x by make_grid
    assert grid.size == (160 + 3 * cell, 18 + 4 * cell)
    # the first column is the base model, pixel for pixel; the last one differs
    base = generate(tiny_components, ["a red square", "a blue bar"], [0, 1], steps=3, guidance=4.0)
    tuned = generate(tiny_components, ["a red square", "a blue bar"], [0, 1], loras=[(lora, 1.5)], steps=3,
                     guidance=4.0)
    pixels = torch.from_numpy(np.array(grid)).permute(2, 0, 1).float() / 255
    for row in range(4):
        for col, want in ((0, base[row]), (2, tuned[row])):
            tile = pixels[:, 18 + row * cell : 18 + (row + 1) * cell : 8, 160 + col * cell : 160 + (col + 1) * cell : 8]
            assert (tile - want).abs().max() <= 1 / 255 + 1e-6, (row, col)
    assert (base - tuned).abs().max() > 1 / 255  # the columns differ

    assert main([*argv[:-1], str(tmp_path / "g.png"), "--weight", "1,1"]) == 1
    assert "--weight '1,1' has 2 values for 1 --lora" in capsys.readouterr().err
    assert main(["sample", "--model", "tiny", "--lora", str(tmp_path / "nope.safetensors"), "--prompt", "x"]) == 1
    assert "nope.safetensors" in capsys.readouterr().err
