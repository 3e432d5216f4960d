"""Where PHATGOOSE gates live: one safetensors file per expert, keyed by its adapter checksum.

PHATGOOSE (Muqeeth et al. 2024, arXiv 2402.05859, section 3) trains one gate vector
per adapted module after an expert is trained; the gates are derived from the expert
(and its data), so they sit beside the library rather than inside it:
``LIBRARY/derived/phatgoose/<sha256 of adapter_model.safetensors>.safetensors``. The
library's own files and checksums are untouched (``Library.verify`` stays clean), an
expert replaced under the same name gets no stale gates (its checksum changes), and
the Arrow prototype cache is keyed the same way. Each file holds ``{module path:
gate [d_in] float32}`` and, in its header, the JSON of the training config, the data
it saw, its losses and a sha256 over the tensors, checked on every load. Files are
written to a temporary name and renamed, so a crash leaves the old file or the new.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorashelf.errors import LorashelfError
from lorashelf.library.derived import save_derived, tensors_sha256

if TYPE_CHECKING:
    import torch

    from lorashelf.library import Expert, Library

GATES_FORMAT = "lorashelf-phatgoose-gates/1"
DERIVED_DIR = "derived"
KIND = "phatgoose"
ADAPTER_FILE = "adapter_model.safetensors"
GATES_FILE = "gates.safetensors"  # what a gate-training job writes in its own directory
_KEY = re.compile(r"[0-9A-Za-z_.-]+")
RAW_FIELDS = ("format", "adapter_sha256", "tensors_sha256")  # plain strings, not JSON


@dataclass(frozen=True)
class StoredGates:
    """Gates read back from disk, with the header fields decoded (config, data, stats)."""

    gates: dict[str, torch.Tensor]
    meta: dict[str, Any]


def gates_dir(library_root: str | os.PathLike[str]) -> Path:
    """A library's gate directory: ``LIBRARY/derived/phatgoose``."""
    return Path(library_root) / DERIVED_DIR / KIND


def gates_path(directory: str | os.PathLike[str], checksum: str) -> Path:
    if not checksum or not _KEY.fullmatch(checksum) or checksum.startswith("."):
        raise LorashelfError(f"bad gate key {checksum!r}: use the adapter's sha256 (hex)")
    return Path(directory) / f"{checksum}.safetensors"


def adapter_checksum(expert: Expert) -> str:
    """The sha256 of the expert's adapter weights, as its card records it."""
    checksum = expert.files.get(ADAPTER_FILE)
    if not checksum:
        raise LorashelfError(
            f"expert {expert.name!r} records no checksum for {ADAPTER_FILE}; verify the "
            "library (`lorashelf library verify`)"
        )
    return checksum


def save_gates(
    directory: str | os.PathLike[str],
    checksum: str,
    gates: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
) -> Path:
    """Write ``gates`` (``{module: [d_in]}``) and ``meta`` (JSON-ready) to the gate file."""

    path = gates_path(directory, checksum)
    if not gates:
        raise LorashelfError("no gates to save: the expert adapts no module")
    tensors = {m: g.detach().float().cpu().contiguous() for m, g in gates.items()}
    header = {k: json.dumps(v) for k, v in meta.items() if k not in RAW_FIELDS}
    header.update(format=GATES_FORMAT, adapter_sha256=checksum)
    save_derived(path, tensors, header)
    return path


def load_gates(
    directory: str | os.PathLike[str], checksum: str, *, expert: str = "expert"
) -> StoredGates:
    """The gates stored for adapter ``checksum``; a missing or corrupt file raises."""
    from safetensors import SafetensorError, safe_open

    path = gates_path(directory, checksum)
    if not path.is_file():
        raise missing_gates_error([expert], directory)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            gates = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(expert, path, f"the file is unreadable ({e})") from None
    if header.get("format") != GATES_FORMAT:
        raise _corrupt(expert, path, f"not a {GATES_FORMAT} file")
    if header.get("adapter_sha256") != checksum:
        raise _corrupt(expert, path, "they were trained for another adapter")
    if header.get("tensors_sha256") != tensors_sha256(gates):
        raise _corrupt(expert, path, "their tensors do not match their sha256")
    if not all(bool(g.isfinite().all()) for g in gates.values()):
        raise _corrupt(expert, path, "they hold NaN or inf values")
    meta = {k: v if k in RAW_FIELDS else _decode(v) for k, v in header.items()}
    return StoredGates(gates=gates, meta=meta)


