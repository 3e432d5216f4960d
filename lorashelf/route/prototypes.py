"""Exact Arrow prototypes from LoRA factors, batched, with a per-expert disk cache.

Arrow (Ostapenko et al. 2024, arXiv 2405.11157, section 4) routes a token by its
alignment with each expert's prototype: the top right singular vector of the
expert's update ``delta W = B A`` at that module. PEFT approximates it with 15 steps
of power iteration on ``A^T B^T B A``; we compute it exactly without forming the
``d_out x d_in`` delta: with thin QRs ``B = Qb Rb`` and ``A^T = Qa Ra``,
``B A = Qb (Rb Ra^T) Qa^T``, so the SVD of the ``r x r`` core ``Rb Ra^T = U S V^T``
gives ``delta W``'s right singular vectors as ``Qa V``. Everything is batched over all
(expert, module) pairs of one shape. Prototypes depend only on an expert's factors,
so they are cached in a safetensors file keyed by the expert's checksum (the caller's
choice, e.g. the sha256 of adapter_model.safetensors): adding experts to a library
computes only theirs. The file's header carries a sha256 over its tensors
(:mod:`lorashelf.library.derived`): a cache that fails it, holds NaN, or is not a
prototype cache at all is ignored and rewritten from the factors (a read-only library
just recomputes), so a damaged cache can never route every token alike.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from lorashelf.errors import LorashelfError
from lorashelf.library.derived import file_problem, save_derived
from lorashelf.library.factors import LoraFactors
from lorashelf.lora.stack import Experts, check_experts

CACHE_FORMAT = "lorashelf-arrow-prototypes/1"
CACHE_FILE = "arrow_prototypes.safetensors"
CHUNK = 2048  # (expert, module) pairs per batched QR/SVD call
log = logging.getLogger("lorashelf.route")


def top_right_singular_vectors(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of each ``B[i] @ A[i]``: ``A [n, r, d_in]``, ``B [n, d_out, r]``.

    Returns ``[n, d_in]`` unit vectors in float32 (float64 inputs stay float64), each
    with its largest-magnitude entry positive so results are reproducible.
    """
    dt = torch.float64 if A.dtype == torch.float64 else torch.float32
    A, B = A.to(dt), B.to(dt)
    qa, ra = torch.linalg.qr(A.mT)  # A^T = Qa Ra: [n, d_in, r'], [n, r', r]
    rb = torch.linalg.qr(B, mode="r").R  # B = Qb Rb: [n, r'', r]
    core = rb @ ra.mT  # [n, r'', r']
    vh = torch.linalg.svd(core).Vh  # rows: right singular vectors of the core
    v = (qa @ vh[:, 0, :].unsqueeze(-1)).squeeze(-1)
    sign = torch.sign(v.gather(-1, v.abs().argmax(-1, keepdim=True)))
    return v * torch.where(sign == 0, 1.0, sign)


def _compute(
    jobs: Sequence[tuple[int, str, LoraFactors]], device: torch.device | str | None
) -> dict[tuple[int, str], torch.Tensor]:
    """Prototypes of (expert index, module, factors) jobs, batched by factor shapes."""
    groups: dict[tuple, list[tuple[int, str, LoraFactors]]] = {}
    for job in jobs:
        groups.setdefault((tuple(job[2].A.shape), tuple(job[2].B.shape)), []).append(job)
    out = {}
    for group in groups.values():
        for start in range(0, len(group), CHUNK):
            part = group[start : start + CHUNK]
            dev = device if device is not None else part[0][2].A.device
            A = torch.stack([f.A.to(dev, torch.float32) for _, _, f in part])
            B = torch.stack([f.B.to(dev, torch.float32) for _, _, f in part])
            protos = top_right_singular_vectors(A, B).cpu()
            out.update({(key, m): p for (key, m, _), p in zip(part, protos)})
    return out


