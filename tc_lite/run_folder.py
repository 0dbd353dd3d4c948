"""One run per run folder: what a run leaves in ``output.dir``, checked and cleared in one place.

``RunFolder(out, name).prepare(overwrite=..., resume=...)`` runs before a run touches the folder. It refuses a
finished run (without ``output.overwrite``) and an unfinished one it is not told to continue, then either returns
the checkpoint to resume from or, for a fresh start, clears what an earlier run left (``output.overwrite=true`` over
a finished run, or a run killed before its first checkpoint), so metrics.jsonl / eval.jsonl / samples/ only ever
hold the current run. On resume, ``truncate_after(step)`` drops what was written after the checkpoint: it will be
written again, so every step appears once.

Only tc-lite's own files are removed (``RUN_OUTPUTS``, and the atomic writers' ``.<name>.*.tmp`` leftovers of
them); anything else a user keeps in the folder survives, and ``prefix_cache/`` (a reusable cache whose entries
are key-checked) is never touched.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import re
from pathlib import Path

from .checkpoint import list_checkpoints
from .errors import UserError
from .io import save_text_atomic

__all__ = ["RUN_OUTPUTS", "RunFolder", "truncate_jsonl"]

RUN_OUTPUTS: tuple[str, ...] = (
    "metrics.jsonl",                      # one row per logged step (outputs.MetricsLog)
    "eval.jsonl",                         # one row per held-out evaluation (tracking.HeldOutEval)
    "config.yaml",                        # the resolved config
    ".write_test",                        # the writability probe, should a kill leave it
    "{name}.safetensors",                 # the final LoRA
    "{name}_text_encoder.safetensors",    # the final encoder (lora.mode=full)
    "{name}_text_encoder_2.safetensors",  # SDXL: te2's final encoder when it trains in full
    "{name}_best.safetensors",            # the best held-out weights (eval.patience > 0)
    "{name}_best_2.safetensors",          # SDXL, both encoders full: te2's best
    "{name}_best_text_encoder*.safetensors",  # SDXL, a full encoder beside a LoRA: its best
    "samples/step_*.png",                 # sample grids
    "plots/reward.png", "plots/reward_parts.png", "plots/loss.png", "plots/eval.png",  # tc_lite.plots
    "tensorboard/events.out.tfevents.*",  # logging.tensorboard
    "checkpoints/step_*.pt",              # resumable checkpoints (tc_lite.checkpoint)
)
"""Every file a run writes, relative to ``output.dir`` (``{name}`` is ``output.name``; glob patterns)."""

FINAL_FILES = ("{name}.safetensors", "{name}_text_encoder.safetensors", "{name}_text_encoder_2.safetensors")
"""Written last, by the export: either one marks the folder as holding a finished run."""

_STEP_FILES = {"samples": re.compile(r"^step_(\d+)\.png$"), "checkpoints": re.compile(r"^step_(\d+)\.pt$")}


def _rows_kept(text: str, step: int) -> list[str]:
    """The lines of a jsonl file to keep: complete objects with ``step <= step``, one per step (the last one)."""
    by_step: dict[object, tuple[int, str]] = {}
    for i, line in enumerate(text.splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # blank, or torn by a kill mid-write
            continue
        if not isinstance(row, dict):
            continue
        s = row.get("step")
        if isinstance(s, int) and s > step:
            continue
        by_step[s if isinstance(s, int) else ("line", i)] = (i, line)
    return [line for _, line in sorted(by_step.values())]


def truncate_jsonl(path: Path, step: int) -> list[dict]:
    """Drop the rows of ``path`` with a step after ``step`` (and torn lines, and earlier duplicates of a step);
    rewrite it atomically if that changed anything. Returns the rows kept."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    keep = _rows_kept(text, step)
    new = "".join(line + "\n" for line in keep)
    if new != text:
        save_text_atomic(new, path)
    return [json.loads(line) for line in keep]


class RunFolder:
    """``output.dir`` of one run; ``name`` is ``output.name``."""

    def __init__(self, out: str | Path, name: str):
        self.out = Path(out)
        self.name = name

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def finished(self) -> Path | None:
        """The final file of a finished run in the folder, if there is one."""
        for pattern in FINAL_FILES:
            path = self.out / pattern.format(name=self.name)
            if path.exists():
                return path
        return None

    def prepare(self, *, overwrite: bool, resume: str | None) -> Path | None:
        """Check and set up the folder before a run; return the checkpoint to resume from, or None to start afresh.

        ``resume``: ``"auto"`` continues from the newest ``checkpoints/step_*.pt`` if there is one; a path continues
        from that file; None never resumes. ``overwrite`` starts over whatever the folder holds. A fresh start
        (overwrite, or no checkpoint to continue) first removes the previous run's outputs (``RUN_OUTPUTS``).
        """
        final = self.finished()
        if final is not None and not overwrite:
            raise UserError(f"output.dir: {self.out} already holds a finished run ({final.name}); "
                            "choose another output.dir or set output.overwrite=true")
        found = list_checkpoints(self.checkpoints)
        if resume is None and found and not overwrite:
            raise UserError(f"output.dir: {self.out} holds an unfinished run; continue it with train.resume=auto, "
                            "or start over with output.overwrite=true")
        ckpt: Path | None = None
        if resume not in (None, "auto"):
            if overwrite:
                raise UserError(f"train.resume={resume} and output.overwrite=true contradict each other (overwrite "
                                "starts over and deletes the folder's checkpoints); drop one of them")
            ckpt = Path(resume).expanduser()
            if not ckpt.is_file():
                raise UserError(f"train.resume: checkpoint {ckpt} not found; give a step_NNNNNN.pt file or 'auto'")
        elif resume == "auto" and found and not overwrite:
            ckpt = found[-1]
        self._check_writable()
        if ckpt is None:
            self.clear()
        return ckpt

    def _check_writable(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"output.dir: cannot write to {self.out} ({e.strerror}); choose a writable folder") from None

    def outputs(self) -> list[Path]:
        """The files in the folder that a run wrote (``RUN_OUTPUTS`` and their atomic-write leftovers)."""
        found = []
        for pattern in RUN_OUTPUTS:
            rel = Path(pattern.format(name=glob.escape(self.name)))
            folder = self.out / rel.parent
            if not folder.is_dir():
                continue
            tmp = f".{rel.name}.*.tmp"
            found += [p for p in folder.iterdir() if p.is_file()
                      and (fnmatch.fnmatchcase(p.name, rel.name) or fnmatch.fnmatchcase(p.name, tmp))]
        return sorted(set(found))

    def clear(self) -> None:
        """Remove every run output; tc-lite's subfolders go too once empty (a user's file keeps its folder)."""
        for path in self.outputs():
            path.unlink(missing_ok=True)
        for sub in {Path(p).parent for p in RUN_OUTPUTS} - {Path(".")}:
            folder = self.out / sub
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def truncate_after(self, step: int) -> None:
        """On resume from ``step``: drop what was written after it, as it will be written again. The rows of
        metrics.jsonl / eval.jsonl with a later step, sample grids ``samples/step_*.png`` and checkpoints of later
        steps (a resume from an older checkpoint: rotation would otherwise keep the abandoned ones)."""
        truncate_jsonl(self.out / "metrics.jsonl", step)
        truncate_jsonl(self.out / "eval.jsonl", step)
        for sub, step_file in _STEP_FILES.items():
            folder = self.out / sub
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                m = step_file.match(path.name)
                if m and int(m.group(1)) > step:
                    path.unlink(missing_ok=True)
