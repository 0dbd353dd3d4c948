"""Does the LoRA help? Generate with the base model and each LoRA on the same prompts and seeds, score every image
with every reward, and write ``report.md`` / ``report.html`` (see ``tc_lite.report``) plus the raw numbers.

What is compared, and why it is fair:

* Every model renders every (prompt, seed) from the *same initial noise* (``tc_lite.inference.sample_images``
  seeds each image by its seed alone), so base and tuned images of a pair differ only by the text embedding; the
  win rate and the mean difference are paired statistics over these pairs.
* The base model is the LoRA at weight 0, which ``tc_lite.inference`` guarantees is the untouched encoder.
* Rewards score the images as they are (no hinge ``target``, no weights): each reward's own number, comparable with
  the paper's Table 1 when the same reward models and prompts (Parti-Prompts TSV) are used.
* Diversity: for each prompt, the mean pairwise distance between the images of its different seeds, averaged over
  prompts. With a reward that exposes ``image_embeds(images) -> [B, D]`` (the built-in ``clip`` reward does) the
  distance is ``1 - cosine`` of those CLIP image embeddings; otherwise a pixel-space fallback, the RMS difference
  of the images downsampled to 32x32 (values in [0, 1]). A tuned model whose diversity falls below
  ``COLLAPSE_RATIO`` x the base model's is flagged: reward hacking tends to make every seed look alike. A flag is a
  reason to look at the grids, not a verdict; one seed gives no diversity at all (n/a).

Work is streamed prompt chunk by prompt chunk, so memory does not grow with the number of prompts: only the scores,
the embeddings (a few KB per image) and small thumbnails of the grid prompts are kept.

Outputs in ``out_dir``: ``report.md``, ``report.html`` (self-contained), ``summary.json`` (every number of the
report), ``scores.jsonl`` (one line per model x prompt x seed), ``grids/`` (side-by-side images), ``scores.png``,
and with ``save_images`` every image under ``images/<model>/``.

Modules: ``settings`` (``EvalSettings``, its validation, ``parse_seeds``, ``parse_reward_spec``), ``stats`` (mean ±
SE, win rate, diversity), ``scoring`` (the reward models and the diversity embedding), ``outputs`` (collected
scores, grids, files, ``EvalResult``), ``run`` (``evaluate``, ``evaluate_run``; all model access in ``_Renderer``).
"""

from tc_lite.evaluate.outputs import EvalResult
from tc_lite.evaluate.run import evaluate, evaluate_run
from tc_lite.evaluate.settings import EvalSettings, EvalSettingsError, parse_reward_spec, parse_seeds
from tc_lite.evaluate.stats import COLLAPSE_RATIO, diversity, summarize

__all__ = [
    "COLLAPSE_RATIO",
    "EvalResult",
    "EvalSettings",
    "EvalSettingsError",
    "diversity",
    "evaluate",
    "evaluate_run",
    "parse_reward_spec",
    "parse_seeds",
    "summarize",
]
