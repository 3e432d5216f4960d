"""Retrieval routing in the server: each request's experts, picked once from its prompt.

Retrieval routing (lorashelf.route.retrieval, LoraRetriever: Zhao et al. 2024, arXiv
2402.09997) chooses experts per sequence, from the base model's embedding of the
prompt. ``eval`` does that with hooks on the model; the batched server cannot, since
one forward holds many requests with different compositions. Instead, when the engine
admits retrieval requests, :func:`rows_for` embeds their prompts in one base-model
pass (the plan's ``off`` switch: every adapted layer returns the plain base output;
left padding, positions counting real tokens, the last hidden states mean-pooled over
the real tokens, as eval's router does) and turns each into an ordinary row: a fixed
weighting of its top-k experts, or Arrow over the retrieved experts (``then_arrow``:
Arrow's top-k with every other expert masked out is Arrow over the subset). The
experts' embeddings are eval's too, cached in ``LIBRARY/cache`` per adapter checksum.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lorashelf.serve.kvbatch import left_padded
from lorashelf.serve.plan import RowSpec
from lorashelf.serve.routing import router_config

if TYPE_CHECKING:
    from lorashelf.serve.bank import Bank


@dataclass(frozen=True)
class Retriever:
    """One retrieval router of the bank: its experts, their embeddings and options."""

    library: str
    names: list[str]
    embeddings: torch.Tensor  # [E, hidden], raw
    center: torch.Tensor | None
    config: Any  # RetrievalConfig


def can_retrieve(bank: Bank, lib: str) -> bool:
    """Retrieval needs the experts' embeddings: cached, or made with the tokenizer."""
    from lorashelf.route.retrieval_store import CACHE_FILE

    cached = (bank.libraries[lib].path / "cache" / CACHE_FILE).exists()
    return bank.tokenizer is not None or cached


def build_retriever(bank: Bank, key: Hashable) -> Retriever:
    """The experts' embeddings (computed with the base model where not cached)."""
    from lorashelf.route import RouterContext
    from lorashelf.route.retrieval import embeddings_for

    config = router_config(bank, key)
    experts, sums = bank.library_experts(key)
    library = bank.libraries[key[1]]
    ctx = RouterContext(
        experts, checksums=sums, cache_dir=library.path / "cache", device=bank.device,
        library_dir=library.path, model=bank.model, tokenizer=bank.tokenizer, home=bank.home,
    )  # fmt: skip
    with bank.base_pass():
        embs = embeddings_for(config, ctx).to(bank.device)
    center = embs.mean(0) if config.center and len(experts) > 1 else None
    return Retriever(key[1], [n for n, _ in experts], embs, center, config)


def rows_for(bank: Bank, r: Retriever, prompts: Sequence[Sequence[int]]) -> list[RowSpec]:
    """Each prompt's row: fixed weights over its top-k experts, or Arrow among them."""
    from lorashelf.route.retrieval import sequence_weights

    c = r.config
    weights = sequence_weights(
        embed_prompts(bank, prompts), r.embeddings, r.center, c.top_k, c.weighting, c.temperature
    )
    rows = []
    for w in weights.tolist():
        chosen = [(n, x) for n, x in zip(r.names, w) if x > 0]
        if c.then_arrow:
            subset = tuple(sorted(n for n, _ in chosen))
            arrow = ("arrow", r.library, subset, c.arrow_top_k, c.arrow_temperature, ())
            rows.append(RowSpec(routed=arrow))
        else:
            rows.append(RowSpec(fixed=tuple((f"{r.library}/{n}", x) for n, x in chosen)))
    return rows


def embed_prompts(bank: Bank, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[len(prompts), hidden]``: the base model's last hidden states, mean-pooled."""
    from lorashelf.models.embed import masked_mean
    from lorashelf.models.lm import backbone_and_head

    ids, mask, positions = left_padded(prompts, 0, bank.device)  # the mask hides the pads
    backbone, _ = backbone_and_head(bank.model)
    with bank.base_pass():
        out = backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                       use_cache=False)  # fmt: skip
    return masked_mean(out.last_hidden_state, mask)
