"""DARE merges (Yu et al. 2024, "Language Models are Super Mario", arXiv 2311.03099).

DARE ("drop and rescale") sets each entry of an expert's task vector to zero with
probability ``p = 1 - density`` and multiplies the kept entries by ``1 / density``, so
every entry keeps its expected value; the sparsified task vectors are then combined.
``dare-linear`` adds them, ``scale * sum_e DARE(delta_e)`` (DARE + task arithmetic, the
paper's main setting); ``dare-ties`` runs TIES's sign election and disjoint mean on them
instead of TIES's magnitude trim (:func:`lorashelf.merge.ties.elect_and_mean`), as
PEFT and mergekit do. The result is a dense delta per module.

Which entries? The paper drops entries of the delta parameters of a fine-tuned model;
for a LoRA expert that is its update ``scale * B @ A``, and that is what is dropped
here. PEFT offers two readings (``LoraModel.add_weighted_adapter``): ``dare_linear`` /
``dare_ties`` drop entries of the factors A and B separately (each weighted by
``sqrt(weight * scale)``) and multiply the merged factors, which drops no entry of any
delta and adds cross terms ``B_i A_j``; ``dare_linear_svd`` / ``dare_ties_svd`` drop
entries of each ``get_delta_weight()`` exactly as here, then truncate the merged delta
by SVD to ``svd_rank``. The ``_svd`` variants at full rank equal these merges when the
random masks agree (tests/merge/test_dare.py injects the same streams); PEFT elects a
sign of ``+`` where the summed values are exactly 0, this module elects none (such an
entry is 0), which only matters for values that cancel exactly.

Randomness: one CPU ``torch.Generator`` per (module, expert), seeded from the config's
``dare_seed``, the module path and the expert's index, draws that expert's mask row by row.
So the masks are the same on every run and device, whichever other modules are
merged, and however the deltas are streamed (a block of rows at a time, as in TIES;
no ``[E, N]`` array of the whole model is ever built).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lorashelf.errors import LorashelfError
from lorashelf.library.factors import LoraFactors
from lorashelf.merge.base import Expert, MergeMethod, check_experts, device_of
from lorashelf.merge.merged import Merged
from lorashelf.merge.ties import delta_blocks, elect_and_mean


def _check(method: str, density: float, seed: int) -> None:
    if not 0.0 < density <= 1.0:
        raise LorashelfError(
            f"{method} density (the fraction of entries kept) must be in (0, 1], got {density}"
        )
    if not 0 <= seed < 2**31:
        raise LorashelfError(f"{method} dare_seed must be in [0, 2**31), got {seed}")


@dataclass(frozen=True)
class DareLinearConfig:
    density: float = 0.5  # fraction of each delta's entries kept (1 - the drop rate p)
    scale: float = 1.0  # lambda: the weight of every rescaled task vector
    dare_seed: int = 0  # seeds the drop masks (not --seed: eval/fewshot's split seed)

    def __post_init__(self) -> None:
        _check("dare-linear", self.density, self.dare_seed)


@dataclass(frozen=True)
class DareTiesConfig:
    density: float = 0.5  # fraction of each delta's entries kept (1 - the drop rate p)
    lam: float = 1.0  # scale of the merged task vector
    dare_seed: int = 0  # seeds the drop masks (not --seed: eval/fewshot's split seed)

    def __post_init__(self) -> None:
        _check("dare-ties", self.density, self.dare_seed)


def mask_seed(seed: int, module: str, expert: int) -> int:
    """The seed of one expert's drop mask at one module: stable across runs and hosts.

    32 bits, as the CPU generator (mt19937) uses no more of its seed.
    """
    return zlib.crc32(f"{seed}:{module}#{expert}".encode())


def dropped_blocks(
    name: str, fs: Sequence[LoraFactors], density: float, seed: int, device: torch.device
) -> Iterator[Tensor]:
    """One module's stacked task vectors ``[E, n]`` after DARE, a block of rows at a time."""
    gens = [torch.Generator().manual_seed(mask_seed(seed, name, e)) for e in range(len(fs))]
    for block in delta_blocks(fs, device):
        keep = torch.full((block.shape[1],), density)
        masks = torch.stack([torch.bernoulli(keep, generator=g) for g in gens])
        yield block * masks.to(block.device) / density


def _merge(experts, config, progress, method, combine_block) -> Merged:
    names = check_experts(experts)
    device = device_of(experts, names)
    out = {}
    for name in tqdm(names, desc=method, disable=not progress):
        fs = [ex[name] for ex in experts]
        d_out, d_in = fs[0].B.shape[0], fs[0].A.shape[1]
        blocks = dropped_blocks(name, fs, config.density, config.dare_seed, device)
        out[name] = torch.cat([combine_block(b) for b in blocks]).view(d_out, d_in)
    return Merged(method, config, len(experts), out)


def dare_linear(
    experts: Sequence[Expert], config: DareLinearConfig, progress: bool = False
) -> Merged:
    """DARE: drop entries of each delta at random, rescale, sum (x scale); dense"""
    return _merge(experts, config, progress, "dare-linear", lambda b: config.scale * b.sum(0))


def dare_ties(experts: Sequence[Expert], config: DareTiesConfig, progress: bool = False) -> Merged:
    """DARE, then TIES's sign election and disjoint mean (x lam); dense"""
    return _merge(experts, config, progress, "dare-ties", lambda b: elect_and_mean(b, config.lam))


DARE_LINEAR = MergeMethod("dare-linear", DareLinearConfig, dare_linear)


DARE_TIES = MergeMethod("dare-ties", DareTiesConfig, dare_ties)
