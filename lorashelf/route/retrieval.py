"""Retrieval routing (LoraRetriever: Zhao et al. 2024, arXiv 2402.09997): pick the top-k
experts for each input sequence by the similarity of the input to the experts' data.

Each expert is represented by the mean embedding of a few of its own training inputs
(lorashelf.route.retrieval_store: the base model's mean-pooled last hidden states,
cached in the library per adapter checksum). An input sequence is embedded the same
way; both are centred by the experts' mean embedding (a causal LM's hidden states
share one large direction that would put every cosine near 1; ``center=False`` turns
this off) and normalised, and the ``top_k`` experts by cosine similarity are mixed with
weights ``1/k`` (``weighting="uniform"``, the paper's mixture) or a softmax of their
similarities over ``temperature``. With ``then_arrow`` the retrieved experts are routed
per token and per module by Arrow (lorashelf.route.arrow: top ``arrow_top_k`` of
``|x . prototype_e|``) among themselves only: the way a large library keeps per-token
routing cheap.

How the sequence reaches per-module routers, which only see their layer's input: a
forward pre-hook on the model's backbone (the decoder the scorer and ``generate``
call) runs the backbone once more with every retrieval router returning zero weights
(the plain base model, exactly), mean-pools its last hidden states over the attention
mask and stores the per-sequence weights ``[batch, E]`` on the routers' shared
:class:`QueryState`; each router broadcasts its module's columns over the tokens. A
forward *without* a past is taken to be the prompt: the evaluation scorer runs the
prompt alone first, so the answer never leaks into the choice of experts. A forward
*with* a past (decoding, or the scorer's continuation of a cached prompt, whose rows
are the prompt rows replicated per option) reuses the weights of the prompt it
continues: each row is matched to a prompt row by its cached layer-0 keys, which are
exact copies of the prompt's (``reorder_cache`` and beam search copy rows). The extra
base pass costs one forward per prompt, none per generated token. ``detach()`` of the
routed model removes the hooks. The server (lorashelf.serve.bank.Bank.retrieve) does
the same without hooks: it embeds each request's prompt before its prefill and gives
the row fixed weights, or Arrow over the retrieved experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorashelf.errors import LorashelfError
from lorashelf.lora.mixture import MIXES
from lorashelf.models.embed import masked_mean
from lorashelf.models.lm import backbone_and_head
from lorashelf.route.prototypes import CACHE_FILE as ARROW_CACHE_FILE
from lorashelf.route.prototypes import arrow_prototypes
from lorashelf.route.retrieval_store import CACHE_FILE, expert_embeddings
from lorashelf.route.router import RouterContext, RouterMethod

WEIGHTINGS = ("uniform", "softmax")
EXTRAS_KEY = "retrieval_embeddings"  # ctx.extras: raw [E, hidden] expert embeddings


@dataclass(frozen=True)
class RetrievalConfig:
    """Retrieval routing's options: experts per sequence and their weights, the optional
    Arrow step among them, and how expert embeddings are made."""

    top_k: int = 3
    weighting: str = "uniform"
    temperature: float = 0.1  # softmax weighting: similarities are cosines in [-1, 1]
    then_arrow: bool = False
    arrow_top_k: int = 1
    arrow_temperature: float = 1.0
    center: bool = True
    n_prompts: int = 16  # training prompts per expert embedding
    prompt_max_length: int = 256  # tokens per embedded training prompt
    train_split_seed: int = 0  # the split the experts were trained on
    mix: str = "output"

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.arrow_top_k < 1:
            raise LorashelfError(
                f"retrieval top_k and arrow_top_k must be >= 1, got {self.top_k}, "
                f"{self.arrow_top_k}"
            )
        if self.weighting not in WEIGHTINGS:
            raise LorashelfError(
                f"unknown weighting {self.weighting!r}; use one of {', '.join(WEIGHTINGS)}"
            )
        if not (self.temperature > 0 and self.arrow_temperature > 0):
            raise LorashelfError("retrieval temperature and arrow_temperature must be > 0")
        if self.n_prompts < 1:
            raise LorashelfError(f"retrieval n_prompts must be >= 1, got {self.n_prompts}")
        if self.mix not in MIXES:
            raise LorashelfError(f"unknown mix {self.mix!r}; use one of {', '.join(MIXES)}")


def normalise(v: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    v = v.float() if center is None else v.float() - center.to(v.device)
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def sequence_weights(
    query: torch.Tensor,
    experts: torch.Tensor,
    center: torch.Tensor | None,
    top_k: int,
    weighting: str = "uniform",
    temperature: float = 0.1,
) -> torch.Tensor:
    """``[batch, E]`` weights: the ``top_k`` experts by cosine of the (centred) query
    embeddings ``[batch, d]`` with the (centred) expert embeddings ``[E, d]``."""
    sim = normalise(query, center) @ normalise(experts, center).to(query.device).T
    vals, idx = sim.topk(min(top_k, experts.shape[0]), dim=-1)
    if weighting == "uniform":
        w = torch.full_like(vals, 1.0 / vals.shape[-1])
    else:
        w = (vals / temperature).softmax(-1)
    return torch.zeros_like(sim).scatter(-1, idx, w)


def _layer0_keys(cache: Any) -> torch.Tensor | None:
    layers = getattr(cache, "layers", None)
    if layers:
        return getattr(layers[0], "keys", None)
    key_cache = getattr(cache, "key_cache", None)
    if key_cache:
        return key_cache[0]
    if isinstance(cache, (tuple, list)) and cache:
        return cache[0][0]
    return None


def _cached_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    keys = _layer0_keys(cache)
    return 0 if keys is None else int(keys.shape[-2])


@dataclass
class QueryState:
    """What the retrieval routers of one model share: the expert embeddings, the
    current per-sequence weights and the prompt they came from."""

    experts: torch.Tensor  # [E, d] raw expert embeddings
    center: torch.Tensor | None
    config: RetrievalConfig
    weights: torch.Tensor | None = None  # [batch, E] for the current forward
    embedding_pass: bool = False  # the hook's own base pass: routers return zeros
    prompt_weights: torch.Tensor | None = None
    prompt_keys: torch.Tensor | None = None  # layer-0 cached keys of the last prompt
    _prefill: bool = False
    hooks: list[Any] = field(default_factory=list)

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.embedding_pass:
            return
        past = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 renames it
        if _cached_length(past) > 0:
            self.weights, self._prefill = self._continued(past), False
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        inputs = {"input_ids": ids, "inputs_embeds": kwargs.get("inputs_embeds")}
        inputs |= {"attention_mask": mask, "position_ids": kwargs.get("position_ids")}
        self.embedding_pass = True
        try:
            with torch.no_grad():
                hidden = module(**inputs, use_cache=False).last_hidden_state
        finally:
            self.embedding_pass = False
        query = masked_mean(hidden, mask if mask is not None and mask.dim() == 2 else None)
        c = self.config
        self.weights = sequence_weights(
            query, self.experts, self.center, c.top_k, c.weighting, c.temperature
        )
        self.prompt_weights, self.prompt_keys, self._prefill = self.weights, None, True

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.embedding_pass or not self._prefill:
            return
        cache = getattr(output, "past_key_values", None)
        self.prompt_keys = None if cache is None else _layer0_keys(cache)

    def _continued(self, past: Any) -> torch.Tensor:
        """The prompt weights of each row of a forward that continues a cached prompt."""
        keys, stored = _layer0_keys(past), self.prompt_keys
        if keys is None or stored is None or self.prompt_weights is None:
            raise LorashelfError(
                "retrieval routing got a cached past it did not see being built; run the "
                "prompt through the routed model (with use_cache=True) before continuing it"
            )
        cur = keys[:, :, : stored.shape[2]]
        if cur.shape == stored.shape and torch.equal(cur, stored):
            return self.prompt_weights
        if cur.shape[1:] != stored.shape[1:]:
            raise LorashelfError("retrieval routing: the cached past is not the last prompt's")
        same = (cur[:, None] == stored[None].to(cur.device)).flatten(2).all(-1)  # [rows, prompts]
        if not bool(same.any(1).all()):
            raise LorashelfError(
                "retrieval routing: a continued row matches none of the last prompt's rows; "
                "run each prompt batch through the routed model before continuing it"
            )
        return self.prompt_weights[same.float().argmax(1).to(self.prompt_weights.device)]

    def release(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


class RetrievalRouter(nn.Module):
    """One module's view of the per-sequence weights, optionally refined by Arrow."""

    def __init__(
        self,
        state: QueryState,
        members: Sequence[int],
        prototypes: torch.Tensor | None,
        config: RetrievalConfig,
    ) -> None:
        super().__init__()
        self.state = state
        self.register_buffer("members", torch.tensor(list(members), dtype=torch.long), False)
        self.register_buffer("prototypes", prototypes, persistent=False)  # [E_m, d_in] | None
        k = config.arrow_top_k if prototypes is not None else config.top_k
        self.top_k: int | None = min(k, config.top_k, len(members))
        self.temperature = config.arrow_temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st, e_m = self.state, self.members.numel()
        shape = (*x.shape[:-1], e_m)
        if st.embedding_pass:
            return x.new_zeros(shape)
        if st.weights is None:
            raise LorashelfError(
                "retrieval routing has no sequence weights: call the model (or its backbone) "
                "with input_ids, not a single layer"
            )
        w = st.weights.to(x.device).index_select(-1, self.members)
        if x.dim() < 2 or x.shape[0] != w.shape[0]:
            raise LorashelfError(
                f"retrieval routing computed weights for {w.shape[0]} sequences but a layer "
                f"got a batch of {x.shape[0] if x.dim() > 1 else 1}"
            )
        w = w.reshape(w.shape[0], *([1] * (x.dim() - 2)), e_m).expand(shape)
        if self.prototypes is None:
            return w.to(x.dtype)
        sim = nn.functional.linear(x, self.prototypes.to(x.dtype)).abs().float()
        sim = sim.masked_fill(w <= 0, float("-inf"))  # Arrow among the retrieved only
        vals, idx = sim.topk(self.top_k, dim=-1)
        kept = torch.isfinite(vals)
        probs = (vals / self.temperature).masked_fill(~kept, float("-inf")).softmax(-1)
        probs = torch.where(kept, probs, 0.0).nan_to_num(0.0)  # no retrieved expert here
        return torch.zeros(shape, dtype=x.dtype, device=x.device).scatter(
            -1, idx, probs.to(x.dtype)
        )

    def release(self) -> None:
        self.state.release()


