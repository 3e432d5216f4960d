"""TIES-merging of LoRA experts (Yadav et al. 2023, arXiv 2306.01708).

Each expert's task vector is trimmed to its top-``density`` fraction by magnitude, a sign
is elected per entry from the summed trimmed values (the "mass" rule), and each entry is
the mean over the experts whose trimmed value agrees with that sign (disjoint mean),
times ``lam``. ``scope="global"`` trims each task vector as a whole, across all modules,
as the paper does; ``scope="module"`` trims every module on its own (mergekit, PEFT).

Which vector? ``space="delta"`` (default) runs TIES on the dense per-module deltas
scale * B @ A; ``space="params"`` runs it on the flattened LoRA A and B and returns a
rank-r LoRA. The TIES baseline of Ostapenko et al. 2024 is the params one, as far as its
code (mttl ``TiesMerge``: global per-expert top-k of the flattened LoRA weights, mass
sign, disjoint mean, no lambda) shows; ``TiesConfig(space="params")`` reproduces it.
We default to deltas because TIES compares entries across experts, which assumes they
share coordinates: weight-matrix entries do, LoRA factors do not (B A = (B M)(M^-1 A)
for any invertible M, and experts start from different random A), and averaging A and
B separately adds cross terms B_i A_j that no expert learnt.

Memory stays bounded: deltas are built a block of rows of one module at a time, and the
global threshold is found exactly in two streaming passes (histogram of float bit
patterns, then the values in the threshold's bin).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lorashelf.errors import LorashelfError
from lorashelf.library.factors import LoraFactors
from lorashelf.merge.base import (
    Expert,
    MergeMethod,
    check_experts,
    device_of,
    require_same_rank,
    shared_scale,
    stacked,
)
from lorashelf.merge.merged import Merged

# Elements per streamed block of stacked deltas; bounds memory, never changes results.
BLOCK_ELEMS = 1 << 22
# The streaming k-th largest histograms |values| by their float32 bit patterns (ordered
# like the values when non-negative): a bin keeps the exponent and the top 31 - 15 - 8 = 8
# mantissa bits, so 65,536 bins per expert, each spanning a relative width of 1/256.
BIN_SHIFT = 15


@dataclass(frozen=True)
class TiesConfig:
    density: float = 0.2  # fraction of each task vector kept (the paper's k = 20%)
    lam: float = 1.0  # scale of the merged task vector
    space: str = "delta"  # "delta": dense B @ A per module; "params": LoRA A and B
    scope: str = "global"  # "global": trim whole task vectors; "module": per module

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise LorashelfError(f"ties density must be in (0, 1], got {self.density}")
        if self.space not in ("delta", "params"):
            raise LorashelfError(f"ties space must be 'delta' or 'params', got {self.space!r}")
        if self.scope not in ("global", "module"):
            raise LorashelfError(f"ties scope must be 'global' or 'module', got {self.scope!r}")


def _delta_blocks(fs: Sequence[LoraFactors], device: torch.device) -> Iterator[Tensor]:
    """Stacked task vectors ``[E, n]`` of one module's deltas, a block of rows at a time.

    Experts of lower rank are zero-padded to the highest rank (exact: the padding adds
    zero terms), so each block is one batched matmul.
    """
    r = max(int(f.A.shape[0]) for f in fs)
    d_out, d_in = fs[0].B.shape[0], fs[0].A.shape[1]
    A = torch.zeros(len(fs), r, d_in, device=device)
    B = torch.zeros(len(fs), d_out, r, device=device)
    for e, f in enumerate(fs):
        A[e, : f.A.shape[0]] = f.A
        B[e, :, : f.B.shape[1]] = f.B.to(device=device, dtype=torch.float32) * float(f.scale)
    step = max(1, BLOCK_ELEMS // (len(fs) * d_in))
    for i in range(0, d_out, step):
        yield torch.bmm(B[:, i : i + step], A).view(len(fs), -1)


def _param_blocks(fs: Sequence[LoraFactors], device: torch.device) -> Iterator[Tensor]:
    """Stacked ``[E, r*d_in + d_out*r]`` flattened (A, B) of one module."""
    A, B, _ = shared_scale(*stacked(fs, device))
    yield torch.cat([A.flatten(1), B.flatten(1)], 1)


def _bins(block: Tensor) -> Tensor:
    """Histogram bin of each |value|: the high bits of its float32 pattern, sign cleared."""
    bits = block.float().contiguous().view(torch.int32)
    return (bits & 0x7FFFFFFF) >> BIN_SHIFT


def kth_largest_abs(blocks: Callable[[], Iterable[Tensor]], k: int) -> Tensor:
    """Exact k-th largest |value| of each row of the concatenation of ``blocks()``.

    ``blocks`` is called twice (histogram, then the values in the k-th value's bin) and
    must yield the same ``[E, n_i]`` tensors each time; memory is one block, an
    ``[E, bins]`` histogram and one bin's values.
    """
    nbins = 1 << (31 - BIN_SHIFT)
    counts = None
    for b in blocks():
        offsets = torch.arange(b.shape[0], device=b.device, dtype=torch.int32)[:, None] * nbins
        c = torch.bincount((_bins(b) + offsets).flatten(), minlength=b.shape[0] * nbins)
        counts = c if counts is None else counts + c
    counts = counts.view(-1, nbins)
    at_or_above = counts.flip(1).cumsum(1).flip(1)  # values in bins >= b
    kbin = ((at_or_above >= k).sum(1) - 1).clamp_min(0)
    need = k - (at_or_above - counts).gather(1, kbin[:, None]).squeeze(1)
    rows, vals = [], []
    for b in blocks():
        hit = _bins(b) == kbin[:, None]
        rows.append(hit.nonzero()[:, 0])
        vals.append(b.abs()[hit])
    rows, vals = torch.cat(rows), torch.cat(vals)
    out = []
    for e in range(counts.shape[0]):
        v = vals[rows == e]
        out.append(v.topk(int(need[e].clamp(1, v.numel()))).values[-1])
    return torch.stack(out)


def ties_combine(block: Tensor, threshold: Tensor, lam: float) -> Tensor:
    """Trim ``[E, n]`` at per-expert ``threshold``, elect signs, disjoint mean, * lam."""
    kept = block * (block.abs() >= threshold[:, None])
    sign = kept.sum(0).sign()
    agree = kept * sign > 0  # non-zero and of the elected sign
    return lam * (kept * agree).sum(0) / agree.sum(0).clamp_min(1)


def _n_entries(f: LoraFactors, space: str) -> int:
    r, d_in, d_out = f.A.shape[0], f.A.shape[1], f.B.shape[0]
    return d_out * d_in if space == "delta" else r * (d_in + d_out)


def ties(experts: Sequence[Expert], config: TiesConfig, progress: bool = False) -> Merged:
    """TIES: trim to top-density, elect sign by mass, disjoint mean (dense or rank r)"""
    names = check_experts(experts)
    if config.space == "params":
        require_same_rank(experts, names, "ties with space='params'")
    device = device_of(experts, names)
    make = _delta_blocks if config.space == "delta" else _param_blocks

    def blocks_of(names_: Sequence[str]) -> Callable[[], Iterator[Tensor]]:
        """Re-iterable task-vector blocks; computed once when they fit one block."""
        size = len(experts) * sum(_n_entries(experts[0][n], config.space) for n in names_)
        bar = {"desc": "ties: global threshold", "leave": False}
        bar["disable"] = not progress or len(names_) == 1
        make_all = lambda: chain.from_iterable(  # noqa: E731
            make([ex[n] for ex in experts], device) for n in tqdm(names_, **bar)
        )
        if size > BLOCK_ELEMS:
            return make_all
        cached = list(make_all())
        return lambda: iter(cached)

    def k_of(n: int) -> int:
        return min(n, max(1, round(config.density * n)))

    threshold = None
    if config.scope == "global":
        n_all = sum(_n_entries(experts[0][n], config.space) for n in names)
        threshold = kth_largest_abs(blocks_of(names), k_of(n_all))
    out = {}
    for name in tqdm(names, desc="ties", disable=not progress):
        fs = [ex[name] for ex in experts]
        blocks = blocks_of([name])
        thr = threshold
        if thr is None:
            thr = kth_largest_abs(blocks, k_of(_n_entries(fs[0], config.space)))
        flat = torch.cat([ties_combine(b, thr, config.lam) for b in blocks()])
        out[name] = _assemble(flat, fs, config.space)
    return Merged("ties", config, len(experts), out)


def _assemble(flat: Tensor, fs: Sequence[LoraFactors], space: str) -> LoraFactors | Tensor:
    r, d_in, d_out = fs[0].A.shape[0], fs[0].A.shape[1], fs[0].B.shape[0]
    if space == "delta":
        return flat.view(d_out, d_in)
    scales = {float(f.scale) for f in fs}
    scale = scales.pop() if len(scales) == 1 else 1.0  # as shared_scale: folded into B
    return LoraFactors(
        A=flat[: r * d_in].view(r, d_in), B=flat[r * d_in :].view(d_out, r), scale=scale
    )


TIES = MergeMethod("ties", TiesConfig, ties)
