"""The evaluation report: ``report.md`` (next to its image files) and ``report.html`` (one self-contained file).

Both are rendered from the same ``summary`` dict that ``tc_lite.evaluate`` writes as ``summary.json``, so the
numbers in the two reports and in the JSON can never disagree. The HTML embeds every image as base64: it can be
mailed, attached to an issue or opened from a Colab download without the folder it came from.

Layout (the paper's Table 1: one row per model, one column per reward):

1. **Scores**: mean ± standard error over all prompts x seeds, per reward per model; the best mean per reward is
   bold.
2. **Tuned vs base**: per LoRA and reward, the win rate over (prompt, seed) pairs (ties count half) and the paired
   mean difference ± its standard error. Pairs share the initial noise, so the difference is the LoRA's doing.
3. **Diversity**: mean pairwise image-embedding distance across seeds of the same prompt, and its ratio to the
   base model; a large drop is flagged as possible collapse (reward hacking makes every seed look alike).
4. **Side-by-side grids**: for each prompt, one row per model, one column per seed.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from tc_lite.io import save_text_atomic

__all__ = ["render_html", "render_markdown", "write_report"]


# --------------------------------------------------------------------------------------------------- formatting


def _fmt(x: float | None, spec: str = ".5g") -> str:
    return "n/a" if x is None else format(x, spec)


def _mean_se(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "n/a"
    return f"{_fmt(cell['mean'])} ± {_fmt(cell['se'], '.2g')}"


def _win(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "–"
    return (f"{100 * cell['rate']:.0f}% ({cell['wins']}/{cell['n']}"
            + (f", {cell['ties']} ties" if cell["ties"] else "") + ")")


def _delta(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "–"
    return f"{cell['delta']:+.4g} ± {_fmt(cell['delta_se'], '.2g')}"


def _best_means(summary: dict[str, Any]) -> dict[str, float]:
    best: dict[str, float] = {}
    for r in summary["rewards"]:
        vals = [m["scores"][r]["mean"] for m in summary["models"] if m["scores"].get(r)]
        if vals:
            best[r] = max(vals)
    return best


def _setup_line(summary: dict[str, Any]) -> str:
    s = summary.get("settings", {})
    parts = [f"{summary['num_prompts']} prompts from {summary.get('prompts_source', '?')}",
             f"{len(summary['seeds'])} seed(s) {summary['seeds']}",
             f"{summary['num_prompts'] * len(summary['seeds'])} images per model"]
    if s:
        parts.append(f"{s.get('scheduler', '?')} {s.get('steps', '?')} steps, CFG {s.get('guidance_scale', '?')}, "
                     f"{s.get('width', '?')}×{s.get('height', '?')}")
        if s.get("lora_weight") is not None:
            tuned = s.get("tuned_steps")
            parts.append(f"LoRA weight {s['lora_weight']:g}, tuned encoder on "
                         + ("all steps" if tuned is None else f"the last {tuned} steps"))
    return "; ".join(parts)


def _diversity_rows(summary: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    for m in summary["models"]:
        ratio = m.get("diversity_ratio")
        flag = "possible collapse" if m.get("collapse") else ""
        rows.append((m["name"], _fmt(m.get("diversity"), ".4g"),
                     "–" if ratio is None or m is summary["models"][0] else f"{ratio:.2f}", flag))
    return rows


# --------------------------------------------------------------------------------------------------- markdown


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(summary: dict[str, Any]) -> str:
    """report.md: tables plus links to the grid images (paths relative to the report's folder)."""
    rewards, models = summary["rewards"], summary["models"]
    best = _best_means(summary)
    out = [f"# tc-lite evaluation: {summary['model']}", "", _setup_line(summary) + ".", ""]

    out += ["## Scores", "", ("Mean ± standard error over every (prompt, seed) image; higher is better; "
                              "the best mean per reward in bold."), ""]
    rows = []
    for m in models:
        cells = []
        for r in rewards:
            text = _mean_se(m["scores"].get(r))
            cells.append(f"**{text}**" if m["scores"].get(r) and m["scores"][r]["mean"] == best.get(r) and len(models) > 1 else text)
        rows.append([m["name"]] + cells)
    out += [_md_table(["model"] + rewards, rows), ""]

    tuned = models[1:]
    if tuned:
        out += ["## Tuned vs base", "", (f"Paired by prompt and seed against `{models[0]['name']}`: win rate (ties "
                                         "count half; 50% = no effect) and mean difference ± standard error."), ""]
        rows = [[m["name"]] + [f"{_win(m['win_rate'].get(r))}; Δ {_delta(m['win_rate'].get(r))}" for r in rewards]
                for m in tuned]
        out += [_md_table(["model"] + rewards, rows), ""]

    out += ["## Diversity", "", summary["diversity_metric"], ""]
    out += [_md_table(["model", "diversity", "vs base", ""], [list(r) for r in _diversity_rows(summary)]), ""]

    if summary.get("plot"):
        out += ["## Scores chart", "", f"![scores]({summary['plot']})", ""]

    grids = summary.get("grids", [])
    if grids:
        out += ["## Side by side", "", "Rows: " + ", ".join(f"`{m['name']}`" for m in models)
                + f"; columns: seeds {summary['seeds']}.", ""]
        for g in grids:
            out += [f"### {_md_cell(g['prompt'])}", "", f"![{_md_cell(g['prompt'])}]({g['path']})", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
td.best { font-weight: bold; }
td.flag { color: #b00; font-weight: bold; }
figure { margin: 1em 0 2em; }
figcaption { font-weight: bold; margin-bottom: 0.3em; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
.note { color: #555; }
"""

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def _data_uri(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_table(header: list[str], rows: list[list[tuple[str, str]]]) -> str:
    """rows of (text, css class) cells; all text is escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="{cls}">{html.escape(text)}</td>' if cls else f"<td>{html.escape(text)}</td>"
                         for text, cls in row) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(summary: dict[str, Any], root: Path) -> str:
    """report.html with every image (paths in ``summary`` are relative to ``root``) embedded as base64."""
    rewards, models = summary["rewards"], summary["models"]
    best = _best_means(summary)
    e = html.escape
    parts = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
              f"<title>tc-lite evaluation: {e(summary['model'])}</title><style>{_CSS}</style></head><body>"),
             f"<h1>tc-lite evaluation: {e(summary['model'])}</h1>", f"<p class='note'>{e(_setup_line(summary))}.</p>"]

    parts.append("<h2>Scores</h2><p class='note'>Mean ± standard error over every (prompt, seed) image; higher is "
                 "better; the best mean per reward in bold.</p>")
    rows = []
    for m in models:
        row = [(m["name"], "")]
        for r in rewards:
            cell = m["scores"].get(r)
            is_best = bool(cell) and len(models) > 1 and cell["mean"] == best.get(r)
            row.append((_mean_se(cell), "best" if is_best else ""))
        rows.append(row)
    parts.append(_html_table(["model"] + rewards, rows))

    if models[1:]:
        parts.append(f"<h2>Tuned vs base</h2><p class='note'>Paired by prompt and seed against "
                     f"<code>{e(models[0]['name'])}</code>: win rate (ties count half; 50% = no effect) and mean "
                     "difference ± standard error.</p>")
        header = ["model"] + [f"{r} win rate" for r in rewards] + [f"Δ {r}" for r in rewards]
        rows = [[(m["name"], "")] + [(_win(m["win_rate"].get(r)), "") for r in rewards]
                + [(_delta(m["win_rate"].get(r)), "") for r in rewards] for m in models[1:]]
        parts.append(_html_table(header, rows))

    parts.append(f"<h2>Diversity</h2><p class='note'>{e(summary['diversity_metric'])}</p>")
    parts.append(_html_table(["model", "diversity", "vs base", ""],
                             [[(a, ""), (b, ""), (c, ""), (d, "flag" if d else "")] for a, b, c, d in _diversity_rows(summary)]))

    if summary.get("plot") and (root / summary["plot"]).is_file():
        parts.append(f"<h2>Scores chart</h2><img alt='scores' src='{_data_uri(root / summary['plot'])}'>")

    grids = summary.get("grids", [])
    if grids:
        parts.append("<h2>Side by side</h2><p class='note'>Rows: " + e(", ".join(m["name"] for m in models))
                     + f"; columns: seeds {e(str(summary['seeds']))}.</p>")
        for g in grids:
            src = root / g["path"]
            img = f"<img alt='{e(g['prompt'])}' src='{_data_uri(src)}'>" if src.is_file() else "<p>(image missing)</p>"
            parts.append(f"<figure><figcaption>{e(g['prompt'])}</figcaption>{img}</figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(summary: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir`` (where the summary's image paths are rooted)."""
    out = Path(out_dir)
    md = save_text_atomic(render_markdown(summary), out / "report.md")
    page = save_text_atomic(render_html(summary, out), out / "report.html")
    return md, page