def arrow_prototypes(
    experts: Experts,
    *,
    checksums: Sequence[str] | None = None,
    cache_path: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Arrow prototypes of every adapted module: ``{module path: [E_m, d_in] float32}``.

    Rows follow the experts' order, over the experts adapting that module (the
    order of :class:`~lorashelf.lora.stack.ExpertStack` members). With
    ``cache_path`` and ``checksums`` (one per expert), prototypes of experts already
    in the cache file are read from it and the new ones are computed and added; an
    expert whose checksum is empty is computed and not cached. Tensors are returned
    on the CPU.
    """
    names = check_experts(experts)
    if cache_path is not None and checksums is None:
        raise LorashelfError("a prototype cache needs one checksum per expert; pass checksums")
    if checksums is not None and len(checksums) != len(names):
        raise LorashelfError(f"got {len(checksums)} checksums for {len(names)} experts")
    sums = [c or None for c in checksums] if checksums is not None else [None] * len(names)
    cached = read_cache(cache_path, sums, experts) if cache_path is not None else {}
    todo = [
        (i, m, f)
        for i, (_, fs) in enumerate(experts)
        for m, f in fs.items()
        if (i, m) not in cached
    ]
    fresh = _compute(todo, device)
    storable = {(sums[i], m): p for (i, m), p in fresh.items() if sums[i]}
    if cache_path is not None and storable:
        owners = {sums[i]: experts[i][0] for i, _ in fresh if sums[i]}
        try:
            write_cache(cache_path, storable, owners)
        except OSError as e:  # a read-only library: the prototypes are just not kept
            log.info("not caching Arrow prototypes in %s (%s)", cache_path, e)
    protos = {**cached, **fresh}
    return {
        m: torch.stack([protos[(i, m)] for i, (_, fs) in enumerate(experts) if m in fs]).float()
        for m in sorted({m for _, fs in experts for m in fs})
    }


def read_cache(
    path: str | os.PathLike[str], checksums: Sequence[str | None], experts: Experts
) -> dict[tuple[int, str], torch.Tensor]:
    """``{(expert index, module): prototype}`` for the experts (with a checksum) whose
    every module is in the cache file."""
    path = Path(path)
    if not path.exists():
        return {}
    if (why := cache_problem(path)) is not None:
        log.warning("Arrow prototype cache %s is %s; recomputing it", path, why)
        return {}
    out = {}
    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
        for i, (key, (_, factors)) in enumerate(zip(checksums, experts)):
            if key and all(f"{key}/{m}" in stored for m in factors):
                out.update({(i, m): f.get_tensor(f"{key}/{m}") for m in factors})
    return out


def cache_problem(path: Path) -> str | None:
    """Why our cache file cannot be trusted (damaged, NaN), or None; a readable file of
    another format raises instead: it is not ours to replace."""
    try:
        with safe_open(str(path), framework="np") as f:
            fmt = (f.metadata() or {}).get("format")
    except Exception:  # unreadable: a damaged cache, handled below
        fmt = CACHE_FORMAT
    if fmt != CACHE_FORMAT:
        raise LorashelfError(
            f"{path} is not an Arrow prototype cache ({CACHE_FORMAT}); delete it to rebuild"
        )
    why = file_problem(path)
    return None if why is None else f"damaged ({why})"


def write_cache(
    path: str | os.PathLike[str],
    new: Mapping[tuple[str, str], torch.Tensor],
    owners: Mapping[str, str] | None = None,
) -> None:
    """Add prototypes to the cache file (rewritten through a temporary file + rename);
    ``owners`` names the expert of each checksum (for ``library ls``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    if path.exists() and cache_problem(path) is None:  # a damaged cache is replaced whole
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    fresh = {f"{key}/{m}": p.float().contiguous() for (key, m), p in new.items()}
    tensors.update({k: t for k, t in fresh.items() if bool(torch.isfinite(t).all())})
    meta = {"format": CACHE_FORMAT, "method": "exact: thin QR of A^T and B, SVD of r x r core"}
    save_derived(path, tensors, meta, kind="arrow", experts=owners or {})
