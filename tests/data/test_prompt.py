"""render(): plain prompts pass through; chat wraps the prompt as one user turn."""

from __future__ import annotations

import copy

import pytest

from lorashelf.data.prompt import render
from lorashelf.data.task import Example
from lorashelf.errors import LorashelfError

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
EX = Example(prompt="\nQ: Is the sky blue?\nA:", target=" yes", options=(" yes", " no"), answer=0)


def test_plain_is_unchanged(tiny_tokenizer) -> None:
    assert render(EX, tiny_tokenizer, chat=False) == EX.prompt


def test_chat_uses_the_template_with_generation_prompt(tiny_tokenizer) -> None:
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TEMPLATE
    assert render(EX, tok, chat=True) == "<|user|>Q: Is the sky blue?\nA:<|end|><|assistant|>"
    assert EX.target == " yes"  # answers are untouched


def test_chat_without_template_is_a_user_error(tiny_tokenizer) -> None:
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(LorashelfError, match="no chat template; run without --chat"):
        render(EX, tok, chat=True)
