"""Builders for tiny, real-format reward models (used by the fixtures in conftest.py)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import pytest
import torch


def _byte_symbols() -> list[str]:
    """CLIP/GPT-2 byte symbols in vocabulary order: printable bytes as themselves, then the others as 256+n."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def clip_tokenizer():
    """The real 49,408-token CLIP tokenizer from open_clip's BPE file (no download, open_clip not imported)."""
    from transformers import CLIPTokenizer

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch (for its BPE vocabulary) is not installed")
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def head_state_dict(input_dim: int = 768, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random aesthetic head spelled exactly like the original file (keys layers.{0,2,4,6,7}.*)."""
    gen = torch.Generator().manual_seed(seed)
    layers = {0: (input_dim, 1024), 2: (1024, 128), 4: (128, 64), 6: (64, 16), 7: (16, 1)}
    state = {}
    for idx, (fan_in, fan_out) in layers.items():
        state[f"layers.{idx}.weight"] = torch.randn(fan_out, fan_in, generator=gen) / fan_in**0.5
        state[f"layers.{idx}.bias"] = torch.randn(fan_out, generator=gen) * 0.1 + (5.0 if idx == 7 else 0.0)
    return state