def gate_status(directory: str | os.PathLike[str], checksum: str) -> str:
    """``"ok"``, ``"missing"`` or ``"corrupt: why"`` for the gates of adapter ``checksum``."""
    if not gates_path(directory, checksum).is_file():
        return "missing"
    try:
        load_gates(directory, checksum)
    except LorashelfError as e:
        return f"corrupt: {e}"
    return "ok"


@dataclass(frozen=True)
class GateShelf:
    """A gate directory seen as a library (a :class:`lorashelf.jobs.Shelf`) by expert name.

    ``names()`` lists the experts whose gates are stored and sound (none when
    ``overwrite``); ``add`` stores the ``GATES_FILE`` a job wrote in ``src`` with
    ``card`` as its header, so gate training resumes like expert training.
    """

    directory: Path
    checksums: Mapping[str, str]  # expert name -> its adapter's sha256
    overwrite: bool = False
    library: Library | None = None  # where jobs stage their work (see staging_dir)

    def names(self) -> list[str]:
        if self.overwrite:
            return []
        return [n for n, c in self.checksums.items() if gate_status(self.directory, c) == "ok"]

    def add(self, src: Path, *, name: str, card: Mapping[str, Any]) -> Path:
        from safetensors.torch import load_file

        return save_gates(self.directory, self.checksums[name], load_file(src / GATES_FILE), card)

    def staging_dir(self, prefix: str) -> AbstractContextManager[Path]:
        """The library's staging dir: a killed gate training leaves nothing behind."""
        if self.library is None:
            raise LorashelfError("a GateShelf needs its library to stage gate training in")
        return self.library.staging_dir(prefix)


def load_library_gates(library: Library, names: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """The gates of each named expert of ``library``; all missing ones are named at once."""
    directory = gates_dir(library.path)
    checksums = [adapter_checksum(library.get(n)) for n in names]
    return load_expert_gates(directory, names, checksums)


def load_expert_gates(
    directory: str | os.PathLike[str], names: Sequence[str], checksums: Sequence[str]
) -> list[dict[str, torch.Tensor]]:
    """Gates of each expert (by its checksum) from ``directory``, in order."""
    if len(names) != len(checksums):
        raise LorashelfError(f"got {len(checksums)} checksums for {len(names)} experts")
    missing = [n for n, c in zip(names, checksums) if not gates_path(directory, c).is_file()]
    if missing:
        raise missing_gates_error(missing, directory)
    return [load_gates(directory, c, expert=n).gates for n, c in zip(names, checksums)]


def train_command(names: Sequence[str], directory: str | os.PathLike[str] | None) -> str:
    """The command that trains the gates of ``names`` for the library owning ``directory``."""
    d = Path(directory) if directory is not None else None
    library = d.parent.parent if d is not None and d.parent.name == DERIVED_DIR else "LIBRARY"
    shown = ",".join(names[:20]) + (",..." if len(names) > 20 else "")
    return f"lorashelf gates train {library} --experts {shown}"


def missing_gates_error(
    names: Sequence[str], directory: str | os.PathLike[str] | None
) -> LorashelfError:
    listed = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return LorashelfError(
        f"PHATGOOSE needs trained gates, and {len(names)} expert(s) have none: {listed}; "
        f"train them with `{train_command(names, directory)}`"
    )


def _corrupt(expert: str, path: Path, why: str) -> LorashelfError:
    return LorashelfError(
        f"PHATGOOSE gates of expert {expert!r} ({path}) are unusable: {why}; retrain "
        f"them (`{train_command([expert], path.parent)}`)"
    )


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
