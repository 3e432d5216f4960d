"""The text a model reads for an example: the plain prompt or a chat turn.

Instruction-tuned models answer better when the prompt arrives as a user message.
``render(example, tokenizer, chat=True)`` wraps the prompt in the tokenizer's chat
template with the assistant turn opened (``add_generation_prompt=True``), so the
example's target or options still continue the text directly; with ``chat=False``
the prompt is returned unchanged. The answers themselves are never altered, so
plain and chat scoring differ only in what precedes the answer.
"""

from __future__ import annotations

from typing import Any

from lorashelf.data.task import Example
from lorashelf.errors import LorashelfError


def render(example: Example, tokenizer: Any, chat: bool) -> str:
    """``example.prompt``, or it as one user turn in the tokenizer's chat template.

    In a chat turn the prompt's outer whitespace (BIG-bench prompts open with a
    newline) is dropped: the template delimits the message.
    """
    if not chat:
        return example.prompt
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise LorashelfError(f"{name} has no chat template; run without --chat")
    messages = [{"role": "user", "content": example.prompt.strip()}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
