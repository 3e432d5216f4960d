"""Score a whole population of expert weightings on the shots in one forward pass.

The LoraHub reference (sail-sg/lorahub) scores one candidate at a time: it sums the
experts' A and B matrices with the candidate's weights into a state dict, loads it
into a PEFT model and runs the shots through the full model, logits at every
position. Here the experts stay attached once as lorashelf's mixture layer
(lorashelf.lora.mixture) and every sequence carries its own weights: the shots are
replicated once per candidate and a ``(P*N, E)`` weight matrix gives row ``p*N + i``
candidate ``p``'s weights, so a CMA-ES generation of ``P`` candidates costs one
batched pass (chunked to bound memory). The shots' common prompt prefix runs once per
candidate (lorashelf.compose.layout), and only the hidden states that predict target
tokens go through the LM head. The same code is differentiable in the weights, which
the gradient baseline (Adam on ``w``) uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorashelf.compose.config import ComposeConfig
from lorashelf.compose.layout import ShotLayout, choose_layout
from lorashelf.compose.population import PopulationKernel
from lorashelf.compose.shots import ShotBatch
from lorashelf.lora import attach
from lorashelf.lora.stack import Experts
from lorashelf.train.loss import split_lm


def feed(
    backbone: nn.Module,
    lay: ShotLayout,
    population: int,
    before_pass: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Hidden states ``[population * N, p + W, d]`` of the shots laid out as ``lay``,
    once per candidate: the prefix pass (one sequence per candidate, its keys and
    values cropped to the real prefix and repeated for the shots), then the rest.
    ``before_pass(k)`` runs before each pass with the sequences per candidate in it
    (1 for the prefix, N for the rest), e.g. to set per-sequence weights."""
    p, n = population, lay.n_shots
    cache, before = None, []
    if lay.prefix:
        if before_pass:
            before_pass(1)
        out = backbone(
            input_ids=lay.prefix_ids.expand(p, -1),
            attention_mask=lay.prefix_mask.expand(p, -1),
            use_cache=True,
        )
        cache = out.past_key_values
        cache.crop(lay.prefix - lay.prefix_ids.shape[1])  # drop the pad (a no-op at 0)
        cache.batch_repeat_interleave(n)
        before = [out.last_hidden_state[:, : lay.prefix].repeat_interleave(n, dim=0)]
    if before_pass:
        before_pass(n)
    out = backbone(
        input_ids=lay.input_ids.repeat(p, 1),
        attention_mask=lay.attention_mask.repeat(p, 1),
        past_key_values=cache,
        use_cache=cache is not None,
    )
    return torch.cat([*before, out.last_hidden_state], dim=1)


class PopulationScorer:
    """The shots' cross-entropy under any number of weightings of ``experts``.

    Attaches the mixture to ``model`` in place; call :meth:`close` (or use ``with``)
    to restore it. ``loss`` is ``reference`` (token-pooled mean / number of shots, as
    the reference's ``default_get_loss`` returns), ``token`` (token-pooled mean) or
    ``example`` (mean over shots of each shot's per-token mean). ``lora_dtype`` is the
    LoRA branch's precision (float32, as PEFT computes it; None: the model's dtype).
    """

    def __init__(
        self,
        model: nn.Module,
        experts: Experts,
        shots: ShotBatch,
        *,
        mix: str = "params",
        loss: str = "reference",
        chunk: int = 16,
        lora_dtype: torch.dtype | None = torch.float32,
        layout: str = "auto",
    ) -> None:
        self.backbone, self.head = split_lm(model)
        device = next(model.parameters()).device
        self.layout = choose_layout(shots, layout).to(device)
        self.n_targets = torch.tensor(self.layout.n_targets, device=device, dtype=torch.float32)
        self.loss, self.chunk = loss, chunk
        self.handle = attach(
            model, experts, mix=mix, lora_dtype=lora_dtype, per_sequence=PopulationKernel()
        )
        self.names = self.handle.expert_names
        self.passes = 0  # forward passes run (for benchmarks and reports)

    @classmethod
    def from_config(
        cls, model: nn.Module, experts: Experts, shots: ShotBatch, config: ComposeConfig
    ) -> PopulationScorer:
        """The scorer a composition ``config`` asks for (mix, loss, chunk, LoRA dtype)."""
        return cls(
            model, experts, shots, mix=config.mix, loss=config.loss, chunk=config.chunk,
            lora_dtype=config.torch_lora_dtype, layout=config.layout,
        )  # fmt: skip

    @property
    def n_experts(self) -> int:
        return len(self.names)

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        """Loss of each row of ``weights [P, E]`` as ``[P]`` float32, differentiable."""
        p = weights.shape[0]
        return self._loss(
            p, lambda rows: self.handle.set_weights(weights.repeat_interleave(rows, dim=0))
        )

    def routed_loss(self) -> torch.Tensor:
        """The loss ``[1]`` under the routers set on ``self.handle`` (CAT's per-module
        weights, lorashelf.compose.cat), differentiable."""
        return self._loss(1, None)

    def _loss(self, p: int, before_pass: Callable[[int], None] | None) -> torch.Tensor:
        lay = self.layout
        hidden = feed(self.backbone, lay, p, before_pass)
        self.passes += 1
        offsets = torch.arange(p, device=lay.shot.device)[:, None] * lay.n_shots
        hidden = hidden[(offsets + lay.shot).flatten(), lay.col.repeat(p)]
        logits = self.head(hidden).float()
        ce = F.cross_entropy(logits, lay.labels.repeat(p), reduction="none").view(p, -1)
        return self._reduce(ce)

    def _reduce(self, ce: torch.Tensor) -> torch.Tensor:
        if self.loss == "example":
            per_shot = torch.zeros(ce.shape[0], self.layout.n_shots, device=ce.device)
            per_shot.index_add_(1, self.layout.shot, ce)
            return (per_shot / self.n_targets).mean(1)
        pooled = ce.mean(1)
        return pooled / self.layout.n_shots if self.loss == "reference" else pooled

    @torch.no_grad()
    def losses(self, weights: torch.Tensor) -> torch.Tensor:
        """Loss of each row of ``weights [P, E]`` on the CPU, ``chunk`` rows per pass."""
        w = weights.to(device=self.layout.labels.device, dtype=torch.float32)
        parts = [self.forward(w[i : i + self.chunk]) for i in range(0, w.shape[0], self.chunk)]
        return torch.cat(parts).cpu()

    def close(self) -> None:
        self.handle.detach()

    def __enter__(self) -> PopulationScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
