"""Fixtures for composition tests: a fresh copy of the tiny model, libraries of random
PEFT experts on it, hand-made shots and a JSONL multiple-choice task."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from lorashelf.data.task import Example


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared CPU OpenMP workers
    waiting for busy cores make each step ~20x slower; restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def model(tiny_model):
    """A private copy of the session's tiny Llama (tests may attach layers to it)."""
    return copy.deepcopy(tiny_model)


@pytest.fixture
def make_adapter(tmp_path, tiny_model, tiny_model_dir, kit):
    """``make_adapter(name, seed, **LoraConfig fields)`` -> a random PEFT adapter dir in
    tmp_path (base recorded as ``tiny_model_dir``)."""

    def make(name: str, seed: int, **options) -> Path:
        return kit.write_adapter(
            tiny_model, tmp_path / name, seed=seed, base_id=str(tiny_model_dir), **options
        )

    return make


@pytest.fixture
def make_library(tmp_path, make_adapter, tiny_model_dir):
    """``make_library(n, seed=0, path=None)`` -> a Library of ``n`` random experts
    e0..e{n-1} for the tiny model (base recorded as ``tiny_model_dir``)."""
    from lorashelf.library import Library

    def make(n: int = 4, seed: int = 0, path: Path | None = None):
        lib = Library.open(path or tmp_path / "lib", create=True, base_model=str(tiny_model_dir))
        for i in range(n):
            src = make_adapter(f"src{seed}-{i}", seed + i)
            lib.add(src, name=f"e{i}", card={"tasks": [f"toy:{i}"], "source": "train"})
        return lib

    return make


SHOTS = [Example(prompt=f"Q: what is {i} plus {i}? A:", target=f" {2 * i}") for i in range(1, 6)]


@pytest.fixture
def shots() -> list[Example]:
    return list(SHOTS)


@pytest.fixture
def mc_task_file(tmp_path) -> Path:
    """A JSONL multiple-choice task of 30 rows: parity of small numbers."""
    rows = [
        {"input": f"Is {i} even?", "options": ["yes", "no"], "answer": 0 if i % 2 == 0 else 1}
        for i in range(30)
    ]
    path = tmp_path / "parity.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_batch(tok, shots):
    """Independent tokenization: prompt + target + EOS, loss only on target and EOS."""
    seqs = []
    for ex in shots:
        p = tok(ex.prompt)["input_ids"]
        t = tok(ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append((p + t, len(p)))
    width = max(len(s) for s, _ in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (s, n_p) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, n_p : len(s)] = torch.tensor(s[n_p:])
    return ids, mask, labels


@pytest.fixture(scope="session")
def ref_batch():
    """``ref_batch(tok, shots) -> (ids, mask, labels)``, the tests' own tokenization."""
    return reference_batch


def _trained_adapter(
    base, tok, examples, out_dir: Path, *, base_id: str, kit, steps: int = 120
) -> Path:
    """A rank-4 LoRA fitted to ``examples`` (targets + EOS) with Adam: the expert that is
    clearly right for them."""
    peft_model = kit.peft_lora(base, seed=0)
    ids, _, labels = reference_batch(tok, examples)
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = peft_model(
            input_ids=ids, attention_mask=(labels != -100) | (ids != 0), labels=labels
        ).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.save_pretrained(str(out_dir))
    path = out_dir / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"base_model_name_or_path": base_id}))
    return out_dir


@pytest.fixture(scope="session")
def fit_adapter(tmp_path_factory, tiny_model, tiny_tokenizer, tiny_model_dir, kit):
    """A LoRA trained on the ``shots`` fixture's examples (trained once per session)."""
    out = tmp_path_factory.mktemp("fit") / "adapter"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _trained_adapter(
            tiny_model, tiny_tokenizer, SHOTS, out, base_id=str(tiny_model_dir), kit=kit, steps=60
        )
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def fitted_library(make_library, fit_adapter):
    """Three random experts plus ``fit``, a LoRA trained on ``shots``."""
    lib = make_library(3)
    lib.add(fit_adapter, name="fit", card={"tasks": ["toy:fit"], "source": "train"})
    return lib
