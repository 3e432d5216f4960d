"""Per-example metrics: multiple-choice accuracy and gold NLL, normalised exact match.

Accuracy picks the option with the highest summed log-probability (BIG-bench's
``multiple_choice_grade``). The gold NLL is the negative log-likelihood of the gold
continuation per token, averaged over examples: small models sit near chance on
hard tasks, and this number still moves when an expert helps. Exact match
normalises case, punctuation, articles and whitespace (SQuAD-style).
"""

from __future__ import annotations

import re
import string

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


def mc_correct(
    option_scores: list[Scored], answer: int, credits: tuple[float, ...] | list[float] = ()
) -> bool:
    """True when every option tied for the highest log-probability is a gold option.

    Gold options are those with the top credit in ``credits`` (BIG-bench's
    ``target_scores``: "3" and "three" can both be right), else just ``answer``.
    A tie between a gold and a wrong option counts as wrong.
    """
    best = max(s.logprob for s in option_scores)
    picked = [i for i, s in enumerate(option_scores) if s.logprob == best]
    if credits:
        top = max(credits)
        return all(credits[i] == top for i in picked)
    return picked == [answer]


def per_token_nll(score: Scored) -> float:
    return -score.logprob / max(score.n_tokens, 1)
