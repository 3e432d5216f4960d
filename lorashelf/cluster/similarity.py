"""Cosine similarity of a library's experts, computed in blocks (MBC, arXiv 2405.11157).

The reference (microsoft/mttl) stacks every expert's flattened LoRA parameters into one
dense [n, D] array, runs a randomised truncated SVD and takes cosine similarities of the
reduced embeddings. For 1,000 SmolLM2 experts that array is ~1 GB, for larger bases far
more. Everything MBC needs is in the Gram matrix G = X X^T ([n, n]):

* without reduction, cos(i, j) = G_ij / sqrt(G_ii G_jj);
* truncated SVD X ~ U_d S_d V_d^T embeds expert i as row i of U_d S_d, and
  G = U S^2 U^T, so the embeddings are the top-d eigenvectors of G scaled by the square
  roots of their eigenvalues: the *exact* truncated SVD, without materialising X.

``center`` subtracts the library's mean vector first (H G H with H = I - 11^T/n, also
exact from G). Experts of one library share their LoRA A initialisation, and after a
short training run that common A0 dominates every vector, so raw cosines sit close to
1 for all pairs; centring removes the shared part and compares what each task changed.

G is accumulated block by block: a block of rows stays in memory while later blocks
stream past it; blocks are visited in a snake order so the last block read becomes
the next resident one. Peak memory is two blocks plus G.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lorashelf.cluster.embed import FactorLoader, Layout, layout_of, layout_size, load_vectors
from lorashelf.errors import LorashelfError


@dataclass(frozen=True)
class SimilarityConfig:
    """How expert parameters are compared (defaults follow the reference's MBC run)."""

    sparsity: float = 0.5  # zero this fraction of smallest-magnitude entries per expert
    svd_dim: int | None = 64  # truncated-SVD dimension; None = compare full vectors
    block_size: int | None = None  # experts per block; None = from block_mb
    block_mb: int = 512  # memory for the two resident blocks when block_size is None
    center: bool = False  # subtract the mean expert vector before comparing

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise LorashelfError(
                f"sparsity {self.sparsity} is outside [0, 1); pass e.g. --sparsity 0.5 "
                "(zero the smaller half of each expert's entries) or 0 to keep all"
            )
        if self.svd_dim is not None and self.svd_dim < 1:
            raise LorashelfError(f"svd_dim {self.svd_dim} must be >= 1 (or 0/None for no SVD)")
        if self.block_size is not None and self.block_size < 1:
            raise LorashelfError(f"block_size {self.block_size} must be >= 1")


@dataclass
class Similarity:
    """The [n, n] cosine-similarity matrix of ``names`` (float64, CPU) and its provenance."""

    names: list[str]
    matrix: torch.Tensor
    dim: int  # length of each flattened parameter vector
    svd_dim: int | None  # effective SVD dimension (None when not reduced)
    svd_energy: float | None  # fraction of sum(S^2) the kept components hold


def _block_rows(n: int, dim: int, cfg: SimilarityConfig) -> int:
    if cfg.block_size is not None:
        return cfg.block_size
    return max(1, int(cfg.block_mb * 2**20 // (2 * 4 * dim)))


def gram_matrix(
    names: Sequence[str],
    load: FactorLoader,
    cfg: SimilarityConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, Layout]:
    """G = X X^T (float64, CPU) of the flattened, sparsified experts, streamed in blocks.

    Products run on ``device`` in float32; each [b, b] tile is summed into G in float64.
    """
    names = list(names)
    n = len(names)
    first = load(names[0])
    layout = layout_of(first)
    if not layout:
        raise LorashelfError(f"expert {names[0]!r} has no LoRA modules; nothing to compare")
    b = _block_rows(n, layout_size(layout), cfg)
    starts = list(range(0, n, b))
    nb = len(starts)
    sizes = [min(b, n - s) for s in starts]
    reads = sizes[0] + sum(sum(sizes[i + 1 :]) for i in range(nb))
    bar = tqdm(total=reads, desc="similarity", unit="expert", disable=not progress, leave=False)

    def block(i: int) -> torch.Tensor:
        rows = names[starts[i] : starts[i] + b]
        x = load_vectors(rows, load, layout, names[0], sparsity=cfg.sparsity, device=device)
        bar.update(len(rows))
        return x

    gram = torch.zeros(n, n, dtype=torch.float64)
    held = block(0)
    for i in range(nb):
        si = slice(starts[i], starts[i] + held.shape[0])
        gram[si, si] = (held @ held.T).double().cpu()
        nxt = held
        # Snake order: stream j = nb-1 .. i+1, so block i+1 is the last one read and
        # becomes the resident block of the next round without a second read.
        for j in range(nb - 1, i, -1):
            xj = block(j)
            sj = slice(starts[j], starts[j] + xj.shape[0])
            tile = (held @ xj.T).double().cpu()
            gram[si, sj] = tile
            gram[sj, si] = tile.T
            nxt = xj
        held = nxt
    bar.close()
    return gram, layout


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarities from inner products; zero vectors get similarity 0."""
    norms = gram.diagonal().clamp_min(0).sqrt().clamp_min(1e-300)
    return (gram / norms[:, None] / norms[None, :]).clamp(-1.0, 1.0)


def svd_embeddings(gram: torch.Tensor, dim: int) -> tuple[torch.Tensor, float]:
    """Rows of U_d S_d of X's truncated SVD, from G = X X^T; and their share of sum(S^2).

    Signs of singular vectors are arbitrary; cosine similarities do not depend on them.
    """
    evals, evecs = torch.linalg.eigh(gram)
    evals = evals.clamp_min(0)
    top = torch.argsort(evals, descending=True)[:dim]
    emb = evecs[:, top] * evals[top].sqrt()[None, :]
    total = float(evals.sum())
    energy = float(evals[top].sum()) / total if total > 0 else 1.0
    return emb, energy


def center_gram(gram: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the vectors minus their mean: H G H, H = I - 11^T / n."""
    row = gram.mean(dim=1, keepdim=True)
    return gram - row - row.T + gram.mean()


def similarity_from_gram(
    gram: torch.Tensor, svd_dim: int | None, center: bool = False
) -> tuple[torch.Tensor, int | None, float | None]:
    """Cosine-similarity matrix of the (optionally centred, SVD-reduced) vectors of ``gram``."""
    if center:
        gram = center_gram(gram)
    if svd_dim is None or svd_dim >= gram.shape[0]:
        return cosine_from_gram(gram), None, None
    emb, energy = svd_embeddings(gram, svd_dim)
    return cosine_from_gram(emb @ emb.T), svd_dim, energy


def parameter_similarity(
    names: Sequence[str],
    load: FactorLoader,
    cfg: SimilarityConfig = SimilarityConfig(),
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Similarity:
    """MBC's similarity matrix of the experts ``names`` read through ``load``."""
    if len(names) < 1:
        raise LorashelfError("no experts to compare; add experts to the library first")
    gram, layout = gram_matrix(names, load, cfg, device=device, progress=progress)
    zero = [names[i] for i in range(len(names)) if gram[i, i] <= 0]
    if zero:
        raise LorashelfError(
            f"expert {zero[0]!r} has all-zero LoRA parameters, so its direction is undefined; "
            "remove it from the library or retrain it"
        )
    if cfg.center and len(names) < 3:
        raise LorashelfError(
            f"centring needs at least 3 experts (got {len(names)}): with 2 the centred "
            "vectors are opposite by construction; drop --center"
        )
    matrix, svd_dim, energy = similarity_from_gram(gram, cfg.svd_dim, cfg.center)
    return Similarity(list(names), matrix, layout_size(layout), svd_dim, energy)


def dense_similarity(
    vectors: torch.Tensor, svd_dim: int | None = None, center: bool = False
) -> torch.Tensor:
    """Reference computation on a dense [n, D] array: full SVD, then cosine (for checks)."""
    x = vectors.double()
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    if svd_dim is not None and svd_dim < x.shape[0]:
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        x = u[:, :svd_dim] * s[:svd_dim]
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return x @ x.T


def block_loads(n: int, block_size: int) -> int:
    """How many block reads :func:`gram_matrix` makes for ``n`` experts (for planning)."""
    nb = math.ceil(n / block_size)
    return nb * (nb + 1) // 2 - (nb - 1)
