"""Core Space merging (Panariello et al., "Accurate and Efficient Low-Rank Model Merging
in Core Space", NeurIPS 2025, arXiv 2509.17786).

Experts' LoRA factors live in unrelated coordinates, so entry-wise merges (TIES, DARE)
of A and B compare numbers that mean different things, and the same merges on dense
deltas cost d_out x d_in per expert. Core Space aligns the experts in one basis per
module, built from the stacked factors only: ``U_B`` [d_out, k], the left singular
vectors of ``[s_1 B_1, ..., s_E B_E]``, and ``V_A`` [d_in, k'], the right singular
vectors of ``[A_1; ...; A_E]`` (k, k' <= R = sum of ranks; ranks may differ). Each
expert becomes a small core ``M_i = (U_B^T s_i B_i)(A_i V_A)`` [k, k'], the cores are
merged (TIES or task arithmetic, ``core_merge``), and the result is projected back as
the LoRA ``B = U_B``, ``A = M V_A^T`` (rank k). The projection is lossless: every
``s_i B_i A_i`` equals ``U_B M_i V_A^T`` exactly, because its columns lie in the span
of ``U_B`` and its rows in the span of ``V_A``; so task arithmetic in core space *is*
task arithmetic. The bases come from a QR of each stack and an SVD of its small R
factor (``M = Q R``, ``R = U S V^T`` give ``M = (Q U) S V^T``): d x R^2 work, no dense
delta ever formed. TIES in core space follows the authors' code: the cores of all
modules form each expert's task vector, trimmed globally (``scope="global"``); its
result does not depend on the sign conventions of the SVD (TIES commutes with flipping
a coordinate's sign in every expert at once).
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

CORE_MERGES = ("ties", "task-arithmetic")


@dataclass(frozen=True)
class CoreSpaceConfig:
    core_merge: str = "ties"  # the merge run on the cores: "ties" or "task-arithmetic"
    density: float = 0.2  # ties: fraction of each expert's core entries kept
    lam: float = 1.0  # scale of the merged update (TIES's lambda, task arithmetic's)
    scope: str = "global"  # ties: trim all modules' cores together, or per "module"

    def __post_init__(self) -> None:
        if self.core_merge not in CORE_MERGES:
            raise LorashelfError(
                f"core-space core_merge must be one of {', '.join(CORE_MERGES)}, "
                f"got {self.core_merge!r}"
            )
        TiesConfig(density=self.density, lam=self.lam, scope=self.scope)  # same checks


def left_basis(M: Tensor) -> Tensor:
    """The left singular vectors of ``M`` [d, R] (those of all its min(d, R) singular
    values, largest first), via QR and the SVD of the small R factor."""
    Q, R = torch.linalg.qr(M)
    U, _, _ = torch.linalg.svd(R)
    return Q @ U


@dataclass(frozen=True)
class CoreBasis:
    """One module's reference bases: ``U_B`` [d_out, k] and ``V_A`` [d_in, k']."""

    U: Tensor
    V: Tensor

    def core(self, f: LoraFactors) -> Tensor:
        """``U^T (s B A) V`` [k, k'] from the factors (d x k x r work)."""
        B = f.B.to(self.U) * float(f.scale)
        return (self.U.T @ B) @ (f.A.to(self.V) @ self.V)


def core_basis(fs: Sequence[LoraFactors], device: torch.device) -> CoreBasis:
    A = torch.cat([f.A.to(device=device, dtype=torch.float32) for f in fs])
    B = torch.cat([f.B.to(device=device, dtype=torch.float32) * float(f.scale) for f in fs], 1)
    return CoreBasis(U=left_basis(B), V=left_basis(A.T))


def core_space(
    experts: Sequence[Expert], config: CoreSpaceConfig, progress: bool = False
) -> Merged:
    """Core Space: TIES or task arithmetic on small cores in a shared SVD basis; low-rank"""
    names = check_experts(experts)
    device = device_of(experts, names)
    bases, cores = {}, [{} for _ in experts]
    for name in tqdm(names, desc="core-space: bases", disable=not progress):
        fs = [ex[name] for ex in experts]
        bases[name] = basis = core_basis(fs, device)
        for e, f in enumerate(fs):
            M = basis.core(f)
            cores[e][name] = LoraFactors(A=M, B=torch.eye(M.shape[0], device=device), scale=1.0)
    if config.core_merge == "ties":
        cfg = TiesConfig(density=config.density, lam=config.lam, scope=config.scope)
        merged_cores = ties(cores, cfg, progress=progress)
        core_of = merged_cores.delta
    else:

        def core_of(name: str) -> Tensor:
            return config.lam * torch.stack([c[name].A for c in cores]).sum(0)

    out = {}
    for name in names:
        basis, M = bases[name], core_of(name)
        out[name] = LoraFactors(A=M @ basis.V.T, B=basis.U, scale=1.0)
    return Merged("core-space", config, len(experts), out)


CORE_SPACE = MergeMethod("core-space", CoreSpaceConfig, core_space)
