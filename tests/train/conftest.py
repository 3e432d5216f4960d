"""Fixtures for training tests: a fresh tiny base model per test and learnable toy tasks.

The model is the shared tiny random Llama with the byte-level tokenizer (built in
tests/conftest.py, no download), wrapped as a :class:`lorashelf.models.BaseModel`.
Each test gets its own copy because training attaches LoRA layers in place.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from lorashelf.data.task import Example, Task
from lorashelf.models import BaseModel
from lorashelf.train.config import TrainConfig

TINY_ID = "tiny-llama"
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "rock"]


def make_task(task_id: str = "toy:parity", n: int = 60, seed: int = 0) -> Task:
    """Multiple choice "is N even?": the answer is a function of the prompt."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        k = rng.randrange(100)
        word = rng.choice(WORDS)
        answer = 0 if k % 2 == 0 else 1
        examples.append(
            Example(
                prompt=f"The {word} number {k} is even? Answer:",
                target=(" yes", " no")[answer],
                options=(" yes", " no"),
                answer=answer,
            )
        )
    return Task(id=task_id, examples=tuple(examples), kind="mc")


def make_gen_task(task_id: str = "toy:echo", n: int = 40, seed: int = 1) -> Task:
    """Generative: repeat the word in the prompt."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        word = rng.choice(WORDS)
        examples.append(Example(prompt=f"Say {word}:", target=f" {word}", targets=(f" {word}",)))
    return Task(id=task_id, examples=tuple(examples), kind="gen")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine OpenMP threads
    waiting on each other make them ~10x slower; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def learnable(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Scale the (tied) embeddings x10: at the default init std 0.02 the largest logit a
    unit-RMS hidden state can reach is ~1, so no adapter could make a confident
    prediction and losses would plateau near log(vocab)."""
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    return model


@pytest.fixture
def tiny_base(tiny_model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast) -> BaseModel:
    model = learnable(copy.deepcopy(tiny_model)).eval()
    return BaseModel(model=model, tokenizer=tiny_tokenizer, name=TINY_ID, base_id=TINY_ID, path="")


@pytest.fixture
def toy_task() -> Task:
    return make_task()


@pytest.fixture
def gen_task() -> Task:
    return make_gen_task()


@pytest.fixture
def fast_config() -> TrainConfig:
    """Small, fp32 (exact comparisons), a few steps."""
    return TrainConfig(steps=6, batch_size=4, lr=1e-2, max_length=64, dtype="fp32", warmup=0.0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer) -> Path:
    """The tiny model saved as a transformers directory, loadable by ``load_base``."""
    d = tmp_path_factory.mktemp("tiny_model")
    learnable(copy.deepcopy(tiny_model)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def write_jsonl(task: Task, path: Path) -> str:
    """Write a toy task as a ``jsonl:`` task file; returns its task id."""
    with open(path, "w") as f:
        for ex in task.examples:
            if ex.is_mc:
                row = {"input": ex.prompt, "options": list(ex.options), "answer": ex.answer}
            else:
                row = {"input": ex.prompt, "target": ex.target}
            f.write(json.dumps(row) + "\n")
    return f"jsonl:{path}"


@pytest.fixture
def jsonl_tasks(tmp_path) -> list[str]:
    """Three small task ids backed by JSONL files in ``tmp_path``."""
    return [
        write_jsonl(make_task(n=24, seed=0), tmp_path / "parity.jsonl"),
        write_jsonl(make_gen_task(n=24, seed=1), tmp_path / "echo.jsonl"),
        write_jsonl(make_task(n=24, seed=2), tmp_path / "parity2.jsonl"),
    ]
