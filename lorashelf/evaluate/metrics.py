"""Per-example metrics: multiple-choice accuracy and gold NLL, normalised exact match.

Accuracy picks the option with the highest summed log-probability (BIG-bench's
``multiple_choice_grade``). The gold NLL is the negative log-likelihood of the gold
continuation per token, averaged over examples: small models sit near chance on
hard tasks, and this number still moves when an expert helps. Exact match
normalises case, punctuation, articles and whitespace (SQuAD-style). A NaN or inf
log-probability is an error, never a score: NaN compares unequal to everything, so an
argmax over NaN picks nothing and "every picked option is gold" would hold vacuously.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

from lorashelf.errors import LorashelfError
from lorashelf.evaluate.scoring import Scored

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, targets: tuple[str, ...] | list[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(t) for t in targets)


class NonFiniteScoreError(LorashelfError):
    """The model gave a NaN or inf log-probability: its weights are numerically broken."""


def check_finite_scores(scores: Sequence[Scored], what: str) -> None:
    """Raise naming the likely cause if any log-probability is NaN or inf."""
    bad = [s.logprob for s in scores if not math.isfinite(s.logprob)]
    if bad:
        raise NonFiniteScoreError(
            f"{what}: the model gave {len(bad)} of {len(scores)} continuations a non-finite "
            f"log-probability ({bad[0]}), so there is no valid score; an expert or merge is "
            "numerically broken (e.g. a huge lora_alpha): check it with `lorashelf library "
            "verify`, re-import it, or evaluate in --dtype fp32"
        )


def mc_correct(
    option_scores: list[Scored], answer: int, credits: tuple[float, ...] | list[float] = ()
) -> bool:
    """True when every option tied for the highest log-probability is a gold option.

    Gold options are those with the top credit in ``credits`` (BIG-bench's
    ``target_scores``: "3" and "three" can both be right), else just ``answer``.
    A tie between a gold and a wrong option counts as wrong.
    """
    check_finite_scores(option_scores, "multiple-choice scoring")
    best = max(s.logprob for s in option_scores)
    picked = [i for i, s in enumerate(option_scores) if s.logprob == best]
    if credits:
        top = max(credits)
        return all(credits[i] == top for i in picked)
    return picked == [answer]


def per_token_nll(score: Scored) -> float:
    check_finite_scores([score], "gold NLL")
    return -score.logprob / max(score.n_tokens, 1)
