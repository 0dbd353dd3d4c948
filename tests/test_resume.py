"""Never lose a run: exact resume after SIGKILL, checkpoint on SIGTERM, rotation, and the non-finite guard."""

from __future__ import annotations

import re

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tc_lite.checkpoint import list_checkpoints
from tc_lite.config import load_config
from tc_lite.errors import UserError
from tc_lite.train import Recipe, run_training

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "presets" / "tiny-cpu.yaml"
COMMON = ["train.steps=8", "logging.sample_every=0", "logging.progress=false", "train.checkpoint_every=1"]


class InfiniteGradient:
    """A reward whose value is finite (0) but whose gradient is infinite: d sqrt(u)/du at u=0."""

    def __call__(self, images, prompts):
        u = images - images.detach()
        return torch.sqrt(u.mean(dim=(1, 2, 3)))


def start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run.py", str(TINY), f"output.dir={out}", *COMMON, *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def wait_for_steps(out: Path, proc: subprocess.Popen, n: int, timeout: float = 240) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("run did not progress")


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, tiny_components):
    ref = start(tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.communicate()
    out = tmp_path / "killed"
    proc = start(out)
    wait_for_steps(out, proc, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "tiny_cpu.safetensors").exists()
    done_before = len(list_checkpoints(out / "checkpoints"))
    assert done_before >= 1
    again = start(out)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert "resumed from" in stdout + stderr
    a, b = load_file(tmp_path / "ref" / "tiny_cpu.safetensors"), load_file(out / "tiny_cpu.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run differs"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))


def test_sigterm_checkpoints_and_exits_143(tmp_path, tiny_components):
    out = tmp_path / "run"
    proc = start(out, "train.checkpoint_every=0", "train.steps=500")
    wait_for_steps(out, proc, 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "resume" in stderr
    (ckpt,) = list_checkpoints(out / "checkpoints")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert ckpt.name == f"step_{last:06d}.pt"


def test_checkpoints_rotate_and_resume_null_refuses_unfinished(tmp_path, tiny_components):
    cfg = load_config(TINY, [f"output.dir={tmp_path}", *COMMON, "train.steps=4", "train.keep_checkpoints=2"])
    recipe = Recipe(cfg, log=lambda s: None).setup()
    for _ in range(3):  # step by hand, as a run that crashed after step 3 would have
        recipe.train_step()
        recipe.save_checkpoint()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_000002.pt", "step_000003.pt"]
    with pytest.raises(UserError, match="unfinished run"):
        Recipe(load_config(TINY, [f"output.dir={tmp_path}", *COMMON, "train.resume=null"]), log=lambda s: None).setup()
    resumed = Recipe(load_config(TINY, [f"output.dir={tmp_path}", *COMMON, "train.steps=4"]), log=lambda s: None).setup()
    assert resumed.step == 3


def test_non_finite_gradients_are_skipped_then_stop_the_run(tmp_path, tiny_components):
    cfg = load_config(TINY, [f"output.dir={tmp_path}", *COMMON, "train.max_bad_steps=3",
                             "rewards.terms.redness.weight=0", "rewards.terms.bad.type=tests.test_resume:InfiniteGradient"])
    recipe = Recipe(cfg, log=lambda s: None).setup()
    before = [p.detach().clone() for p in recipe.params]
    with pytest.raises(UserError, match="3 consecutive steps had a non-finite"):
        recipe.train()
    assert all(torch.equal(a, b) for a, b in zip(before, recipe.params))  # skipped steps changed nothing
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [True, True] and rows[-1]["bad_steps"] == 2
    assert not (tmp_path / "tiny_cpu.safetensors").exists()


def test_fp16_loss_scale_backoff_is_not_a_bad_step(tmp_path, tiny_components):
    """With a GradScaler, overflowing gradients first lower the scale (skipped steps, not counted); only below a
    scale of 1 do they count toward max_bad_steps."""
    cfg = load_config(TINY, [f"output.dir={tmp_path}", *COMMON, "train.max_bad_steps=2", "train.steps=20",
                             "rewards.terms.redness.weight=0", "rewards.terms.bad.type=tests.test_resume:InfiniteGradient"])
    recipe = Recipe(cfg, log=lambda s: None).setup()
    recipe.precision.scaler = torch.amp.GradScaler("cpu", enabled=True)  # as fp16 on CUDA does
    for _ in range(4):
        record = recipe.train_step()
        assert record["skipped"] and record["bad_steps"] == 0
    assert recipe.precision.scaler.get_scale() == 65536.0 / 2**4
    recipe.precision.scaler.update(new_scale=0.5)  # the scale has collapsed: the gradients are not just overflowing
    recipe.train_step()
    with pytest.raises(UserError, match="2 consecutive steps had a non-finite"):
        recipe.train_step()


def test_long_prompts_warn_that_they_are_truncated(tmp_path, tiny_components):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n" + "a very long prompt " * 30 + "\n")
    seen: list[str] = []
    Recipe(load_config(TINY, [f"output.dir={tmp_path / 'o'}", *COMMON, f"data.prompts={prompts}"]), log=seen.append).setup()
    assert any("1 of 2 prompts are longer than the text encoder's 77 tokens" in s for s in seen), seen


def test_unwritable_output_dir_is_a_clear_error(tmp_path, tiny_components):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a path through a file cannot be created, even as root
    with pytest.raises(UserError, match="output.dir: cannot write to"):
        Recipe(load_config(TINY, [f"output.dir={blocker / 'run'}", *COMMON]), log=lambda s: None).setup()


def test_out_of_memory_names_the_keys_that_lower_memory_and_keeps_checkpoints(tmp_path, tiny_components, monkeypatch):
    recipe = Recipe(load_config(TINY, [f"output.dir={tmp_path}", *COMMON]), log=lambda s: None).setup()
    recipe.train_step()
    recipe.save_checkpoint()

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(recipe.trainer, "micro_step", oom)
    with pytest.raises(UserError) as e:
        recipe.train()
    msg = str(e.value)
    assert "out of GPU memory" in msg and "memory.checkpoint_unet=true" in msg and "memory.plan=auto" in msg
    assert re.search(r"estimates this step at \d+\.\d\d GiB", msg), msg  # the estimator's figure for this config
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_000001.pt"]
