"""Which derived artefacts each expert has (``library ls`` / ``library show``), read cheaply.

Methods keep tensors they derive from experts beside the library
(:mod:`lorashelf.library.derived`): one file per expert in a directory named after the
kind (``derived/phatgoose/<adapter sha256>.safetensors``: PHATGOOSE gates), or one file
shared by all experts (``cache/arrow_prototypes.safetensors``,
``cache/retrieval_embeddings.safetensors``) whose tensor names start with the adapter's
sha256 (plus ``~gks-...`` for experts with the GenKnowSub general-knowledge mean
subtracted). An artefact is ``ok`` while its sha256 is the expert's current adapter's,
``stale`` when it was made for an earlier adapter of that name (the method recomputes
it on use). Listing reads no tensors and imports no torch: per-expert files are known
by their names (only an orphan's header is read, to find whose it was), shared files
by their JSON sidecar, or by their safetensors header when the sidecar is missing or
out of date. Whether a file's tensors are intact is ``library verify``'s job.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorashelf.library.derived import DERIVED_DIRS, read_contents, tensor_group

_HEADER_MAX = 100 * 2**20  # a safetensors header larger than this is not read


@dataclass(frozen=True)
class Artefact:
    """One derived artefact of one expert; ``file`` is relative to the library root."""

    kind: str  # "arrow", "retrieval", "phatgoose", ...
    file: str
    bytes: int
    status: str  # "ok" or "stale"
    adapter_sha256: str
    variant: str = ""  # e.g. "gks-1f3a...": derived from the expert minus the GKS mean

    @property
    def label(self) -> str:
        """``arrow``, or ``arrow+gks`` for a variant."""
        return self.kind + (f"+{self.variant.split('-')[0]}" if self.variant else "")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "label": self.label, "variant": self.variant,
                "file": self.file, "bytes": self.bytes, "status": self.status,
                "adapter_sha256": self.adapter_sha256}  # fmt: skip


def expert_artefacts(root: Path, checksums: Mapping[str, str]) -> dict[str, list[Artefact]]:
    """``{expert name: its artefacts}`` for the experts of ``checksums`` (name -> the
    sha256 of its adapter_model.safetensors); experts with none are left out."""
    by_sha = {sha: name for name, sha in checksums.items() if sha}
    out: dict[str, list[Artefact]] = {}
    for name, artefact in _scan(root, checksums, by_sha):
        out.setdefault(name, []).append(artefact)
    for arts in out.values():
        arts.sort(key=lambda a: (a.label, a.status != "ok", a.file))
    return out


def summary(artefacts: list[Artefact]) -> dict[str, str]:
    """``{label: "ok" | "stale"}``: ok when any artefact of that label is current."""
    out: dict[str, str] = {}
    for a in artefacts:
        out[a.label] = "ok" if "ok" in (a.status, out.get(a.label)) else a.status
    return out


def _scan(
    root: Path, checksums: Mapping[str, str], by_sha: Mapping[str, str]
) -> Iterator[tuple[str, Artefact]]:
    for top in DERIVED_DIRS:
        try:
            entries = sorted(os.scandir(root / top), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_dir():
                yield from _per_expert(root, path, checksums, by_sha)
            elif entry.name.endswith(".safetensors"):
                yield from _shared(root, path, checksums, by_sha)


def _owner(
    sha: str, recorded: str | None, checksums: Mapping[str, str], by_sha: Mapping[str, str]
) -> tuple[str, str] | None:
    """(expert, status) of an artefact made for adapter ``sha`` (recorded as made for
    expert ``recorded``), or None when no expert of the library is its owner."""
    if sha in by_sha:
        return by_sha[sha], "ok"
    if recorded in checksums:
        return recorded, "stale"
    return None


def _per_expert(
    root: Path, directory: Path, checksums: Mapping[str, str], by_sha: Mapping[str, str]
) -> Iterator[tuple[str, Artefact]]:
    """Files ``<kind dir>/<adapter sha256>.safetensors``, one per expert."""
    with os.scandir(directory) as it:
        files = sorted(
            (e for e in it if e.is_file() and e.name.endswith(".safetensors")),
            key=lambda e: e.name,
        )
    for entry in files:
        sha = entry.name.removesuffix(".safetensors")
        recorded = None
        if sha not in by_sha:  # an orphan: its header says whose it was
            meta = (_header(Path(entry.path)) or {}).get("__metadata__") or {}
            recorded = _decode(meta.get("expert"))
        owner = _owner(sha, recorded, checksums, by_sha)
        if owner is not None:
            rel = str(Path(entry.path).relative_to(root))
            yield owner[0], Artefact(directory.name, rel, entry.stat().st_size, owner[1], sha)


def _shared(
    root: Path, path: Path, checksums: Mapping[str, str], by_sha: Mapping[str, str]
) -> Iterator[tuple[str, Artefact]]:
    """A file shared by experts: its groups from the sidecar, else from its header."""
    doc = read_contents(path)
    if doc is not None:
        kind, groups = doc["kind"], doc["groups"]
    else:
        header = _header(path)
        if header is None:
            return
        meta = header.pop("__metadata__", {}) or {}
        kind = meta.get("kind") or _kind_of_format(meta.get("format", path.stem))
        groups = {}
        for name, info in header.items():
            a, b = info["data_offsets"]
            g = groups.setdefault(tensor_group(name), {"expert": None, "bytes": 0})
            g["bytes"] += b - a
    rel = str(path.relative_to(root))
    for group, info in groups.items():
        sha, _, variant = group.partition("~")
        owner = _owner(sha, info.get("expert"), checksums, by_sha)
        if owner is not None:
            yield owner[0], Artefact(kind, rel, int(info["bytes"]), owner[1], sha, variant)


def _header(path: Path) -> dict[str, Any] | None:
    """A safetensors file's JSON header (tensor names, dtypes, offsets, metadata)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _HEADER_MAX:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    return header if isinstance(header, dict) else None


def _kind_of_format(fmt: str) -> str:
    """``lorashelf-arrow-prototypes/1`` -> ``arrow`` (files written before sidecars)."""
    return fmt.removeprefix("lorashelf-").split("/")[0].split("-")[0]


def _decode(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return decoded if isinstance(decoded, str) else None
