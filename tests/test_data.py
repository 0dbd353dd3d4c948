"""Prompt loading (formats and errors), the shipped lists, and the deterministic resumable sampler."""

from __future__ import annotations

import json
from itertools import islice

import pytest

from tc_lite.data import PromptSampler, builtin_prompt_lists, load_prompts
from tc_lite.errors import UserError

# ------------------------------------------------------------------------------------------------ formats


def test_txt_skips_blanks_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\n\na red fox\n   \n  a blue   whale  \r\n#a comment\nan owl\n", encoding="utf-8")
    assert load_prompts(f) == ["a red fox", "a blue whale", "an owl"]
    assert load_prompts(str(f)) == ["a red fox", "a blue whale", "an owl"]


def test_csv_default_column_and_quoting(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('id,prompt\n1,"a cat, sleeping"\n2,\n3,"a dog\non a sofa"\n', encoding="utf-8")
    assert load_prompts(f) == ["a cat, sleeping", "a dog on a sofa"]  # empty cells skipped, newlines collapsed


def test_tsv_parti_prompts_layout_with_bom(tmp_path):
    f = tmp_path / "PartiPrompts.tsv"
    f.write_text("\ufeffPrompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\na tiger\tAnimals\tBasic\t\n",
                 encoding="utf-8")
    assert load_prompts(f) == ["bond", "a tiger"]
    assert load_prompts(f, column="Category") == ["Abstract", "Animals"]


def test_jsonl_default_and_named_key(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a lake", "id": 1}\n\n{"prompt": "a hill", "caption": "x"}\n', encoding="utf-8")
    assert load_prompts(f) == ["a lake", "a hill"]
    g = tmp_path / "c.jsonl"
    g.write_text("\n".join(json.dumps({"caption": c}) for c in ["one", "two"]), encoding="utf-8")
    assert load_prompts(g, column="caption") == ["one", "two"]


def test_extension_is_case_insensitive(tmp_path):
    f = tmp_path / "P.TXT"
    f.write_text("a boat\n")
    assert load_prompts(f) == ["a boat"]


# ------------------------------------------------------------------------------------------------ errors


def _err(path, **kw) -> str:
    with pytest.raises(UserError) as e:
        load_prompts(path, **kw)
    return str(e.value)


def test_missing_file_and_directory(tmp_path):
    msg = _err(tmp_path / "nope.txt")
    assert "nope.txt" in msg and "does not exist" in msg
    assert "directory" in _err(tmp_path)


def test_empty_files(tmp_path):
    (tmp_path / "e.txt").write_text("# only a comment\n\n")
    assert "no prompts" in _err(tmp_path / "e.txt") and "e.txt" in _err(tmp_path / "e.txt")
    (tmp_path / "e.csv").write_text("")
    assert "e.csv" in _err(tmp_path / "e.csv")
    (tmp_path / "h.csv").write_text("prompt\n")
    assert "no prompts" in _err(tmp_path / "h.csv")
    (tmp_path / "e.jsonl").write_text("\n\n")
    assert "no prompts" in _err(tmp_path / "e.jsonl")


def test_not_utf8(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("un caf\xe9 à Paris\n".encode("latin-1"))
    msg = _err(f)
    assert "latin1.txt" in msg and "UTF-8" in msg


def test_unknown_extension(tmp_path):
    f = tmp_path / "p.xlsx"
    f.write_bytes(b"PK")
    msg = _err(f)
    assert "p.xlsx" in msg and ".txt" in msg and ".jsonl" in msg


def test_missing_column_lists_available(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("text,score\na cat,1\n")
    msg = _err(f)
    assert "p.csv" in msg and "'text'" in msg and "'score'" in msg
    msg = _err(f, column="caption")
    assert "'caption'" in msg and "'text'" in msg


def test_bad_json_line_names_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": "broken"\n')
    msg = _err(f)
    assert "p.jsonl" in msg and "line 2" in msg
    f.write_text('{"prompt": "ok"}\n["a list"]\n')
    assert "line 2" in _err(f)
    f.write_text('{"prompt": "ok"}\n{"text": "no key"}\n')
    msg = _err(f)
    assert "line 2" in msg and "'text'" in msg
    f.write_text('{"prompt": 3}\n')
    assert "line 1" in _err(f)


def test_column_with_txt_and_unknown_builtin(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("x\n")
    assert "column" in _err(f, column="prompt")
    msg = _err("builtin:nope")
    assert "builtin:train" in msg and "builtin:heldout" in msg


# ------------------------------------------------------------------------------------------------ shipped lists


def test_default_lists_load_with_expected_sizes_and_are_disjoint():
    train, heldout = load_prompts(None), load_prompts("builtin:heldout")
    assert load_prompts("builtin:train") == train
    assert {"train", "heldout"} <= set(builtin_prompt_lists())
    assert 280 <= len(train) <= 330 and 90 <= len(heldout) <= 120
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)  # no duplicates
    norm = lambda s: " ".join(s.lower().split())
    assert not {norm(p) for p in train} & {norm(p) for p in heldout}
    assert all(0 < len(p.split()) < 60 for p in train + heldout)


# ------------------------------------------------------------------------------------------------ sampler

PROMPTS = [f"prompt {i}" for i in range(10)]


def test_sampler_is_deterministic_and_visits_every_prompt_once_per_epoch():
    a = list(islice(PromptSampler(PROMPTS, 4, seed=7), 10))
    b = list(islice(PromptSampler(PROMPTS, 4, seed=7), 10))
    assert a == b and all(len(x) == 4 for x in a)
    flat = [p for batch in a for p in batch]
    for e in range(4):  # 40 prompts = 4 full epochs; batches straddle epoch boundaries
        assert sorted(flat[10 * e : 10 * (e + 1)]) == sorted(PROMPTS)
    assert flat[:10] != flat[10:20]  # reshuffled each epoch
    c = [p for batch in islice(PromptSampler(PROMPTS, 4, seed=8), 10) for p in batch]
    assert c != flat  # the seed matters


def test_sampler_resume_continues_exactly(tmp_path):
    ref = PromptSampler(PROMPTS, 3, seed=1)
    expected = [next(ref) for _ in range(12)]

    s = PromptSampler(PROMPTS, 3, seed=1)
    first = [next(s) for _ in range(5)]
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON checkpoint
    resumed = PromptSampler(PROMPTS, 3, seed=1)
    resumed.load_state_dict(state)
    assert first + [next(resumed) for _ in range(7)] == expected
    assert state["epoch"] == 1 and state["position"] == 5


def test_sampler_does_not_use_global_rng():
    import random

    random.seed(0)
    a = next(PromptSampler(PROMPTS, 5, seed=3))
    random.seed(999)
    assert next(PromptSampler(PROMPTS, 5, seed=3)) == a


def test_sampler_batch_larger_than_list_and_single_prompt():
    assert next(PromptSampler(["only"], 3, seed=0)) == ["only"] * 3
    big = next(PromptSampler(PROMPTS[:3], 7, seed=0))
    assert len(big) == 7 and sorted(big[:3]) == sorted(PROMPTS[:3])


def test_sampler_rejects_bad_input_and_mismatched_resume():
    with pytest.raises(UserError, match="empty"):
        PromptSampler([], 2, seed=0)
    with pytest.raises(UserError, match="batch_size"):
        PromptSampler(PROMPTS, 0, seed=0)
    state = PromptSampler(PROMPTS, 2, seed=0).state_dict()
    with pytest.raises(UserError, match="same prompts"):
        PromptSampler(PROMPTS[:-1] + ["changed"], 2, seed=0).load_state_dict(state)
    with pytest.raises(UserError, match="same prompts"):
        PromptSampler(PROMPTS, 2, seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="damaged"):
        PromptSampler(PROMPTS, 2, seed=0).load_state_dict({**state, "position": 99})
