"""WUDI merging (Cheng et al. 2025, "Whoever Started the Interference Should End It:
Guiding Data-Free Model Merging via Task Vectors", ICML 2025, arXiv 2503.08099).

Data-free and per linear layer: the paper shows that a layer's task vectors roughly
span that layer's inputs, so the merged task vector ``tau_m`` should act like each
``tau_i`` on the rows of ``tau_i``. It minimises, module by module,

    L(tau_m) = sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2

with Adam from ``tau_m = sum_i tau_i``. Defaults follow the authors' code
(nathanielyvo/WUDI-Merging, also fusion_bench's ``wudi_merging``): Adam, lr 1e-5,
300 steps, no weight decay, and the optimised ``tau_m`` is the merged delta (no
rescaling coefficient). mttl's ``wudi_merge_after`` differs in two ways: it divides the
result by the number of experts, and it builds ``lora_a @ lora_b`` ([d_in, d_out],
mttl's layout), so its objective constrains ``tau^T`` (the outputs' side). (arXiv
2505.19892, which mttl's ``wudi_merge_2`` cites, is OptMerge, a later variant with
SVD-truncated task vectors and a mean initialisation; not this module.)

LoRA makes it cheap: with ``tau_i = s_i B_i A_i``, ``(tau_m - tau_i) tau_i^T =
s_i (tau_m A_i^T - tau_i A_i^T) B_i^T``, whose squared norm is
``s_i^2 tr(X_i (B_i^T B_i) X_i^T)`` with ``X_i = tau_m A_i^T - s_i B_i A_i A_i^T``
[d_out, r_i]. Stacking the A's, one step costs two d_out x d_in x (sum of ranks)
products instead of E products of d_out x d_in x d_out; the gradient is written out
(``2 X G A``), so no autograd graph is kept. ``tau_m`` itself is dense (Adam moves every
entry on its own), and so is the result. Computed in float32, or float64 when the
factors are float64 (the tests compare with a dense float64 reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lorashelf.errors import LorashelfError
from lorashelf.library.factors import LoraFactors
from lorashelf.merge.base import Expert, MergeMethod, check_experts, device_of
from lorashelf.merge.merged import Merged


@dataclass(frozen=True)
class WudiConfig:
    steps: int = 300  # Adam steps per module (the authors' iter_num)
    lr: float = 1e-5  # Adam learning rate (the authors' default)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise LorashelfError(f"wudi steps must be >= 0, got {self.steps}")
        if not self.lr > 0.0:
            raise LorashelfError(f"wudi lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class WudiProblem:
    """One module's objective in low-rank form: ``L = sum((X @ G) * X)`` with
    ``X = tau_m @ A.T - C``; ``A`` [R, d_in] stacks the experts' A's, ``C`` [d_out, R]
    stacks ``tau_i A_i^T`` and ``G`` [R, R] is block-diagonal with blocks
    ``s_i^2 B_i^T B_i / ||tau_i||_F^2`` (0 for an all-zero expert, which interferes
    with nothing)."""

    A: Tensor
    C: Tensor
    G: Tensor
    start: Tensor  # sum_i tau_i, where Adam starts

    def loss(self, tau: Tensor) -> Tensor:
        X = tau @ self.A.T - self.C
        return ((X @ self.G) * X).sum()

    def grad(self, tau: Tensor) -> Tensor:
        X = tau @ self.A.T - self.C
        return 2.0 * (X @ self.G) @ self.A


def problem(fs: Sequence[LoraFactors], device: torch.device) -> WudiProblem:
    """The objective of one module's experts (float64 if any factor is, else float32)."""
    wide = any(f.A.dtype == torch.float64 or f.B.dtype == torch.float64 for f in fs)
    dtype = torch.float64 if wide else torch.float32
    As, Cs, Gs, Bs = [], [], [], []
    for f in fs:
        A = f.A.to(device=device, dtype=dtype)
        B = f.B.to(device=device, dtype=dtype) * float(f.scale)
        gram_a, gram_b = A @ A.T, B.T @ B
        norm2 = (gram_a * gram_b).sum()  # ||B A||_F^2 = tr((A A^T)(B^T B))
        As.append(A)
        Bs.append(B)
        Cs.append(B @ gram_a)
        Gs.append(gram_b / norm2 if norm2 > 0 else torch.zeros_like(gram_b))
    A, B = torch.cat(As), torch.cat(Bs, 1)
    return WudiProblem(A=A, C=torch.cat(Cs, 1), G=torch.block_diag(*Gs), start=B @ A)


def optimise(prob: WudiProblem, config: WudiConfig) -> Tensor:
    """Adam on ``tau_m`` from the sum of the task vectors, ``config.steps`` steps."""
    param = torch.nn.Parameter(prob.start.clone())
    opt = torch.optim.Adam([param], lr=config.lr, weight_decay=0.0)
    for _ in range(config.steps):
        param.grad = prob.grad(param.detach())
        opt.step()
    return param.detach()


def wudi(experts: Sequence[Expert], config: WudiConfig, progress: bool = False) -> Merged:
    """WUDI: per module, Adam on the task vectors' interference; dense, data-free"""
    names = check_experts(experts)
    device = device_of(experts, names)
    out = {}
    with torch.inference_mode(False), torch.no_grad():
        for name in tqdm(names, desc="wudi", disable=not progress):
            prob = problem([ex[name] for ex in experts], device)
            out[name] = optimise(prob, config).float()
    return Merged("wudi", config, len(experts), out)


WUDI = MergeMethod("wudi", WudiConfig, wudi)
