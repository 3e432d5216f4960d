"""The options of one LoraHub composition, frozen and saved in the composed expert's card.

Defaults follow LoraHub (Huang et al. 2023, arXiv 2307.13269, and its reference code
sail-sg/lorahub): one weight per expert in ``[-1.5, 1.5]``, an L1 penalty of
``0.05 * mean|w|``, 40 loss evaluations, the experts' A and B matrices mixed element
by element (``mix="params"``) and the reference's objective (``loss="reference"``:
the token-pooled cross-entropy of the shots' targets divided by the number of shots,
which is what ``default_get_loss`` returns when all shots fit in one batch, as in its
BIG-bench Hard script). ``optimizer="ngopt"`` with ``popsize=None`` is the
reference's sequential nevergrad search; ``cma`` (default) asks CMA-ES for whole
generations, which lorashelf scores in one batched forward pass each.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorashelf.errors import LorashelfError

MIXES = ("params", "output")
LOSSES = ("reference", "token", "example")
LORA_DTYPES = ("float32", "model")
LAYOUTS = ("auto", "prefix", "padded")


@dataclass(frozen=True)
class ComposeConfig:
    """One LoraHub search.

    ``experts`` picks library experts by name (None: all). ``preselect`` keeps the N
    experts ranked best on the shots by ``preselect_by`` (``loss``: each expert's own
    loss; ``arrow``: Arrow routing mass on the shots' tokens) before the search.
    ``budget`` counts loss evaluations (gradient-free) or Adam steps (``adam``).
    ``popsize`` is the CMA-ES population (None: ``4 + 3 ln E``) or the number of
    candidates nevergrad is asked for at once (None: 1, the reference). ``chunk``
    bounds memory: candidates scored per forward pass. ``save_rank`` is the rank of
    the saved adapter: None keeps the experts' rank (exact for ``params``, an SVD
    truncation for ``output``), 0 saves the exact factors (``output``: the
    concatenation, rank = sum of ranks), K truncates to K by SVD. ``lora_dtype`` is
    the LoRA branch's precision while scoring: ``float32`` (default) is what PEFT and
    the reference compute on a bf16 model, so both searches see the same losses;
    ``model`` runs it in the model's dtype (a little faster, rounds differently).
    ``layout`` feeds each candidate's shots ``padded`` (as the reference does),
    ``prefix`` (their common prompt prefix once; same hidden states) or ``auto``
    (the prefix when the shots share one; lorashelf.compose.layout).
    """

    experts: tuple[str, ...] | None = None
    preselect: int | None = None
    preselect_by: str = "loss"
    bounds: tuple[float, float] = (-1.5, 1.5)
    l1: float = 0.05
    budget: int = 40
    seed: int = 0
    optimizer: str = "cma"
    popsize: int | None = None
    sigma0: float = 0.5
    lr: float = 0.05
    chunk: int = 16
    mix: str = "params"
    loss: str = "reference"
    eos: bool = True
    chat: bool = False
    max_length: int | None = None
    save_rank: int | None = None
    lora_dtype: str = "float32"
    layout: str = "auto"

    @property
    def torch_lora_dtype(self):
        """``lora_dtype`` as a torch dtype for the mixture layer (None: the model's)."""
        import torch

        return torch.float32 if self.lora_dtype == "float32" else None

    def __post_init__(self) -> None:
        lo, hi = self.bounds
        checks = [
            (lo < hi, f"bounds must be (low, high) with low < high, got {self.bounds}"),
            (lo <= 0 <= hi, f"bounds must contain 0 (the search starts there), got {self.bounds}"),
            (self.l1 >= 0, f"l1 must be >= 0, got {self.l1}"),
            (self.budget >= 1, f"budget must be >= 1 loss evaluation, got {self.budget}"),
            (
                self.popsize is None or self.popsize >= 1,
                f"popsize must be >= 1, not {self.popsize}",
            ),
            (self.sigma0 > 0, f"sigma0 must be > 0, got {self.sigma0}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.chunk >= 1, f"chunk must be >= 1 candidate per pass, got {self.chunk}"),
            (self.mix in MIXES, f"mix must be one of {', '.join(MIXES)}, not {self.mix!r}"),
            (self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}"),
            (self.preselect is None or self.preselect >= 1, "preselect must be >= 1 expert"),
            (self.max_length is None or self.max_length >= 2, "max_length must be >= 2"),
            (self.save_rank is None or self.save_rank >= 0, "save_rank must be >= 0"),
            (
                self.lora_dtype in LORA_DTYPES,
                f"lora_dtype must be one of {', '.join(LORA_DTYPES)}, not {self.lora_dtype!r}",
            ),
            (
                self.layout in LAYOUTS,
                f"layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}",
            ),
            (self.experts is None or len(self.experts) > 0, "experts is empty; pass None for all"),
        ]
        for ok, msg in checks:
            if not ok:
                raise LorashelfError(f"bad compose config: {msg}")
