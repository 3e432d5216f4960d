"""Cluster a library on disk: open it, stream its experts, write clusters.json (+ heatmap).

The one path behind ``lorashelf cluster``: experts are read one at a time through the
library (``Library.open(path).get(name).lora_factors()``), so memory stays bounded by
the similarity blocks whatever the library's size; the ``embedding`` method loads the
library's base model to embed each expert's training prompts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lorashelf.cluster.agreement import Truth, agreement, family_truth
from lorashelf.cluster.methods import (
    ClusterConfig,
    ClusterContext,
    Clustering,
    TextEmbedder,
    cluster_experts,
    validate,
)
from lorashelf.cluster.report import clustering_to_json, write_outputs
from lorashelf.errors import LorashelfError


def library_base(lib: Any, cards: dict[str, dict[str, Any]]) -> str | None:
    """The base model a library was built on, from the library or its experts' cards."""
    base = getattr(lib, "base_model", None)
    if base:
        return str(base)
    for card in cards.values():
        if card.get("base_model"):
            return str(card["base_model"])
    return None


def make_text_embedder(
    cards: dict[str, dict[str, Any]],
    model_name: str,
    cfg: ClusterConfig,
    *,
    home: Path,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = False,
) -> TextEmbedder:
    """A function expert names -> embeddings that loads the base model on first use."""

    def embed(names: Sequence[str]) -> torch.Tensor:
        from lorashelf.cluster.text import expert_prompts, text_embeddings
        from lorashelf.models import load_base

        prompts = expert_prompts(
            cards, names, home=home, max_prompts=cfg.max_prompts, split_seed=cfg.split_seed
        )
        base = load_base(model_name, home=home, dtype=dtype, device=device)
        return text_embeddings(base.model, base.tokenizer, prompts, progress=progress)

    return embed


def _open(library: str | os.PathLike[str] | Any) -> Any:
    if isinstance(library, (str, os.PathLike)):
        from lorashelf.library import Library

        return Library.open(library)
    return library


def library_context(
    lib: Any,
    cfg: ClusterConfig,
    *,
    home: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    block_size: int | None = None,
    block_mb: int = 512,
    progress: bool = False,
    text: bool | None = None,
) -> ClusterContext:
    """The :class:`ClusterContext` of an open library: its experts streamed one at a time,
    and a text embedder on the library's base model when ``text`` (default: the
    ``embedding`` method) needs one. Checks the request before reading any expert."""
    names = list(lib.names())
    validate(len(names), cfg)
    cards = {n: dict(lib.get(n).card) for n in names}
    embedder = None
    if text if text is not None else cfg.method == "embedding":
        model = cfg.text_model or library_base(lib, cards)
        if model is None:
            raise LorashelfError(
                "the embedding method needs the base model and the library records none; "
                "pass --model NAME"
            )
        embedder = make_text_embedder(
            cards, model, cfg, home=home, device=torch.device(device), dtype=dtype,
            progress=progress,
        )  # fmt: skip
    return ClusterContext(
        names,
        cards,
        lambda name: lib.get(name).lora_factors(),
        device=device,
        block_size=block_size,
        block_mb=block_mb,
        text_embedder=embedder,
        progress=progress,
    )


def cluster_library(
    library: str | os.PathLike[str] | Any,
    cfg: ClusterConfig,
    *,
    out: str | os.PathLike[str],
    plot: str | os.PathLike[str] | None = None,
    home: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    block_size: int | None = None,
    block_mb: int = 512,
    progress: bool = False,
) -> tuple[Clustering, dict[str, Any]]:
    """Cluster the experts of ``library`` (a path or an open Library); write ``out``, ``plot``."""
    lib = _open(library)
    ctx = library_context(
        lib, cfg, home=home, device=device, dtype=dtype, block_size=block_size,
        block_mb=block_mb, progress=progress,
    )  # fmt: skip
    clustering = cluster_experts(ctx, cfg)
    where = library if isinstance(library, (str, os.PathLike)) else getattr(lib, "path", "")
    source = {"library": str(Path(where).resolve()) if where else "", "n_experts": len(ctx.names)}
    doc = clustering_to_json(clustering, ctx.cards, source=source)
    write_outputs(doc, out, plot=plot, clustering=clustering)
    return clustering, doc


def check_library(
    library: str | os.PathLike[str] | Any,
    families: dict[str, Any],
    cfg: ClusterConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    *,
    home: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> tuple[Truth, list[dict[str, Any]]]:
    """ARI of each method's clustering of ``library`` against ``families``, per seed."""
    from lorashelf.cluster.methods import CLUSTERERS

    for m in methods:
        CLUSTERERS.get(m)  # a typo fails before anything loads
    lib = _open(library)
    ctx = library_context(
        lib, cfg, home=home, device=device, dtype=dtype, progress=progress,
        text="embedding" in methods,
    )  # fmt: skip
    truth = family_truth(ctx.names, ctx.cards, families)
    return truth, agreement(ctx, truth, cfg, methods, seeds)
