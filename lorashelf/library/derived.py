"""Derived files beside a library (Arrow prototypes, PHATGOOSE gates): checksummed like weights.

Methods cache tensors they derive from experts under ``LIBRARY/derived/`` and
``LIBRARY/cache/`` as safetensors files. Each records, in its header, ``tensors_sha256``:
a sha256 over every tensor's name and float32 bytes. A flipped byte, a truncated file
or a cache filled with NaN then reads as damaged instead of routing every token the
same way, so ``Library.verify`` reports it (kind ``derived``), the method that owns it
recomputes it on use, and ``Library.rebuild_index`` (``library verify --repair``)
deletes it. Only safetensors and numpy are needed, so ``library verify`` stays light.
A file shared by many experts (``cache/arrow_prototypes.safetensors``) gets a JSON
sidecar, ``<file>.json``, naming which expert each tensor group belongs to, so
``library ls`` lists what each expert has without reading tensors
(:mod:`lorashelf.library.artefacts`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorashelf.library.expert import Problem

DERIVED_DIRS = ("derived", "cache")
CHECKSUM_KEY = "tensors_sha256"
CONTENTS_FORMAT = "lorashelf-derived-contents/1"


def tensors_sha256(arrays: Mapping[str, Any]) -> str:
    """sha256 over ``name, float32 bytes`` of every tensor (torch or numpy), in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        data = a.detach().cpu().float().contiguous().numpy() if hasattr(a, "detach") else a
        h.update(name.encode() + b"\0" + data.astype("<f4").tobytes())
    return h.hexdigest()


def save_derived(
    path: Path,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str],
    *,
    kind: str | None = None,
    experts: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to ``path`` with ``metadata`` plus their ``tensors_sha256``,
    through a temporary file, fsync and rename (a crash leaves the old file or none).

    A file shared by experts passes its ``kind`` (``"arrow"``) and ``experts``: the
    expert name of each tensor group (the part of a tensor's name before its first
    ``/``: the adapter's sha256, ``~variant`` appended for derived experts). They go
    into the sidecar ``<path>.json`` (:func:`write_contents`); groups not named keep the
    name an earlier sidecar gave them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {**metadata, CHECKSUM_KEY: tensors_sha256(tensors)}
    if kind is not None:
        header["kind"] = kind

    def write(tmp: str) -> None:
        from safetensors.torch import save_file

        save_file(dict(tensors), tmp, metadata=header)

    _atomic_write(path, write)
    if kind is not None:
        write_contents(path, kind, tensors, experts or {}, header[CHECKSUM_KEY])


def _atomic_write(path: Path, write: Any) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def contents_path(path: Path) -> Path:
    """The JSON sidecar of the shared derived file ``path``."""
    return path.with_name(path.name + ".json")


def tensor_group(name: str) -> str:
    """The group (one expert's share) a tensor of a shared file belongs to."""
    return name.split("/", 1)[0] if "/" in name else ""


def write_contents(
    path: Path, kind: str, tensors: Mapping[str, Any], experts: Mapping[str, str], sha: str
) -> None:
    """The sidecar of ``path``: its kind, the file's size and mtime (a sidecar that does
    not match them is not trusted), and each group's expert and byte count."""
    import contextlib
    import json

    previous = read_contents(path, check=False) or {}
    sizes: dict[str, int] = {}
    for name, t in tensors.items():
        n = t.numel() * t.element_size() if hasattr(t, "numel") else t.nbytes
        sizes[tensor_group(name)] = sizes.get(tensor_group(name), 0) + int(n)
    old = previous.get("groups", {})
    groups = {
        g: {"expert": experts.get(g) or (old.get(g) or {}).get("expert"), "bytes": n}
        for g, n in sorted(sizes.items())
    }
    st = path.stat()
    doc = {"format": CONTENTS_FORMAT, "kind": kind, "file_bytes": st.st_size,
           "file_mtime_ns": st.st_mtime_ns, CHECKSUM_KEY: sha, "groups": groups}  # fmt: skip
    data = json.dumps(doc, indent=1).encode()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    try:
        _atomic_write(contents_path(path), write)
    except OSError:  # the tensors are written; listing falls back to their header
        with contextlib.suppress(OSError):
            contents_path(path).unlink(missing_ok=True)


def read_contents(path: Path, check: bool = True) -> dict[str, Any] | None:
    """The sidecar of ``path`` if it exists and (``check``) still describes the file."""
    import json

    try:
        doc = json.loads(contents_path(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != CONTENTS_FORMAT:
        return None
    if check and (doc.get("file_bytes"), doc.get("file_mtime_ns")) != (st.st_size, st.st_mtime_ns):
        return None
    return doc


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
        contents_path(path).unlink(missing_ok=True)
    return gone
