"""What a run reports beyond metrics.jsonl: TensorBoard scalars, and held-out evaluation with early stopping.

Both are objects the recipe creates once and calls in its loop; neither needs a branch there:

* ``make_tracker(cfg.logging.tensorboard, out / "tensorboard")`` returns a TensorBoard writer, or a ``NullTracker``
  whose methods do nothing when TensorBoard is disabled or not installed (a run never fails for lack of it).
* ``HeldOutEval(cfg.eval, out)`` scores a fixed held-out prompt set every ``eval.every`` steps with the training
  rewards, without gradients, and appends one line per evaluation to ``<out>/eval.jsonl``. The same prompts and
  seeds are used every time, so successive evaluations are paired (the noise is identical; only the weights
  differ) and a change is the LoRA's doing, not sampling noise. ``should_stop`` turns true after
  ``eval.patience`` evaluations in a row without a better weighted total reward than the best so far.

Resume needs no checkpoint field: ``HeldOutEval`` rebuilds its best score and patience counter from the lines of
``eval.jsonl`` up to the resumed step, and drops later lines (they will be recomputed), like metrics.jsonl
(``RunFolder.truncate_after`` drops them too; doing it twice is harmless). Every evaluated step has exactly one
line: the line of the resumed step itself is kept, so the recipe's evaluation at the start of a resumed run is
skipped (``due`` is false for any step already in the file: the weights are the checkpoint's, the score would be
the same), and evaluating a step again replaces its line rather than adding one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from tc_lite.config import EvalConfig
from tc_lite.errors import UserError

__all__ = ["HeldOutEval", "NullTracker", "TensorBoardTracker", "Tracker", "make_tracker", "tensorboard_available"]

RenderFn = Callable[[list[str], list[int]], torch.Tensor]
"""``render(prompts, seeds) -> images [len(prompts) * len(seeds), 3, H, W]`` in [0, 1], prompt-major."""
ScoreFn = Callable[[torch.Tensor, list[str]], tuple[torch.Tensor, Mapping[str, torch.Tensor]]]
"""``score(images, prompts) -> (total [B], {name: part [B]})``: a ``RewardMix`` is one."""


# --------------------------------------------------------------------------------------------------- TensorBoard


class Tracker(Protocol):
    enabled: bool

    def log_scalars(self, record: Mapping[str, Any], step: int, prefix: str = "") -> None: ...

    def log_image(self, tag: str, image: Any, step: int) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """Does nothing: what the recipe holds when TensorBoard is off, so its loop has no ``if``."""

    enabled = False

    def log_scalars(self, record: Mapping[str, Any], step: int, prefix: str = "") -> None:
        pass

    def log_image(self, tag: str, image: Any, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record (lists such as ``grad_steps`` and flags such as ``skipped`` are not)."""
    out = {}
    for k, v in record.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


