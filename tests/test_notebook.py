"""The Colab notebook runs headlessly, top to bottom, on the tiny CPU preset: it cannot rot unnoticed.

Like papermill, the test injects a cell after the one tagged ``parameters`` (the Colab form) that sets the tiny
preset, a few steps and a temporary output folder; everything else runs as a user would run it. Off Colab the
cells that need Colab, Drive, the hub or the network skip themselves, which the test checks too.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "tc_lite_colab.ipynb"
PUBLIC_API = {"tc_lite", "tc_lite.config", "tc_lite.train", "tc_lite.plots", "tc_lite.evaluate"}

nbformat = pytest.importorskip("nbformat", reason="notebook test needs nbformat (pip install -r requirements-dev.txt)")


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_valid_and_uses_only_the_public_api():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert [c for c in code_cells(nb) if "parameters" in c.metadata.get("tags", [])], "no cell tagged 'parameters'"
    imported = set()
    for cell in code_cells(nb):
        assert not cell.get("outputs"), "commit the notebook without outputs"
        imported |= set(re.findall(r"^\s*(?:from|import)\s+(tc_lite[\w.]*)", cell.source, flags=re.MULTILINE))
    assert imported and imported <= PUBLIC_API, imported - PUBLIC_API
    text = "\n".join(c.source for c in code_cells(nb))
    for colab_only in ("drive.mount", "files.download", "login(", '"clone"'):
        line = next(line for line in text.splitlines() if colab_only in line)
        assert line.startswith("    "), f"{colab_only!r} must sit inside an `if IN_COLAB` block: {line!r}"


def test_every_preset_the_form_offers_exists_and_loads():
    from tc_lite.config import load_config

    nb = nbformat.read(NOTEBOOK, as_version=4)
    form = next(c for c in code_cells(nb) if "parameters" in c.metadata.get("tags", []))
    options = re.search(r'PRESET = .*#@param (\[.*\])', form.source)
    assert options, "the PRESET form field lists its choices"
    names = ast.literal_eval(options.group(1))  # the Colab form lists its choices as a Python literal
    assert {"aesthetic", "sdxl-aesthetic", "sdxl-12gb", "tiny-cpu", "tiny-sdxl-cpu"} <= set(names)
    for name in names:
        load_config(ROOT / "presets" / f"{name}.yaml")


def test_notebook_runs_headless_on_the_tiny_preset(tmp_path, tiny_components):
    pytest.importorskip("nbclient", reason="notebook test needs nbclient (pip install -r requirements-dev.txt)")
    pytest.importorskip("ipykernel", reason="notebook test needs ipykernel (pip install -r requirements-dev.txt)")
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    form = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(form + 1, nbformat.v4.new_code_cell(
        'PRESET, STEPS, SAMPLE_EVERY, EVAL_EVERY = "tiny-cpu", 4, 2, 2\n'
        f'OUTPUT_ROOT = Path({str(tmp_path)!r})\n'
        'EXTRA = "logging.progress=false eval.prompts=builtin:tiny eval.num_prompts=2 eval.seeds=[0]"\n'
        "EVAL_PROMPTS, EVAL_SEEDS = 2, 2"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("COLAB_RELEASE_TAG", None)
    # Tiny tensors gain nothing from intra-op threads, and on a shared CI machine spinning threads cost a lot.
    env.setdefault("OMP_NUM_THREADS", "1")
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute(env=env)

    outputs = "\n".join(o.get("text", "") for c in code_cells(nb) for o in c.get("outputs", []) if o.output_type == "stream")
    assert "not on Colab: using the local checkout" in outputs
    assert "hub login skipped (not on Colab)" in outputs and "not on Colab: the LoRA is at" in outputs
    run = tmp_path / "tiny-cpu"
    assert (run / "tiny_cpu.safetensors").is_file()
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"reward.png", "reward_parts.png", "loss.png"}
    assert (run / "eval" / "report.html").is_file() and (run / "eval" / "summary.json").is_file()
    images = [o for c in code_cells(nb) for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # sample grids, curves and an eval grid shown inline
