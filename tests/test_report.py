"""The report's statistics and its two renderings: numbers right, HTML self-contained and escaped."""

from __future__ import annotations

import base64
import math
import re

import pytest
import torch
from PIL import Image

from tc_lite.evaluate import COLLAPSE_RATIO, diversity, summarize
from tc_lite.report import render_markdown, write_report


def test_mean_se_and_paired_win_rate_match_hand_computation():
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    tuned = torch.tensor([[2.0, 2.0], [2.0, 6.0]])  # win, tie, loss, win
    emb = torch.randn(2, 2, 8)
    models = summarize({"base": {"r": base}, "lora": {"r": tuned}}, {"base": emb, "lora": emb}, "cosine")
    b, t = models
    assert b["scores"]["r"]["mean"] == pytest.approx(2.5)
    assert b["scores"]["r"]["se"] == pytest.approx(torch.tensor([1.0, 2, 3, 4]).std().item() / 2)
    assert b["win_rate"] == {}
    w = t["win_rate"]["r"]
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 1, 1, 4)
    assert w["rate"] == pytest.approx(2.5 / 4)
    d = tuned.flatten() - base.flatten()
    assert w["delta"] == pytest.approx(d.mean().item())
    assert w["delta_se"] == pytest.approx(d.std().item() / 2)
    assert t["diversity_ratio"] == pytest.approx(1.0) and not t["collapse"]


def test_diversity_measures_and_collapse_flag():
    gen = torch.Generator().manual_seed(0)
    varied = torch.randn(3, 4, 16, generator=gen)
    same = varied[:, :1].expand(3, 4, 16)  # every seed gives the same image: collapse
    assert diversity(same, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert diversity(same, "rms") == pytest.approx(0.0, abs=1e-9)
    assert diversity(varied, "cosine") > 0.5
    a, b = torch.zeros(1, 2, 4), torch.ones(1, 2, 4)
    assert diversity(torch.cat([a[:, :1], b[:, :1]], 1), "rms") == pytest.approx(1.0)  # RMS of a 1-per-pixel gap
    assert diversity(varied[:, :1], "cosine") is None  # one seed: no pair to compare
    models = summarize({"base": {"r": torch.zeros(3, 4)}, "hacked": {"r": torch.ones(3, 4)}},
                       {"base": varied, "hacked": same + 1e-3 * varied}, "cosine")
    assert models[1]["collapse"] and models[1]["diversity_ratio"] < COLLAPSE_RATIO


def fake_summary(tmp_path, prompt: str = "a <b>bold</b> | piped prompt") -> dict:
    (tmp_path / "grids").mkdir()
    Image.new("RGB", (40, 20), "red").save(tmp_path / "grids" / "p000.png")
    Image.new("RGB", (40, 20), "blue").save(tmp_path / "scores.png")
    gen = torch.Generator().manual_seed(1)
    scores = {"base": {"aesthetic": torch.rand(2, 2, generator=gen) + 5, "clip": torch.rand(2, 2, generator=gen) + 20},
              "my_lora": {"aesthetic": torch.rand(2, 2, generator=gen) + 6, "clip": torch.rand(2, 2, generator=gen) + 20}}
    emb = {m: torch.randn(2, 2, 8, generator=gen) for m in scores}
    return {"model": "tiny", "prompts_source": "parti.tsv", "num_prompts": 2, "seeds": [0, 1],
            "rewards": ["aesthetic", "clip"], "models": summarize(scores, emb, "cosine"),
            "diversity_metric": "Diversity: test metric.", "plot": "scores.png",
            "settings": {"scheduler": "ddim", "steps": 3, "guidance_scale": 7.5, "height": 16, "width": 16,
                         "lora_weight": 1.0, "tuned_steps": None},
            "grids": [{"prompt": prompt, "path": "grids/p000.png"}]}


def test_markdown_has_table1_layout(tmp_path):
    summary = fake_summary(tmp_path)
    md = render_markdown(summary)
    assert "| model | aesthetic | clip |" in md  # one row per model, one column per reward (paper Tab. 1)
    base_row = next(line for line in md.splitlines() if line.startswith("| base |"))
    assert base_row.count("±") == 2
    m = summary["models"][1]["scores"]["aesthetic"]
    assert f"**{m['mean']:.5g} ± {m['se']:.2g}**" in md  # the best mean per reward is bold
    assert "## Tuned vs base" in md and "win rate" in md and "Δ" in md
    assert "(grids/p000.png)" in md and "\\|" in md  # the prompt's pipe cannot break the table/heading


def test_html_is_self_contained_and_escaped(tmp_path):
    summary = fake_summary(tmp_path)
    md_path, html_path = write_report(summary, tmp_path)
    assert md_path.read_text().startswith("# tc-lite evaluation: tiny")
    page = html_path.read_text()
    srcs = re.findall(r"src='([^']*)'", page) + re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)  # grid + chart, embedded
    assert base64.b64decode(srcs[-1].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page  # nothing fetched when opened
    assert page.count("<tr>") == (1 + 2) + (1 + 1) + (1 + 2)  # scores, win rate, diversity: header + rows


def test_html_survives_a_missing_image(tmp_path):
    summary = fake_summary(tmp_path)
    (tmp_path / "grids" / "p000.png").unlink()
    _, html_path = write_report(summary, tmp_path)
    assert "(image missing)" in html_path.read_text()
    assert not math.isnan(summary["models"][1]["diversity"])
