"""The two JSON documents of a library: ``library.json`` and each expert's ``card.json``.

Both are plain JSON so anyone can read a library without lorashelf (the spirit of
Hugging Face model cards and litgpt's hyperparameter files). ``library.json`` holds the
format version, the base model's canonical id and the policy every expert must meet
(target modules, rank, whether mixing is allowed). A card records what an expert is
(tasks, base model), how it was made (training config, data fingerprint, losses, init
seed, source, package versions) and the sha256 of each of its files.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lorashelf.errors import LorashelfError, did_you_mean

LIBRARY_FILE = "library.json"
LIBRARY_FORMAT = "lorashelf.library"
FORMAT_VERSION = 1
CARD_FILE = "card.json"
CARD_VERSION = 1

# Card fields in the order they are written; the caller may set all but the last three.
CARD_FIELDS = (
    "name",
    "tasks",
    "source",
    "base_model",
    "base_model_exact",
    "training",
    "data_fingerprint",
    "train_loss",
    "valid_loss",
    "init_seed",
    "origin",
    "versions",
    "extra",
    "created",
    "files",
    "card_version",
)
LIBRARY_OWNED = ("created", "files", "card_version")
_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "source": (str,),
    "base_model": (str,),
    "base_model_exact": (str,),
    "training": (dict, type(None)),
    "data_fingerprint": (str, type(None)),
    "train_loss": (int, float, type(None)),
    "valid_loss": (int, float, type(None)),
    "init_seed": (int, type(None)),
    "origin": (dict, type(None)),
    "versions": (dict,),
    "extra": (dict,),
}


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def current_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape an adapter (read without importing)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg in ("lorashelf", "torch", "transformers", "peft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def check_caller_card(card: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the fields a caller passes to ``Library.add``; returns a normalised copy."""
    out = dict(card)
    for key in out:
        if key not in CARD_FIELDS:
            raise LorashelfError(
                f"unknown card field {key!r}{did_you_mean(key, CARD_FIELDS)}; put free-form "
                f"data under 'extra'; known fields: {', '.join(CARD_FIELDS)}"
            )
    if isinstance(out.get("tasks"), str):
        out["tasks"] = [out["tasks"]]
    tasks = out.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise LorashelfError(f"card field 'tasks' must be a list of task ids, not {tasks!r}")
    for key, types in _TYPES.items():
        value = out.get(key)
        if key in out and (not isinstance(value, types) or isinstance(value, bool)):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise LorashelfError(f"card field {key!r} must be {names}, not {value!r}")
    for key in ("train_loss", "valid_loss"):
        value = out.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise LorashelfError(
                f"training diverged: the {key.replace('_', ' ')} is {value}; lower the "
                "learning rate (--lr) or train in fp32 (--dtype fp32)"
            )
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise LorashelfError(f"card fields must be plain JSON: {e}") from None
    return out


def make_card(
    caller: Mapping[str, Any],
    *,
    name: str,
    base_model: str,
    base_model_exact: str,
    files: Mapping[str, str],
    versions: Mapping[str, str | None],
) -> dict[str, Any]:
    """A full card: the caller's fields, then what only the library may fill."""
    card: dict[str, Any] = {
        "name": name,
        "tasks": list(caller.get("tasks", [])),
        "source": caller.get("source", "import"),
        "base_model": base_model,
        "base_model_exact": base_model_exact,
        "training": caller.get("training"),
        "data_fingerprint": caller.get("data_fingerprint"),
        "train_loss": caller.get("train_loss"),
        "valid_loss": caller.get("valid_loss"),
        "init_seed": caller.get("init_seed"),
        "origin": caller.get("origin"),
        "versions": dict(caller.get("versions") or versions),
        "extra": dict(caller.get("extra") or {}),
        "created": utc_now(),
        "files": dict(files),
        "card_version": CARD_VERSION,
    }
    return card


def new_library_meta(
    base_model: str,
    *,
    target_modules: list[str] | None = None,
    rank: int | None = None,
    allow_mixed: bool = False,
) -> dict[str, Any]:
    return {
        "format": LIBRARY_FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "target_modules": sorted(target_modules) if target_modules else None,
        "rank_policy": {"rank": rank, "allow_mixed": bool(allow_mixed)},
        "created": utc_now(),
        "created_by": f"lorashelf {current_versions()['lorashelf']}",
    }


def read_library_meta(root: Path) -> dict[str, Any]:
    path = root / LIBRARY_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise LorashelfError(
            f"no library at {root} ({LIBRARY_FILE} is missing); create one with "
            f"`lorashelf library init {root} --base MODEL`"
        ) from None
    except (OSError, ValueError) as e:
        raise LorashelfError(f"{path} is unreadable ({e}); restore it from a backup") from None
    if not isinstance(meta, dict) or meta.get("format") != LIBRARY_FORMAT:
        raise LorashelfError(f"{path} is not a lorashelf library file")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise LorashelfError(
            f"{root} uses library format {meta['format_version']}, newer than this lorashelf "
            f"reads ({FORMAT_VERSION}); upgrade lorashelf"
        )
    return meta


def owning_library(path: str | Path) -> Path | None:
    """The library directory ``path`` lies in (or is), or None.

    Outputs of other commands (a clusters JSON, a merged adapter, results) must never
    land inside a library: they would replace its ``library.json``, index or experts.
    """
    here = Path(path).expanduser().resolve()
    for parent in (here, *here.parents):
        meta = parent / LIBRARY_FILE
        if meta.is_file():
            try:
                if json.loads(meta.read_text()).get("format") == LIBRARY_FORMAT:
                    return parent
            except (OSError, ValueError, AttributeError):
                continue
    return None
