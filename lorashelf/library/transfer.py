"""Bring adapters in from the PEFT ecosystem and hand them back out.

``import_adapter`` accepts a local PEFT adapter dir or a Hugging Face Hub repo id
(``org/name``), fetched with ``huggingface_hub.snapshot_download`` so the usual HF cache,
offline mode (``HF_HUB_OFFLINE``) and tokens apply; the card records where it came from.
``export_expert`` writes a plain PEFT dir (plus ``card.json``) that
``PeftModel.from_pretrained`` loads without lorashelf, through a temporary sibling dir
and one rename.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorashelf.errors import LorashelfError
from lorashelf.library.expert import Expert
from lorashelf.library.factors import CONFIG_FILE, WEIGHTS_FILE
from lorashelf.library.fsutil import fsync_dir, remove_tree, write_new_file
from lorashelf.library.names import safe_name
from lorashelf.library.schema import CARD_FILE
from lorashelf.library.store import Library

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
ADAPTER_FILES = [CONFIG_FILE, WEIGHTS_FILE, "adapter_model.bin"]


def resolve_source(
    src: str, *, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[Path, dict[str, Any]]:
    """The local adapter dir for ``src`` (a dir or a hub repo id) and its origin record."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path, {"type": "dir", "path": str(path.resolve())}
    if not _REPO_ID.fullmatch(src):
        raise LorashelfError(
            f"{src!r} is neither a PEFT adapter dir nor a Hugging Face repo id (org/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(
            repo_id=src, revision=revision, cache_dir=cache_dir, allow_patterns=ADAPTER_FILES
        )
    except LocalEntryNotFoundError as e:
        raise LorashelfError(
            f"cannot fetch {src!r}: it is not in the Hugging Face cache and the hub is "
            f"unreachable or offline (HF_HUB_OFFLINE); connect and retry ({e.__class__.__name__})"
        ) from None
    except HfHubHTTPError as e:
        raise LorashelfError(f"cannot fetch {src!r} from the Hugging Face hub: {e}") from None
    local_path = Path(local)
    origin = {"type": "hub", "repo_id": src, "revision": local_path.name}
    return local_path, origin


def import_adapter(
    lib: Library,
    src: str,
    *,
    name: str | None = None,
    card: Mapping[str, Any] | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    allow_mixed: bool = False,
    allow_base: bool = False,
) -> Expert:
    """Add the adapter at ``src`` (dir or hub repo id) to ``lib`` with source "import"."""
    path, origin = resolve_source(src, revision=revision)
    fields = {"source": "import", "origin": origin, **dict(card or {})}
    if name is None and not fields.get("name"):
        name = safe_name(src) if origin["type"] == "hub" else None
    return lib.add(
        path, name, fields, overwrite=overwrite, allow_mixed=allow_mixed, allow_base=allow_base
    )


def export_expert(expert: Expert, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``expert`` as a plain PEFT dir at ``out`` (files verified on the way)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LorashelfError(f"{out} exists and is not empty; pick another path or --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.urandom(6).hex()}"
    tmp.mkdir()
    try:
        for fn in (CONFIG_FILE, WEIGHTS_FILE):
            write_new_file(tmp / fn, expert.read_file(fn))
        write_new_file(tmp / CARD_FILE, (expert.path / CARD_FILE).read_bytes())
        fsync_dir(tmp)
        if out.exists():
            remove_tree(out)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            remove_tree(tmp)
    return out