class TensorBoardTracker:
    """Scalars (and sample grids) to ``log_dir`` through ``torch.utils.tensorboard.SummaryWriter``.

    Tags keep the metrics.jsonl names, so ``reward/clip`` lands in TensorBoard's ``reward`` group beside
    ``reward``; held-out evaluation is logged with ``prefix="eval/"``.
    """

    enabled = True

    def __init__(self, log_dir: Path, writer: Any | None = None):
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(log_dir))
        self.writer = writer
        self.log_dir = Path(log_dir)

    def log_scalars(self, record: Mapping[str, Any], step: int, prefix: str = "") -> None:
        for k, v in _scalars(record).items():
            self.writer.add_scalar(prefix + k, v, step)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """``image``: a PIL image (e.g. ``outputs.make_grid``'s) or a ``[3,H,W]`` tensor in [0, 1]."""
        if not isinstance(image, torch.Tensor):
            import numpy as np

            image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255.0
        self.writer.add_image(tag, image.clamp(0, 1), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def tensorboard_available() -> bool:
    """True when ``torch.utils.tensorboard`` can be imported (it needs the ``tensorboard`` package)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except Exception:  # noqa: BLE001 -- ImportError, or a broken tensorboard/protobuf combination
        return False
    return True


def make_tracker(enabled: bool, log_dir: str | Path, log: Callable[[str], None] = print) -> Tracker:
    """A TensorBoard tracker writing to ``log_dir`` when ``enabled`` and installed; else a ``NullTracker``.

    A missing package is reported once through ``log`` and the run goes on without TensorBoard (the same numbers
    are in metrics.jsonl, and ``python -m tc_lite plot`` draws them).
    """
    if not enabled:
        return NullTracker()
    if not tensorboard_available():
        log("logging.tensorboard: the tensorboard package is not installed; continuing without it "
            "(pip install tensorboard, or set logging.tensorboard=false to silence this)")
        return NullTracker()
    return TensorBoardTracker(Path(log_dir))


# --------------------------------------------------------------------------------------------------- held-out eval


class HeldOutEval:
    """Held-out reward every ``eval.every`` steps; the early-stopping state; ``<out>/eval.jsonl``.

    One line per evaluation: ``step``, ``reward`` (weighted total, mean over prompts x seeds), ``reward/<name>``
    (each reward's mean), ``reward_se`` (standard error of the total), ``best`` (a new best?), ``best_step``,
    ``best_reward``, ``bad_evals`` (evaluations since the best), ``num_images``, ``sec``.
    """

    def __init__(self, cfg: EvalConfig, out_dir: str | Path, log: Callable[[str], None] = print,
                 resume_step: int = 0, train_prompts: Sequence[str] = (), batch_size: int = 8):
        self.cfg = cfg
        self.log = log
        self.path = Path(out_dir) / "eval.jsonl"
        self.enabled = cfg.every > 0
        self.batch_size = max(1, int(batch_size))
        self.best_reward = -math.inf
        self.best_step: int | None = None
        self.bad_evals = 0
        self.last_step: int | None = None
        self.logged: set[int] = set()  # the steps eval.jsonl holds a line for
        self.prompts: list[str] = []
        if not self.enabled:
            return
        if not cfg.seeds:
            raise UserError("eval.seeds: empty while eval.every > 0; give at least one seed, e.g. eval.seeds=[0]")
        self.prompts = self._load(cfg)
        overlap = sorted(set(self.prompts) & set(train_prompts))
        if overlap:
            log(f"eval.prompts: {len(overlap)} of the {len(self.prompts)} held-out prompts are also training prompts "
                f"(e.g. {overlap[0]!r}); the held-out reward then overstates generalisation")
        self._restore(resume_step)

    @staticmethod
    def _load(cfg: EvalConfig) -> list[str]:
        from tc_lite.data import load_prompts

        try:
            prompts = load_prompts(cfg.prompts)
        except UserError as e:
            raise UserError(f"eval.prompts: {e}") from None
        return prompts[: cfg.num_prompts]

    def _restore(self, resume_step: int) -> None:
        """Rebuild best/patience from eval.jsonl lines up to ``resume_step``; drop the later ones."""
        from tc_lite.run_folder import truncate_jsonl

        rows = truncate_jsonl(self.path, resume_step)
        for r in sorted((r for r in rows if isinstance(r.get("step"), int)), key=lambda r: r["step"]):
            self._update(r["step"], float(r["reward"]))
            self.logged.add(r["step"])

    def _update(self, step: int, reward: float) -> bool:
        improved = reward > self.best_reward
        if improved:
            self.best_reward, self.best_step, self.bad_evals = reward, step, 0
        else:
            self.bad_evals += 1
        self.last_step = step
        return improved

    def due(self, step: int) -> bool:
        """Whether ``step`` is an evaluation step not evaluated yet (step 0 included: the base model's score)."""
        return self.enabled and step % self.cfg.every == 0 and step not in self.logged

    @property
    def should_stop(self) -> bool:
        """True after ``eval.patience`` evaluations in a row without a new best (never when patience is 0)."""
        return self.enabled and self.cfg.patience > 0 and self.bad_evals >= self.cfg.patience

    @torch.no_grad()
    def evaluate(self, step: int, render: RenderFn, score: ScoreFn) -> dict[str, Any]:
        """Render every (prompt, seed), score with ``score``, append the record to eval.jsonl and return it."""
        t0 = time.perf_counter()
        seeds = list(self.cfg.seeds)
        images = render(self.prompts, seeds)
        prompts = [p for p in self.prompts for _ in seeds]
        if images.shape[0] != len(prompts):
            raise ValueError(f"render returned {images.shape[0]} images for {len(prompts)} (prompt, seed) pairs")
        totals, parts = [], {}
        for i in range(0, len(prompts), self.batch_size):
            total, part = score(images[i : i + self.batch_size], prompts[i : i + self.batch_size])
            totals.append(total.detach().float().cpu())
            for k, v in part.items():
                parts.setdefault(k, []).append(v.detach().float().cpu())
        total = torch.cat(totals)
        n = total.numel()
        reward = float(total.mean())
        improved = self._update(step, reward)
        record: dict[str, Any] = {
            "step": step,
            "reward": reward,
            **{f"reward/{k}": float(torch.cat(v).mean()) for k, v in parts.items()},
            "reward_se": float(total.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0,
            "best": improved,
            "best_step": self.best_step,
            "best_reward": self.best_reward,
            "bad_evals": self.bad_evals,
            "num_images": n,
            "sec": time.perf_counter() - t0,
        }
        self._append(record)
        note = "new best" if improved else f"best {self.best_reward:.4g} at step {self.best_step}"
        if self.cfg.patience:
            note += f", {self.bad_evals}/{self.cfg.patience} without improvement"
        self.log(f"eval @ step {step}: held-out reward {reward:.4g} ± {record['reward_se']:.2g} ({note})")
        return record

    def _append(self, record: dict[str, Any]) -> None:
        """One line per step: a step evaluated again (a direct ``evaluate`` call) replaces its old line."""
        from tc_lite.io import save_text_atomic

        step = record["step"]
        if step in self.logged and self.path.is_file():
            lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()
                     and _step_of(line) != step]
            save_text_atomic("".join(line + "\n" for line in lines), self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.logged.add(step)

    def maybe_evaluate(self, step: int, render: RenderFn, score: ScoreFn) -> dict[str, Any] | None:
        """``evaluate`` when ``due(step)``, else None: the one call the training loop makes."""
        return self.evaluate(step, render, score) if self.due(step) else None

    def stop_message(self) -> str:
        return (f"early stop: no better held-out reward in {self.bad_evals} evaluations "
                f"(eval.patience={self.cfg.patience}); best {self.best_reward:.4g} at step {self.best_step}")


def _step_of(line: str) -> Any:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row.get("step") if isinstance(row, dict) else None
