"""Derived files beside a library (Arrow prototypes, PHATGOOSE gates): checksummed like weights.

Methods cache tensors they derive from experts under ``LIBRARY/derived/`` and
``LIBRARY/cache/`` as safetensors files. Each records, in its header, ``tensors_sha256``:
a sha256 over every tensor's name and float32 bytes. A flipped byte, a truncated file
or a cache filled with NaN then reads as damaged instead of routing every token the
same way, so ``Library.verify`` reports it (kind ``derived``), the method that owns it
recomputes it on use, and ``Library.rebuild_index`` (``library verify --repair``)
deletes it. Only safetensors and numpy are needed, so ``library verify`` stays light.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorashelf.library.expert import Problem

DERIVED_DIRS = ("derived", "cache")
CHECKSUM_KEY = "tensors_sha256"


def tensors_sha256(arrays: Mapping[str, Any]) -> str:
    """sha256 over ``name, float32 bytes`` of every tensor (torch or numpy), in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        data = a.detach().cpu().float().contiguous().numpy() if hasattr(a, "detach") else a
        h.update(name.encode() + b"\0" + data.astype("<f4").tobytes())
    return h.hexdigest()


def save_derived(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` to ``path`` with ``metadata`` plus their ``tensors_sha256``,
    through a temporary file, fsync and rename (a crash leaves the old file or none)."""
    import os
    import tempfile

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    header = {**metadata, CHECKSUM_KEY: tensors_sha256(tensors)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=header)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_problem(path: Path) -> str | None:
    """Why the derived safetensors file ``path`` is unusable, or None if it is sound."""
    import numpy as np
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            header = dict(f.metadata() or {})
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        return f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    recorded = header.get(CHECKSUM_KEY)
    if recorded is None:
        return f"records no {CHECKSUM_KEY} (written by an older lorashelf)"
    if recorded != tensors_sha256(arrays):
        return "its tensors do not match their sha256"
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not bool(np.isfinite(a).all()):
            return f"{name} holds NaN or inf values"
    return None


def derived_files(root: Path) -> list[Path]:
    return sorted(p for d in DERIVED_DIRS for p in (root / d).rglob("*.safetensors") if p.is_file())


def find_problems(root: Path) -> list[Problem]:
    out = []
    for path in derived_files(root):
        why = file_problem(path)
        if why is not None:
            rel = path.relative_to(root)
            msg = f"{rel} is damaged: {why}; it is recomputed on use, --repair deletes it"
            out.append(Problem("derived", None, msg))
    return out


def remove_damaged(root: Path) -> list[Path]:
    """Delete damaged derived files (each method recomputes or retrains its own)."""
    gone = [p for p in derived_files(root) if file_problem(p) is not None]
    for path in gone:
        path.unlink(missing_ok=True)
    return gone
