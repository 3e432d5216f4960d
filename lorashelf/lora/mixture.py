"""The mixture-of-LoRA layer: a base ``nn.Linear`` plus a weighted mix of many experts.

Every reuse method of Ostapenko et al. 2024 (arXiv 2405.11157) and LoraHub (Huang et
al. 2023, arXiv 2307.13269) computes ``base(x) + sum_e w_e(x) * scale_e * B_e A_e x``;
they differ only in where the weights come from: fixed ``(E,)`` (merges, oracle, a
LoraHub candidate), per sequence ``(batch, E)`` (a whole LoraHub population scored in
one forward pass, one candidate per row), or per token from a router (Arrow,
PHATGOOSE). :func:`attach` swaps the adapted ``nn.Linear`` modules of a model for
:class:`MixtureLinear` in place and returns a handle that sets the weights and
restores the original modules. No dense ``d_out x d_in`` delta is ever formed: all
experts' ``A`` are one ``(E*r) x d_in`` matrix, so one matmul gives every expert's
r-dim projection, which is weighted and sent through one ``d_out x (E*r)`` matmul
("dense" strategy). For a router's top-k over very many experts the layer can gather
only the chosen experts' factors per token instead ("gather"), or compute only the
chosen experts' rank columns as sparse products ("sparse": the top-k pattern as a CSR
matrix, a sampled dense-dense product for ``A x`` at those columns, then a sparse-dense
product with ``B``: ``k*r`` of the ``E*r`` columns per token, exact, computed in
float32); ``auto`` picks by the crossovers measured in bench/arrow_forward.py. Fixed weights that need no gradient
are folded into the factors of the experts with a nonzero weight (once per
``set_weights``), so an oracle's one-hot weights cost one expert. The state all layers
of one attachment share is :class:`lorashelf.lora.state.MixtureState`; a kernel for
per-sequence parameter mixing (one LoraHub candidate per row) can be chosen at attach
time (lorashelf.compose.population). ``mix="params"``
mixes the factors instead of the outputs, as mttl does (``B_mix A_mix x`` with
``A_mix = sum w_e A_e``, ``B_mix = sum w_e scale_e B_e``), computed without forming
per-token mixed matrices.

``lora_dtype`` sets the precision of the LoRA branch independently of the base model,
as PEFT does (a bf16 base with float32 adapters casts the activations to float32 for
the LoRA matmuls and the sum back). ``None`` runs it in the activations' dtype, the
fastest choice; ``torch.float32`` reproduces PEFT's numerics on a bf16 model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorashelf.errors import LorashelfError
from lorashelf.lora.router import Router
from lorashelf.lora.stack import Experts, ExpertStack, check_experts, stack_experts
from lorashelf.lora.state import MixtureState

MIXES = ("output", "params")
STRATEGIES = ("auto", "dense", "gather", "sparse")
# "auto" gathers when a module has more than this many experts per chosen expert:
# the dense path's cost grows with E (two matmuls over all E*r rank columns), the
# gather path's with top_k but at a much higher cost per expert (it copies each
# token's factors). On a 2-core CPU, SmolLM2 shapes, rank 4, dense was faster at 128
# experts per chosen one and gather at 256 (bench/arrow_forward.py --strategies).
GATHER_EXPERTS_PER_K = 192
# "auto" takes the sparse path on the CPU for a forward of many tokens without gradient
# when a module has at least this many experts per chosen one: at 1024 tokens, rank 4,
# SmolLM2 shapes, sparse was 1.0x dense at 32 experts per chosen one, 2.5x faster at 64
# and 5x at 256; for a few tokens (decoding) its fixed cost loses to dense
# (bench/arrow_forward.py --strategies). Not measured on GPUs yet: dense/gather there.
SPARSE_EXPERTS_PER_K = 48
SPARSE_MIN_TOKENS = 256


@dataclass
class FoldCache:
    """Fixed weights folded into the factors of the experts that have a nonzero weight."""

    key: tuple
    A: torch.Tensor | None
    B: torch.Tensor | None


class MixtureLinear(nn.Module):
    """``base(x) + sum_e w_e * scale_e * B_e A_e x`` over the experts adapting ``base``."""

    def __init__(self, base: nn.Linear, stack: ExpertStack, state: MixtureState) -> None:
        super().__init__()
        if stack.d_in != base.in_features or stack.d_out != base.out_features:
            raise LorashelfError(
                f"experts at {stack.module} have d_in={stack.d_in}, d_out={stack.d_out} but the "
                f"model's layer is {base.in_features} -> {base.out_features}: the experts were "
                "trained on another base model"
            )
        self.base_layer = base
        self.name = stack.module
        self.state = state
        self.router: Router | None = None
        e, r = stack.A.shape[0], stack.A.shape[1]
        self.n_local, self.rank = e, r
        w = base.weight
        dt = state.lora_dtype or w.dtype
        self.register_buffer("A_all", stack.A.reshape(e * r, -1).to(w.device, dt), False)
        self.register_buffer(
            "B_all", stack.B.permute(1, 0, 2).reshape(-1, e * r).to(w.device, dt), False
        )
        members = torch.tensor(stack.members, dtype=torch.long)
        self.register_buffer("members", members.to(w.device), False)
        self.complete = list(stack.members) == list(range(state.n_experts))
        self._folded: FoldCache | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        st = self.state
        if st.lora_dtype is not None:
            x = st.cast(x)
        if st.routed:
            if self.router is None:  # the router method has no router for this module
                return y
            w = self.router(x)
            self._record(w, x)
            strategy = _choose(st.strategy, self.router.top_k, self.n_local, x, st.mix)
            if strategy == "gather":
                return (y + self._gather(x, w, self.router.top_k)).to(y.dtype)
            if strategy == "sparse":
                return (y + self._sparse(x, w, self.router.top_k)).to(y.dtype)
        elif st.weights is not None:
            w = self._local(st.weights, x)
            self._record(w, x)
            if w.dim() == 1 and not w.requires_grad:
                A, B = self._fold(w, x.dtype)
                if A is None:
                    return y
                return (y + nn.functional.linear(nn.functional.linear(x, A), B)).to(y.dtype)
            if w.dim() > 1 and st.mix == "params" and x.dim() > 1 and st.per_sequence:
                return st.per_sequence(self, x, w.to(x.dtype), y)
        else:
            raise LorashelfError(
                "the mixture has no weights: call set_weights(...) or set_routers(...) first"
            )
        return (y + self._dense(x, w.to(x.dtype))).to(y.dtype)

    def _local(self, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Global weights -> this module's experts, broadcastable against ``x[..., :1]``."""
        w = weights.to(x.device)
        if not self.complete:
            w = w.index_select(-1, self.members)
        if w.dim() == 1:
            return w
        if x.dim() < 2 or x.shape[0] != w.shape[0]:
            raise LorashelfError(
                f"per-sequence weights have {w.shape[0]} rows but {self.name} got a batch of "
                f"{x.shape[0] if x.dim() > 1 else 1}: pass one weight row per sequence (beam "
                "search and num_return_sequences > 1 change the batch size)"
            )
        return w.reshape(w.shape[0], *([1] * (x.dim() - 2)), w.shape[-1])

    def _fold(
        self, w: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Fixed weights without gradient: the factors of only the experts with a nonzero
        weight, weights folded into B (output mix) or both factors mixed (params mix);
        cached until the weights change, so a one-hot oracle costs one expert."""
        # in-place edits of the weights bump their _version; moving or casting the model
        # gives the buffers new storage
        key = (self.state.version, self.state.weights._version, self.A_all.data_ptr(), dtype)
        if self._folded is None or self._folded.key != key:
            e, r = self.n_local, self.rank
            A = self.A_all.view(e, r, -1)
            B = self.B_all.view(-1, e, r)
            keep = torch.nonzero(w).flatten()
            wk = w[keep].float()
            if keep.numel() == 0:
                folded = None, None
            elif self.state.mix == "output":
                folded = A[keep].flatten(0, 1), (B[:, keep].float() * wk[:, None]).flatten(1)
            else:
                a = torch.einsum("e,erd->rd", wk, A[keep].float())
                folded = a, torch.einsum("e,oer->or", wk, B[:, keep].float())
            self._folded = FoldCache(key, *(t if t is None else t.to(dtype) for t in folded))
        return self._folded.A, self._folded.B

    def _dense(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        e, r = self.n_local, self.rank
        h = nn.functional.linear(x, self.A_all.to(x.dtype))  # [..., E_m*r]
        if self.state.mix == "output":
            u = h * w.repeat_interleave(r, dim=-1)
        else:  # params: (sum_e w_e B_e) (sum_e w_e A_e) x, per token or sequence
            h = h.unflatten(-1, (e, r))
            z = (h * w.unsqueeze(-1)).sum(-2, keepdim=True)  # [..., 1, r]
            u = (w.unsqueeze(-1) * z).flatten(-2)
        return nn.functional.linear(u, self.B_all.to(x.dtype))

    def _gather(self, x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
        shape = x.shape[:-1]
        x2, w2 = x.reshape(-1, x.shape[-1]), w.reshape(-1, w.shape[-1]).to(x.dtype)
        vals, idx = w2.topk(k, dim=-1)  # [N, k]
        e, r = self.n_local, self.rank
        A = self.A_all.to(x.dtype).view(e, r, -1)
        B = self.B_all.to(x.dtype).view(-1, e, r).transpose(0, 1)  # [E_m, d_out, r]
        h = torch.einsum("nd,nkrd->nkr", x2, A[idx])
        if self.state.mix == "output":
            u = h * vals.unsqueeze(-1)
        else:
            z = (h * vals.unsqueeze(-1)).sum(1, keepdim=True)
            u = vals.unsqueeze(-1) * z
        out = torch.einsum("nkr,nkor->no", u, B[idx])
        return out.reshape(*shape, out.shape[-1])

    def _sparse(self, x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
        """Output mix over each token's top ``k`` experts as two sparse products."""
        if self.state.mix != "output":
            raise LorashelfError("the sparse strategy computes mix='output' only; use dense")
        shape, r = x.shape[:-1], self.rank
        x2 = x.reshape(-1, x.shape[-1]).float()
        w2 = w.reshape(-1, w.shape[-1]).float()
        n = x2.shape[0]
        vals, idx = w2.topk(k, dim=-1)
        idx, order = idx.sort(-1)  # CSR wants each row's columns in order
        vals = vals.gather(-1, order)
        offsets = torch.arange(r, device=x.device)
        cols = (idx.unsqueeze(-1) * r + offsets).reshape(-1)
        crow = torch.arange(0, n * k * r + 1, k * r, device=x.device)
        size = (n, self.n_local * r)
        pattern = torch.sparse_csr_tensor(crow, cols, x2.new_ones(n * k * r), size=size)
        h = torch.sparse.sampled_addmm(pattern, x2, self.A_all.float().T, beta=0.0)
        u = torch.sparse_csr_tensor(
            crow, cols, h.values() * vals.repeat_interleave(r, dim=-1).reshape(-1), size=size
        )
        out = u @ self.B_all.float().T
        return out.reshape(*shape, out.shape[-1]).to(x.dtype)

    def _record(self, w: torch.Tensor, x: torch.Tensor) -> None:
        if self.state.recorder is not None:
            self.state.recorder.add(self.name, self.members, w.detach(), x.shape[:-1])


def _choose(strategy: str, top_k: int | None, n_local: int, x: torch.Tensor, mix: str) -> str:
    if strategy != "auto":
        return strategy if top_k is not None else "dense"
    if top_k is None:
        return "dense"
    tokens = x.numel() // max(x.shape[-1], 1)
    if (
        x.device.type == "cpu"
        and mix == "output"
        and tokens >= SPARSE_MIN_TOKENS
        and n_local >= SPARSE_EXPERTS_PER_K * top_k
        and not (torch.is_grad_enabled() and x.requires_grad)
    ):
        return "sparse"
    if n_local > GATHER_EXPERTS_PER_K * top_k:
        return "gather"
    return "dense"


class MixtureHandle:
    """The mixture layers attached to one model; ``detach()`` restores the originals.

    Also a context manager: ``with attach(model, experts, weights=w): ...`` detaches
    on exit.
    """

    def __init__(
        self,
        model: nn.Module,
        expert_names: Sequence[str],
        layers: dict[str, MixtureLinear],
        state: MixtureState,
    ) -> None:
        self.model = model
        self.expert_names = list(expert_names)
        self.layers = layers
        self.state = state
        self._originals = {name: layer.base_layer for name, layer in layers.items()}

    @property
    def attached(self) -> bool:
        return bool(self._originals)

    def set_weights(self, weights: torch.Tensor | Sequence[float]) -> None:
        """Fixed ``(E,)`` or per-sequence ``(batch, E)`` weights (gradients flow into them)."""
        w = weights if isinstance(weights, torch.Tensor) else torch.tensor(list(weights))
        if not w.is_floating_point():
            w = w.float()
        if w.dim() not in (1, 2) or w.shape[-1] != self.state.n_experts:
            raise LorashelfError(
                f"weights must have shape ({self.state.n_experts},) or (batch, "
                f"{self.state.n_experts}) for experts {', '.join(self.expert_names)}; "
                f"got {tuple(w.shape)}"
            )
        self.state.weights, self.state.routed = w, False
        self.state.version += 1

    def set_routers(self, routers: Mapping[str, Router]) -> None:
        """Per-token routing: one router per module path (modules without one add nothing)."""
        unknown = sorted(set(routers) - set(self.layers))
        if unknown:
            raise LorashelfError(f"routers for modules that are not attached: {unknown[:3]}")
        for name, layer in self.layers.items():
            router = routers.get(name)
            if isinstance(router, nn.Module):
                router.to(layer.A_all.device)
            layer.router = router
        self.state.weights, self.state.routed = None, True
        self.state.version += 1

    def detach(self) -> None:
        """Put the original modules back (idempotent)."""
        for name, original in self._originals.items():
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, original)
        self._originals = {}

    def __enter__(self) -> MixtureHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach(
    model: nn.Module,
    experts: Experts,
    *,
    weights: torch.Tensor | Sequence[float] | None = None,
    routers: Mapping[str, Router] | None = None,
    mix: str = "output",
    strategy: str = "auto",
    lora_dtype: torch.dtype | None = None,
    per_sequence: Callable[..., torch.Tensor] | None = None,
) -> MixtureHandle:
    """Replace each module adapted by any expert with a :class:`MixtureLinear`, in place.

    ``experts`` is a list of ``(name, {module path: factors})`` with paths relative to
    ``model`` (e.g. ``model.layers.0.self_attn.q_proj`` for a ``*ForCausalLM``).
    Stacks live on each layer's device, in ``lora_dtype`` (None: the layer's dtype),
    which is also the precision the LoRA branch computes in. ``per_sequence`` is a
    kernel for per-sequence weights with ``mix="params"`` (LoraHub's population,
    lorashelf.compose.population); without one the dense path computes them.
    """
    if lora_dtype is not None and not lora_dtype.is_floating_point:
        raise LorashelfError(f"lora_dtype must be a floating dtype, not {lora_dtype}")
    if mix not in MIXES:
        raise LorashelfError(f"unknown mix {mix!r}; use one of {', '.join(MIXES)}")
    if strategy not in STRATEGIES:
        raise LorashelfError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    names = check_experts(experts)
    stacks = stack_experts(experts)
    bases = {m: _find_linear(model, m, names, experts) for m in stacks}
    state = MixtureState(
        n_experts=len(names), mix=mix, strategy=strategy, lora_dtype=lora_dtype,
        per_sequence=per_sequence,
    )  # fmt: skip
    layers = {m: MixtureLinear(bases[m], stacks[m], state) for m in stacks}
    for m, layer in layers.items():
        parent, _, child = m.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    handle = MixtureHandle(model, names, layers, state)
    try:
        if weights is not None:
            handle.set_weights(weights)
        elif routers is not None:
            handle.set_routers(routers)
    except BaseException:
        handle.detach()  # a bad argument leaves the model as it was
        raise
    return handle


def _find_linear(model: nn.Module, path: str, names: list[str], experts: Experts) -> nn.Linear:
    users = [n for n, (_, f) in zip(names, experts) if path in f]
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise LorashelfError(
            f"module {path} (adapted by {', '.join(users[:5])}) is not in the model: these "
            "experts belong to another architecture; pass the *ForCausalLM model they were "
            "trained on"
        ) from None
    if isinstance(module, MixtureLinear):
        raise LorashelfError(f"{path} already has a mixture attached; detach() it first")
    if not isinstance(module, nn.Linear):
        raise LorashelfError(
            f"module {path} (adapted by {', '.join(users[:5])}) is a {type(module).__name__}, "
            "not nn.Linear; only LoRA on linear layers can be mixed"
        )
    return module
