"""Write a composition into the library as a new expert (a standard PEFT LoRA adapter).

The composed factors are written by the one PEFT writer (lorashelf.lora.peft) as
``adapter_config.json`` + ``adapter_model.safetensors`` that ``PeftModel.from_pretrained``
loads: for ``mix="params"`` exactly the
reference's merged LoRA (``sum w_e A_e``, ``sum w_e B_e`` at the experts' rank and
alpha); for ``mix="output"`` the weighted sum of the experts' updates, either exact
(the concatenated factors, rank = sum of ranks) or cut by SVD to a chosen rank with
the relative truncation error recorded. The card says where it came from
(``source="compose"``) and keeps the weights per expert name, the shots' fingerprint,
the config and the search trace under ``extra``. The adapter is written to a
staging directory inside the library (``Library.staging_dir``) and handed to
``Library.add``, which checks it before anything lands in the library: a failure at
any step leaves the library as it was, and a killed run leaves nothing in /tmp.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorashelf.compose.composed import is_zero
from lorashelf.compose.lorahub import CompositionResult
from lorashelf.errors import LorashelfError
from lorashelf.library import Expert, Library
from lorashelf.lora.peft import truncate_all, write_peft_adapter


def saved_rank(result: CompositionResult, rank: int | None = None) -> int | None:
    """The rank to cut to (None: exact). ``rank`` overrides ``config.save_rank``:
    None = the experts' rank (exact for ``params``), 0 = exact, K = K."""
    want = result.config.save_rank if rank is None else rank
    if want == 0 or (want is None and result.config.mix == "params"):
        return None
    return want if want is not None else result.expert_rank


def save_composition(
    result: CompositionResult,
    library: Library,
    name: str,
    *,
    tasks: Sequence[str] = (),
    rank: int | None = None,
    allow_mixed: bool = False,
    overwrite: bool = False,
) -> Expert:
    """Add ``result`` to ``library`` as expert ``name``; returns the new expert.

    ``rank`` overrides ``result.config.save_rank`` (None: the experts' rank; 0: exact;
    K: SVD-truncated to K). Raises, writing nothing, if the composition is all zero.
    """
    if is_zero(result.factors):
        raise LorashelfError(
            "the composition's weights are all zero, so the composed expert equals the base "
            "model; nothing was saved (lower --l1, raise --budget or pick other experts)"
        )
    cut = saved_rank(result, rank)
    factors, error = truncate_all(result.factors, cut)
    card = {
        "tasks": list(tasks),
        "source": "compose",
        "data_fingerprint": result.examples_fingerprint,
        "origin": {"method": "lorahub", "experts": list(result.experts)},
        "extra": {
            **result.summary(),
            "rank": max(f.rank for f in factors.values()),
            "truncated_to": cut,
            "relative_truncation_error": error,
        },
    }
    with library.staging_dir("compose--") as tmp:
        write_peft_adapter(factors, tmp, library.base_model)
        return library.add(tmp, name=name, card=card, allow_mixed=allow_mixed, overwrite=overwrite)