def embeddings_for(config: RetrievalConfig, ctx: RouterContext) -> torch.Tensor:
    """``[E, hidden]`` raw expert embeddings: ``ctx.extras``' or the library's (cached)."""
    if EXTRAS_KEY in ctx.extras:
        return torch.as_tensor(ctx.extras[EXTRAS_KEY]).float()
    if ctx.library_dir is None:
        raise LorashelfError(
            "retrieval routing reads each expert's training tasks from its card; build it "
            f"from a library (library_dir=...) or pass extras={{{EXTRAS_KEY!r}: [E, d]}}"
        )
    from lorashelf.library import Library

    lib = Library.open(ctx.library_dir)
    names = ctx.expert_names
    cards = {n: {"tasks": lib.get(n).tasks} for n in names}
    use_cache = ctx.cache_dir is not None and ctx.checksums is not None
    return expert_embeddings(
        ctx.model, ctx.tokenizer, names, cards, home=ctx.home, checksums=ctx.checksums,
        cache_path=ctx.cache_dir / CACHE_FILE if use_cache else None,
        n_prompts=config.n_prompts, max_length=config.prompt_max_length, split_seed=config.train_split_seed,
    )  # fmt: skip


def build_retrieval_routers(
    config: RetrievalConfig, ctx: RouterContext
) -> dict[str, RetrievalRouter]:
    """One router per adapted module, all reading one :class:`QueryState` that hooks on
    ``ctx.model``'s backbone fill per forward."""
    if ctx.model is None:
        raise LorashelfError(
            "retrieval routing embeds each input with the base model; build it with "
            "build_routed_model(model, ...); `lorashelf serve` runs it with its own prompt pass"
        )
    n = len(ctx.experts)
    if n == 0:
        raise LorashelfError("retrieval routing needs at least one expert; the list is empty")
    embs = embeddings_for(config, ctx)
    if embs.shape[0] != n:
        raise LorashelfError(f"got {embs.shape[0]} retrieval embeddings for {n} experts")
    center = embs.mean(0) if config.center and n > 1 else None
    state = QueryState(embs, center, config)
    protos: dict[str, torch.Tensor] = {}
    if config.then_arrow:
        use_cache = ctx.cache_dir is not None and ctx.checksums is not None
        protos = arrow_prototypes(
            ctx.experts, checksums=ctx.checksums, device=ctx.device,
            cache_path=ctx.cache_dir / ARROW_CACHE_FILE if use_cache else None,
        )  # fmt: skip
    backbone, _ = backbone_and_head(ctx.model)
    state.hooks = [
        backbone.register_forward_pre_hook(state.before, with_kwargs=True),
        backbone.register_forward_hook(state.after, with_kwargs=True),
    ]
    return {
        m: RetrievalRouter(state, stack.members, protos.get(m), config)
        for m, stack in ctx.stacks.items()
    }


RETRIEVAL = RouterMethod(
    RetrievalConfig,
    build_retrieval_routers,
    "retrieval (LoraRetriever): top-k experts per sequence by cosine of its base-model "
    "embedding with each expert's training-prompt embedding; optional Arrow among them",
)
