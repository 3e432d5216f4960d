"""Rows -> :class:`Example`: where a prompt ends and its answers begin.

The prompt is split from its answers so that ``prompt + answer`` is exactly the text
and the answer's first token carries its leading space, as tokenizers split words
(lm-eval's ``target_delimiter``). Sources that store input and answer apart (JSONL,
HF) join them with ``sep`` unless either side already has whitespace at the seam.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lorashelf.data.task import Example, Kind
from lorashelf.errors import LorashelfError


def move_trailing_space(prompt: str, answers: Sequence[str]) -> tuple[str, list[str]]:
    """``("A: ", ["yes"])`` -> ``("A:", [" yes"])``: the same text, split where
    tokenizers split (lm-eval's ``target_delimiter``)."""
    stripped = prompt.rstrip(" ")
    moved = prompt[len(stripped) :]
    return stripped, [moved + a for a in answers]


def join_answers(prompt: str, answers: Sequence[str], sep: str) -> tuple[str, list[str]]:
    """Join a prompt and its answers for sources that store them apart (JSONL, HF).

    ``sep`` goes between them only when neither side already has whitespace at the
    seam; then any trailing space of the prompt moves onto the answers.
    """
    joined = [
        a if (not prompt or prompt[-1:].isspace() or a[:1].isspace()) else sep + a for a in answers
    ]
    return move_trailing_space(prompt, joined)


def make_example(
    prompt: str,
    *,
    targets: Sequence[str] = (),
    options: Sequence[str] = (),
    answer: int | None = None,
) -> Example:
    """An :class:`Example` for a generative (``targets``) or mc (``options``) row."""
    if options:
        assert answer is not None
        return Example(prompt=prompt, target=options[answer], options=tuple(options), answer=answer)
    return Example(prompt=prompt, target=targets[0], targets=tuple(targets))


def task_kind(examples: Sequence[Example], where: str) -> Kind:
    """``mc`` if every example has options, ``gen`` if none has; mixing is an error."""
    n_mc = sum(ex.is_mc for ex in examples)
    if n_mc and n_mc != len(examples):
        raise LorashelfError(
            f"{where}: {n_mc} of {len(examples)} examples have options; a task must be all "
            "multiple choice or all generative, split it into two files"
        )
    return "mc" if n_mc else "gen"


# An example's text is cut to the model's context (a few thousand tokens) anyway; far
# longer rows only cost time and memory in the tokenizer (a 50 MB row took 2 minutes).
MAX_ROW_CHARS = 1_000_000


def check_size(prompt: Any, target: Any, options: Any, where: str) -> None:
    """Refuse a row whose text is longer than :data:`MAX_ROW_CHARS` characters."""
    parts = [prompt, *(target if isinstance(target, (list, tuple)) else [target])]
    parts += list(options) if isinstance(options, (list, tuple)) else []
    size = sum(len(p) for p in parts if isinstance(p, str))
    if size > MAX_ROW_CHARS:
        raise LorashelfError(
            f"{where}: the row holds {size:,} characters, more than the {MAX_ROW_CHARS:,} "
            "lorashelf reads (a model sees a few thousand tokens of it); shorten or drop it"
        )


def row_example(
    prompt: Any,
    *,
    target: Any = None,
    options: Any = None,
    answer: Any = None,
    sep: str = " ",
    where: str,
) -> Example:
    """A JSONL/HF row -> :class:`Example`: ``target`` (str or list) or ``options`` +
    ``answer`` (an index or the option's text); errors name ``where``."""
    if not isinstance(prompt, str):
        raise LorashelfError(f"{where}: the input must be a string, got {type(prompt).__name__}")
    check_size(prompt, target, options, where)
    if options is not None:
        if (
            not isinstance(options, (list, tuple))
            or len(options) < 2
            or not all(isinstance(o, str) for o in options)
        ):
            raise LorashelfError(f"{where}: options must be a list of at least two strings")
        prompt, opts = join_answers(prompt, options, sep)
        return make_example(prompt, options=opts, answer=answer_index(options, answer, where))
    targets = target if isinstance(target, (list, tuple)) else [target]
    if not targets or not all(isinstance(t, str) for t in targets):
        raise LorashelfError(
            f"{where}: needs a target (a string or a list of strings) or options + answer"
        )
    prompt, targets = join_answers(prompt, targets, sep)
    return make_example(prompt, targets=targets)


def answer_index(options: Sequence[str], answer: Any, where: str) -> int:
    """``answer`` as an index into ``options``; it may also be the option's text."""
    if isinstance(answer, str) and answer in options:
        return list(options).index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
        raise LorashelfError(
            f"{where}: answer must be an index 0..{len(options) - 1} or one of the options, "
            f"got {answer!r}"
        )
    return answer
