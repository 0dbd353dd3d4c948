"""The numbers of the report: mean ± standard error, the paired win rate against the base model, diversity across
seeds and the collapse flag. Pure functions of score and embedding tensors (no model, no files)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

COLLAPSE_RATIO = 0.7  # tuned diversity below 70% of the base model's is flagged as possible collapse


def _mean_se(x: torch.Tensor) -> dict[str, Any]:
    x = x.double().flatten()
    n = x.numel()
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return {"mean": float(x.mean()), "se": se, "n": n}


def _win_rate(tuned: torch.Tensor, base: torch.Tensor) -> dict[str, Any]:
    t, b = tuned.double().flatten(), base.double().flatten()
    d = t - b
    n = d.numel()
    wins, ties = int((d > 0).sum()), int((d == 0).sum())
    return {
        "rate": (wins + 0.5 * ties) / n,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "n": n,
        "delta": float(d.mean()),
        "delta_se": float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0,
    }


def diversity(embeddings: torch.Tensor, metric: str) -> float | None:
    """Mean over prompts of the mean pairwise distance across seeds; ``embeddings`` is [P, S, D].

    ``metric="cosine"``: 1 - cos of L2-normalised embeddings; ``"rms"``: RMS difference per dimension. None with
    fewer than two seeds (there is no pair to compare).
    """
    _, s, d = embeddings.shape
    if s < 2:
        return None
    e = embeddings.double()
    if metric == "cosine":
        e = F.normalize(e, dim=-1)
        dist = 1.0 - e @ e.transpose(1, 2)
    elif metric == "rms":
        dist = torch.cdist(e, e) / math.sqrt(d)
    else:
        raise ValueError(f"unknown diversity metric {metric!r}")
    iu = torch.triu_indices(s, s, offset=1)
    return float(dist[:, iu[0], iu[1]].mean())


def summarize(scores: Mapping[str, Mapping[str, torch.Tensor]], embeddings: Mapping[str, torch.Tensor],
              metric: str) -> list[dict[str, Any]]:
    """Per model (the first is the base): mean ± SE per reward, paired win rate vs base, diversity and its flag.

    ``scores[model][reward]`` is a [P, S] tensor; ``embeddings[model]`` is [P, S, D].
    """
    names = list(scores)
    base = names[0]
    base_div = diversity(embeddings[base], metric)
    models = []
    for name in names:
        div = diversity(embeddings[name], metric)
        ratio = div / base_div if div is not None and base_div else None
        models.append({
            "name": name,
            "scores": {r: _mean_se(v) for r, v in scores[name].items()},
            "win_rate": {} if name == base else {r: _win_rate(v, scores[base][r]) for r, v in scores[name].items()},
            "diversity": div,
            "diversity_ratio": ratio,
            "collapse": bool(name != base and ratio is not None and ratio < COLLAPSE_RATIO),
        })
    return models
