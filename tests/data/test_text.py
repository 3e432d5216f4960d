"""``lorashelf data text``: a plain-text corpus from tasks' inputs that the jsonl
source reads back as language-modelling rows (what GenKnowSub's general experts
train on): train split only, deduplicated, cut at a word, tasks taken in turn."""

from __future__ import annotations

import json

import pytest

from lorashelf.cli import main
from lorashelf.data import load_task
from lorashelf.errors import LorashelfError


def write_task(path, prompts):
    rows = [{"input": p, "target": "x"} for p in prompts]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{path}"


def test_corpus_reads_back_as_plain_text(tmp_path):
    a = write_task(tmp_path / "a.jsonl", [f"alpha text number {i} " * 3 for i in range(20)] * 2)
    b = write_task(tmp_path / "b.jsonl", [f"beta words {i} and more words" for i in range(20)])
    out = tmp_path / "general.jsonl"
    argv = ["--home", str(tmp_path), "data", "text", "--tasks", f"{a},{b}", "--out", str(out),
            "--max", "10", "--max-chars", "40"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and all(r["input"] == "" for r in rows)
    texts = [r["target"] for r in rows]
    assert len(set(texts)) == 10  # the duplicated inputs of a appear once
    assert [t.startswith("alpha") for t in texts[:4]] == [True, False, True, False]  # in turn
    assert all(len(t) <= 40 and not t.endswith(" ") for t in texts)
    train = {" ".join(ex.prompt.split()) for ex in load_task(a, home=tmp_path).splits().train}
    assert all(any(src.startswith(t) for src in train) for t in texts if t.startswith("alpha"))
    task = load_task(
        f"jsonl:{out}", home=tmp_path
    )  # the jsonl source reads it: the whole text is the target
    assert task.kind == "gen" and {ex.target for ex in task.examples} == set(texts)
    assert not out.with_name(out.name + ".tmp").exists()


def test_no_text_is_a_clear_error(tmp_path):
    from lorashelf.data.text import plain_texts

    empty = write_task(tmp_path / "e.jsonl", ["  ", " "])
    with pytest.raises(LorashelfError, match="no input text"):
        plain_texts([empty], tmp_path, n=5)
