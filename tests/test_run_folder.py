"""One run per run folder: RunFolder's checks and clean-up, and every step once in metrics.jsonl / eval.jsonl after an
uninterrupted run, a crash after a checkpoint then resume, a crash before the first checkpoint then restart, and
output.overwrite=true over a finished run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tc_lite.errors import UserError
from tc_lite.run_folder import RunFolder, truncate_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "presets" / "tiny-cpu.yaml"


def write_rows(path: Path, steps: list[int], **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": s, "reward": 0.1 * s, **extra}) + "\n" for s in steps))


def steps_in(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def finished_run(out: Path) -> None:
    """What a finished run with every option on leaves behind, plus a crash leftover of the atomic writer."""
    write_rows(out / "metrics.jsonl", [1, 2, 3, 4])
    write_rows(out / "eval.jsonl", [0, 2, 4])
    for rel in ["run.safetensors", "run_best.safetensors", "config.yaml", "samples/step_000000.png",
                "samples/step_000004.png", "samples/.step_000004.png.abc123.tmp", "plots/reward.png", "plots/loss.png",
                "tensorboard/events.out.tfevents.1.host", "checkpoints/step_000002.pt", "checkpoints/step_000003.pt"]:
        touch(out / rel)


# --------------------------------------------------------------------------------------------------- unit


def test_overwrite_clears_run_outputs_but_keeps_user_files_and_prefix_cache(tmp_path):
    finished_run(tmp_path)
    keep = [touch(tmp_path / rel) for rel in ["notes.txt", "samples/my_edit.png", "prefix_cache/key.json",
                                               "prefix_cache/00/latent.pt", "other_best.safetensors"]]
    assert RunFolder(tmp_path, "run").prepare(overwrite=True, resume="auto") is None  # overwrite never resumes
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(str(p.relative_to(tmp_path)) for p in keep)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "plots").exists()  # emptied folders go


def test_fresh_start_clears_a_dead_runs_rows_and_images(tmp_path):
    """Killed before its first checkpoint: nothing to resume, so nothing of it may survive into the new run."""
    write_rows(tmp_path / "metrics.jsonl", [1, 2])
    write_rows(tmp_path / "eval.jsonl", [0, 2])
    touch(tmp_path / "samples" / "step_000002.png")
    touch(tmp_path / "checkpoints" / ".step_000004.pt.x1.tmp")  # killed while writing the first checkpoint
    for resume in ("auto", None):
        assert RunFolder(tmp_path, "run").prepare(overwrite=False, resume=resume) is None
        assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_resume_auto_returns_the_newest_checkpoint_and_keeps_outputs(tmp_path):
    write_rows(tmp_path / "metrics.jsonl", [1, 2, 3])
    for s in (2, 10, 3):
        touch(tmp_path / "checkpoints" / f"step_{s:06d}.pt")
    assert RunFolder(tmp_path, "run").prepare(overwrite=False, resume="auto") == tmp_path / "checkpoints" / "step_000010.pt"
    assert steps_in(tmp_path / "metrics.jsonl") == [1, 2, 3]


def test_truncate_after_drops_later_rows_images_and_checkpoints(tmp_path):
    write_rows(tmp_path / "metrics.jsonl", [1, 2, 3, 4, 5])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # torn by a kill mid-write
    write_rows(tmp_path / "eval.jsonl", [0, 2, 4])
    for s in (0, 2, 4):
        touch(tmp_path / "samples" / f"step_{s:06d}.png")
    for s in (2, 4):
        touch(tmp_path / "checkpoints" / f"step_{s:06d}.pt")
    touch(tmp_path / "samples" / "mine.png")
    RunFolder(tmp_path, "run").truncate_after(2)
    assert steps_in(tmp_path / "metrics.jsonl") == [1, 2] and steps_in(tmp_path / "eval.jsonl") == [0, 2]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["mine.png", "step_000000.png", "step_000002.png"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000002.pt"]


def test_truncate_jsonl_keeps_one_row_per_step(tmp_path):
    path = tmp_path / "eval.jsonl"
    write_rows(path, [0, 2], run="old")
    with open(path, "a") as f:
        f.write(json.dumps({"step": 0, "run": "new"}) + "\n")
    rows = truncate_jsonl(path, 0)
    assert rows == [{"step": 0, "run": "new"}] and steps_in(path) == [0]
    assert truncate_jsonl(tmp_path / "missing.jsonl", 3) == []


@pytest.mark.parametrize("final", ["run.safetensors", "run_text_encoder.safetensors"])
def test_a_finished_run_is_refused_without_overwrite(tmp_path, final):
    touch(tmp_path / final)
    write_rows(tmp_path / "metrics.jsonl", [1])
    with pytest.raises(UserError, match=f"already holds a finished run \\({final}\\).*output.overwrite=true"):
        RunFolder(tmp_path, "run").prepare(overwrite=False, resume="auto")
    assert (tmp_path / final).exists() and (tmp_path / "metrics.jsonl").exists()  # refused: nothing touched


def test_an_unfinished_run_is_refused_when_resume_is_null(tmp_path):
    touch(tmp_path / "checkpoints" / "step_000003.pt")
    with pytest.raises(UserError, match="unfinished run; continue it with train.resume=auto"):
        RunFolder(tmp_path, "run").prepare(overwrite=False, resume=None)
    assert RunFolder(tmp_path, "run").prepare(overwrite=True, resume=None) is None
    assert not (tmp_path / "checkpoints").exists()


def test_resume_from_a_path(tmp_path):
    elsewhere = touch(tmp_path / "other" / "step_000005.pt")
    out = tmp_path / "run"
    assert RunFolder(out, "run").prepare(overwrite=False, resume=str(elsewhere)) == elsewhere
    with pytest.raises(UserError, match="train.resume: checkpoint .*missing.pt not found"):
        RunFolder(out, "run").prepare(overwrite=False, resume=str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="contradict"):
        RunFolder(out, "run").prepare(overwrite=True, resume=str(elsewhere))


def test_an_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = touch(tmp_path / "a-file")  # a path through a file cannot be created, even as root
    with pytest.raises(UserError, match="output.dir: cannot write to"):
        RunFolder(blocker / "run", "run").prepare(overwrite=False, resume="auto")


def test_held_out_eval_writes_one_row_per_step(tmp_path):
    import torch

    from tc_lite.config import EvalConfig
    from tc_lite.tracking import HeldOutEval

    def render(prompts, seeds):
        return torch.full((len(prompts) * len(seeds), 3, 4, 4), 0.5)

    def score(images, prompts):
        return images.mean(dim=(1, 2, 3)), {}

    cfg = EvalConfig(every=2, prompts="builtin:heldout", num_prompts=2, seeds=[0])
    write_rows(tmp_path / "eval.jsonl", [0, 2, 4])
    ev = HeldOutEval(cfg, tmp_path, log=lambda s: None, resume_step=2)  # resumed at 2: its row is kept, not redone
    assert not ev.due(0) and not ev.due(2) and ev.due(4)
    ev.maybe_evaluate(2, render, score)
    ev.maybe_evaluate(4, render, score)
    ev.evaluate(4, render, score)  # evaluating a step again replaces its row
    assert steps_in(tmp_path / "eval.jsonl") == [0, 2, 4]


# --------------------------------------------------------------------------------------------------- end to end

E2E = ["logging.progress=false", "train.steps=8", "train.checkpoint_every=4", "eval.every=2", "eval.prompts=builtin:tiny",
       "eval.num_prompts=2", "eval.seeds=[0]", "logging.sample_every=2", "logging.sample_seeds=[0]"]


class Crash(Exception):
    """Stands in for SIGKILL: the run stops between steps with no clean-up (every line written was flushed)."""


def run(out: Path, *overrides: str, crash_at: int | None = None) -> list[str]:
    from tc_lite.config import load_config
    from tc_lite.train import Recipe

    logs: list[str] = []
    recipe = Recipe(load_config(TINY, [f"output.dir={out}", *E2E, *overrides]), log=logs.append).setup()
    if crash_at is not None:
        real = recipe.train_step

        def train_step():
            if recipe.step == crash_at:
                raise Crash
            return real()

        recipe.train_step = train_step
        with pytest.raises(Crash):
            recipe.train()
    else:
        recipe.train()
    return logs


def assert_steps(out: Path, metrics: list[int], evals: list[int], samples: list[int]) -> None:
    assert steps_in(out / "metrics.jsonl") == metrics
    assert steps_in(out / "eval.jsonl") == evals
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"step_{s:06d}.png" for s in samples]


def test_uninterrupted_run_logs_every_step_once(tmp_path, tiny_components):
    run(tmp_path)
    assert_steps(tmp_path, list(range(1, 9)), [0, 2, 4, 6, 8], [0, 2, 4, 6, 8])


def test_resumed_run_logs_every_step_once(tmp_path, tiny_components):
    run(tmp_path, crash_at=6)  # steps 1-6 logged, evaluated at 0/2/4/6; the checkpoint is step 4's
    assert steps_in(tmp_path / "metrics.jsonl") == list(range(1, 7)) and steps_in(tmp_path / "eval.jsonl") == [0, 2, 4, 6]
    logs = run(tmp_path)
    assert any("resumed from" in s and "step 4" in s for s in logs), logs
    assert_steps(tmp_path, list(range(1, 9)), [0, 2, 4, 6, 8], [0, 2, 4, 6, 8])


def test_run_killed_before_its_first_checkpoint_restarts_clean(tmp_path, tiny_components):
    run(tmp_path, crash_at=3)
    assert not (tmp_path / "checkpoints").exists() and steps_in(tmp_path / "eval.jsonl") == [0, 2]
    logs = run(tmp_path)
    assert not any("resumed from" in s for s in logs)
    assert_steps(tmp_path, list(range(1, 9)), [0, 2, 4, 6, 8], [0, 2, 4, 6, 8])


def test_overwrite_over_a_finished_run_leaves_only_the_new_run(tmp_path, tiny_components):
    run(tmp_path)
    touch(tmp_path / "notes.txt")
    assert (tmp_path / "checkpoints" / "step_000004.pt").exists()
    run(tmp_path, "output.overwrite=true", "train.steps=3", "logging.sample_every=3", "train.checkpoint_every=0")
    assert_steps(tmp_path, [1, 2, 3], [0, 2], [0, 3])
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "notes.txt").exists()
    assert (tmp_path / "tiny_cpu.safetensors").exists()
