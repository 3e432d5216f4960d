"""KnOTS merging (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025,
arXiv 2410.19735).

Per module, the experts' updates are placed side by side, ``[dW_1 | ... | dW_T]``
[d_out, T d_in] with ``dW_t = s_t B_t A_t``, and one SVD ``U S [V_1^T ... V_T^T]`` puts
them in a shared basis: every expert keeps ``U S`` and differs only in its block
``V_t^T`` [k, d_in]. The blocks are merged (TIES or task arithmetic, ``merge_on``) and the
update rebuilt as ``U S V_merged^T``: a LoRA of rank k <= sum of the ranks (mixed ranks
are fine). The SVD comes from the stacked factors, no dense delta formed:
``[dW_1 | ... | dW_T] = Bs · blockdiag(A_1, ..., A_T)`` with ``Bs = [s_1 B_1, ..., s_T B_T]``;
thin QRs ``Bs = Qb Rb`` and ``A_t^T = Q_t R_t`` leave the small core
``C = Rb blockdiag(R_t^T)`` [R, R], whose SVD ``C = Uc S Vc^T`` gives ``U = Qb Uc`` and
``V_t^T = Vc^T[:, block t] Q_t^T``. Task arithmetic on the blocks is the plain sum of the
updates (``U S sum_t V_t^T = sum_t dW_t``). TIES on the blocks trims each expert's
``V_t`` entries (all modules together for ``scope="global"``, as Core Space does; per
``"module"`` otherwise), elects signs and takes the disjoint mean; flipping a singular
pair's sign flips that row in every block at once, which TIES commutes with, so the
result does not depend on the SVD's sign conventions. KnOTS differs from Core Space
(lorashelf.merge.core_space) in what it aligns: one basis for the outputs, shared with
its singular values, and full-width ``V_t`` blocks merged on the input side.
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
from lorashelf.merge.ties import TiesConfig, ties

BLOCK_MERGES = ("ties", "task-arithmetic")


@dataclass(frozen=True)
class KnotsConfig:
    merge_on: str = "ties"  # how the V_t blocks are merged: "ties" or "task-arithmetic"
    density: float = 0.2  # ties: fraction of each expert's V entries kept
    lam: float = 1.0  # scale of the merged update
    scope: str = "global"  # ties: trim all modules' blocks together, or per "module"

    def __post_init__(self) -> None:
        if self.merge_on not in BLOCK_MERGES:
            raise LorashelfError(
                f"knots merge_on must be one of {', '.join(BLOCK_MERGES)}, got {self.merge_on!r}"
            )
        TiesConfig(density=self.density, lam=self.lam, scope=self.scope)  # same checks


@dataclass(frozen=True)
class Aligned:
    """One module in the shared basis: ``US`` [d_out, k] and each expert's ``V_t^T``."""

    US: Tensor
    blocks: list[Tensor]  # [k, d_in] each


def align(fs: Sequence[LoraFactors], device: torch.device) -> Aligned:
    """The SVD of ``[dW_1 | ... | dW_T]`` from the factors (module docstring)."""
    dt = torch.float64 if any(f.A.dtype == torch.float64 for f in fs) else torch.float32
    Bs = torch.cat([f.B.to(device, dt) * float(f.scale) for f in fs], 1)
    Qb, Rb = torch.linalg.qr(Bs)  # [d_out, m], [m, R]
    qr = [torch.linalg.qr(f.A.to(device, dt).T) for f in fs]  # A_t^T = Q_t R_t
    C = Rb @ torch.block_diag(*[R.T for _, R in qr])  # [m, sum m_t]
    Uc, S, Vch = torch.linalg.svd(C, full_matrices=False)
    blocks, at = [], 0
    for Q, _ in qr:
        width = Q.shape[1]
        blocks.append(Vch[:, at : at + width] @ Q.T)
        at += width
    return Aligned(US=(Qb @ Uc) * S, blocks=blocks)


def knots(experts: Sequence[Expert], config: KnotsConfig, progress: bool = False) -> Merged:
    """KnOTS: TIES or task arithmetic on per-expert V blocks of one joint SVD; low-rank"""
    names = check_experts(experts)
    device = device_of(experts, names)
    aligned: dict[str, Aligned] = {}
    per_expert: list[dict[str, LoraFactors]] = [{} for _ in experts]
    for name in tqdm(names, desc="knots: SVD", disable=not progress):
        aligned[name] = a = align([ex[name] for ex in experts], device)
        eye = torch.eye(a.US.shape[1], device=device, dtype=a.US.dtype)
        for e, block in enumerate(a.blocks):
            per_expert[e][name] = LoraFactors(A=block, B=eye, scale=1.0)
    if config.merge_on == "ties":
        cfg = TiesConfig(density=config.density, lam=config.lam, scope=config.scope)
        block_of = ties(per_expert, cfg, progress=progress).delta
    else:

        def block_of(name: str) -> Tensor:
            return config.lam * torch.stack(aligned[name].blocks).sum(0)

    out = {
        n: LoraFactors(A=block_of(n).to(aligned[n].US), B=aligned[n].US, scale=1.0) for n in names
    }
    return Merged("knots", config, len(experts), out)


KNOTS = MergeMethod("knots", KnotsConfig, knots)
