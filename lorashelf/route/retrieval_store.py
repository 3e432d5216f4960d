"""Expert embeddings for retrieval routing, cached in the library per adapter checksum.

LoraRetriever (Zhao et al. 2024, arXiv 2402.09997, section 3.2) represents each LoRA by
the mean embedding of a few of its own training inputs. Here the encoder is the base
model (its last hidden states, mean-pooled over the real tokens: lorashelf.models.
embed), the inputs are up to ``n_prompts`` training prompts taken in turn from the tasks
on the expert's card (lorashelf.data.samples, shared with the text-embedding
clustering baseline), and the embedding is their mean, un-normalised (the router
centres and normalises; see lorashelf.route.retrieval). An embedding depends on the
expert's training data, not its weights, but the data are named by the card, which
travels with the adapter: so, like the Arrow prototypes (lorashelf.route.prototypes),
embeddings are keyed by the adapter's checksum plus a fingerprint of how they were
made (base model, prompt count, length), stored in ``LIBRARY/cache/
retrieval_embeddings.safetensors`` with a sha256 over the tensors in the header
(lorashelf.library.derived), and computed only for experts not yet in the file. A
damaged file is ignored and rewritten; a read-only library just recomputes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lorashelf.errors import LorashelfError
from lorashelf.library.derived import file_problem, save_derived

CACHE_FORMAT = "lorashelf-retrieval-embeddings/1"
CACHE_FILE = "retrieval_embeddings.safetensors"
log = logging.getLogger("lorashelf.route")


def fingerprint(model: torch.nn.Module, n_prompts: int, max_length: int, split_seed: int) -> str:
    """What an embedding depends on besides the expert: 16 hex digits."""
    cfg = getattr(model, "config", None)
    what = {
        "model": getattr(cfg, "_name_or_path", "") or type(model).__name__,
        "hidden": getattr(cfg, "hidden_size", None),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "n_prompts": n_prompts,
        "max_length": max_length,
        "split_seed": split_seed,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def read_embeddings(path: Path, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The stored embeddings among ``keys`` (a missing or damaged file reads as empty)."""
    if not path.exists():
        return {}
    try:
        with safe_open(str(path), framework="np") as f:
            fmt = (f.metadata() or {}).get("format")
    except Exception:  # unreadable: damaged, handled below
        fmt = CACHE_FORMAT
    if fmt != CACHE_FORMAT:
        raise LorashelfError(
            f"{path} is not a retrieval embedding cache ({CACHE_FORMAT}); delete it to rebuild"
        )
    if (why := file_problem(path)) is not None:
        log.warning("retrieval embedding cache %s is damaged (%s); recomputing it", path, why)
        return {}
    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
        return {k: f.get_tensor(k) for k in keys if k in stored}


def write_embeddings(
    path: Path, new: Mapping[str, torch.Tensor], owners: Mapping[str, str] | None = None
) -> None:
    """Add embeddings to the cache file (rewritten through a temporary file + rename);
    ``owners`` names the expert of each checksum (for ``library ls``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    if path.exists() and file_problem(path) is None:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors.update({k: t.float().contiguous() for k, t in new.items() if torch.isfinite(t).all()})
    meta = {"format": CACHE_FORMAT, "method": "mean of base-model mean-pooled last hidden states"}
    save_derived(path, tensors, meta, kind="retrieval", experts=owners or {})


def expert_embeddings(
    model: torch.nn.Module,
    tokenizer: Any,
    names: Sequence[str],
    cards: Mapping[str, Mapping[str, Any]],
    *,
    home: Path | None,
    checksums: Sequence[str] | None = None,
    cache_path: Path | None = None,
    n_prompts: int = 16,
    max_length: int = 256,
    split_seed: int = 0,
) -> torch.Tensor:
    """``[E, hidden]`` float32: each expert's mean prompt embedding (raw, not normalised),
    read from ``cache_path`` where its checksum is there, else computed (and stored)."""
    from lorashelf.data.samples import expert_prompts
    from lorashelf.models.embed import mean_pooled

    fp = fingerprint(model, n_prompts, max_length, split_seed)
    keys = [f"{c}/{fp}" if c else "" for c in (checksums or [""] * len(names))]
    cached = read_embeddings(cache_path, [k for k in keys if k]) if cache_path else {}
    todo = [i for i, k in enumerate(keys) if k not in cached]
    fresh: dict[int, torch.Tensor] = {}
    if todo:
        if tokenizer is None or home is None:
            missing = ", ".join(names[i] for i in todo[:3])
            raise LorashelfError(
                f"retrieval routing needs the base model's tokenizer and the data home to embed "
                f"the training prompts of {missing}; run it through `lorashelf eval` or pass "
                "tokenizer= and home= to build_routed_model"
            )
        todo_names = [names[i] for i in todo]
        prompts = expert_prompts(
            cards, todo_names, home=home, max_prompts=n_prompts, split_seed=split_seed
        )
        for i, ps in zip(todo, prompts):
            fresh[i] = mean_pooled(model, tokenizer, ps, max_length=max_length).mean(0)
        storable = {keys[i]: e for i, e in fresh.items() if keys[i]}
        if cache_path is not None and storable:
            owners = {keys[i].split("/")[0]: names[i] for i in fresh if keys[i]}
            try:
                write_embeddings(cache_path, storable, owners)
            except OSError as e:  # a read-only library: the embeddings are just not kept
                log.info("not caching retrieval embeddings in %s (%s)", cache_path, e)
    rows = [fresh[i] if i in fresh else cached[keys[i]] for i in range(len(names))]
    return torch.stack(rows).float()
