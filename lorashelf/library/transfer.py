"""Bring adapters in from the PEFT ecosystem and hand them back out.

``import_adapter`` accepts a local PEFT adapter dir or a Hugging Face Hub repo id
(``org/name``), fetched with ``huggingface_hub.snapshot_download`` so the usual HF cache,
offline mode (``HF_HUB_OFFLINE``) and tokens apply; the card records where it came from.
``export_expert`` writes a plain PEFT dir (plus ``card.json``) that
``PeftModel.from_pretrained`` loads without lorashelf, through a temporary sibling dir
and one rename.

Whole libraries travel as one dir or Hub repo with one PEFT adapter per subfolder (the
layout of the clustered-Flan expert repos that PEFT's Arrow example loads with
``subfolder=``): ``import_all`` adds every adapter subfolder, checking them all before
adding any; ``export_library`` writes that layout back, each subfolder with its card
and a manifest at the top, so ``import_all`` restores names and tasks.

An export never replaces what it did not write: ``overwrite`` replaces an empty dir or
an earlier export (an adapter dir holding only the exported files, or a library export
with its manifest), never a library, a dir inside one, or any other dir.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorashelf.errors import LorashelfError
from lorashelf.library.adapter import apply_policy, check_base, read_adapter
from lorashelf.library.expert import Expert
from lorashelf.library.factors import CONFIG_FILE, WEIGHTS_FILE
from lorashelf.library.fsutil import fsync_dir, remove_tree, write_new_file
from lorashelf.library.names import safe_name
from lorashelf.library.schema import CARD_FILE
from lorashelf.library.store import Library

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
ADAPTER_FILES = [CONFIG_FILE, WEIGHTS_FILE, "adapter_model.bin"]
EXPORTED_FILES = {CONFIG_FILE, WEIGHTS_FILE, CARD_FILE}
MANIFEST_FILE = "lorashelf_export.json"
MANIFEST_FORMAT = "lorashelf.library-export"
# card fields an exported card carries back in; the library sets the rest anew
CARRIED_FIELDS = ("tasks", "source", "training", "data_fingerprint", "train_loss",
                  "valid_loss", "init_seed", "extra")  # fmt: skip


def resolve_source(
    src: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    patterns: list[str] | None = None,
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
            repo_id=src,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=patterns or ADAPTER_FILES,
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


def import_all(
    lib: Library,
    src: str,
    *,
    revision: str | None = None,
    overwrite: bool = False,
    allow_mixed: bool = False,
) -> list[Expert]:
    """Add every PEFT adapter subfolder of ``src`` (a dir or hub repo id) to ``lib``.

    Names and cards come from each subfolder's ``card.json`` when it has one (a library
    export), else from the subfolder's path. Every adapter is checked (plain LoRA, the
    library's base, its policy, no name clash unless ``overwrite``) before any is added.
    """
    patterns = [f"*{fn}" for fn in (*ADAPTER_FILES, CARD_FILE)]
    root, origin = resolve_source(src, revision=revision, patterns=patterns)
    dirs = sorted(p.parent for p in root.rglob(CONFIG_FILE) if p.parent != root)
    if not dirs:
        one = (root / CONFIG_FILE).is_file()
        raise LorashelfError(
            f"{src} is one adapter, not a folder of them; import it without --all"
            if one
            else f"{src} has no PEFT adapter subfolders (*/{CONFIG_FILE}); check the path"
        )
    plan = [_plan_one(root, d, origin) for d in dirs]
    _check_plan(lib, plan, overwrite, allow_mixed)
    return [
        lib.add(d, name, card, overwrite=overwrite, allow_mixed=allow_mixed)
        for d, name, card in plan
    ]


def _plan_one(root: Path, sub: Path, origin: dict[str, Any]) -> tuple[Path, str, dict]:
    rel = sub.relative_to(root).as_posix()
    card: dict[str, Any] = {}
    if (sub / CARD_FILE).is_file():
        try:
            card = json.loads((sub / CARD_FILE).read_text())
        except ValueError as e:
            raise LorashelfError(f"{sub / CARD_FILE} is not valid JSON ({e})") from None
    fields = {k: card[k] for k in CARRIED_FIELDS if k in card}
    fields = {"source": "import", **fields, "origin": {**origin, "subfolder": rel}}
    return sub, card.get("name") or safe_name(rel), fields


def _check_plan(lib: Library, plan: list[tuple[Path, str, dict]], overwrite: bool,
                allow_mixed: bool) -> None:  # fmt: skip
    """Everything ``Library.add`` would refuse, for all adapters, before adding one."""
    names = [name for _, name, _ in plan]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LorashelfError(f"several subfolders map to the name {dupes[0]!r}; rename one")
    taken = [n for n in names if n in lib] if not overwrite else []
    if taken:
        raise LorashelfError(
            f"{len(taken)} expert(s) already in {lib.path} ({', '.join(taken[:3])}); pass "
            "--overwrite to replace them, or import into another library"
        )
    meta = lib.meta
    for path, name, _ in plan:
        what = f"adapter {name!r} ({path})"
        adapter = read_adapter(path, what)
        check_base(adapter.base_model_exact, None, lib.base_model, what)
        meta = apply_policy(meta, adapter, what, allow_mixed)


def export_library(
    lib: Library, out: str | os.PathLike[str], *, overwrite: bool = False
) -> list[Path]:
    """Write every expert of ``lib`` to ``out/NAME`` (PEFT files + card) and a manifest."""
    out = Path(out)
    _check_out(out, lib.path, overwrite, _is_library_export)
    if len(lib) == 0:
        raise LorashelfError(f"library {lib.path} has no experts to export")
    tmp = out.parent / f".{out.name}.export-{os.urandom(6).hex()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        for expert in lib:
            _write_expert(expert, tmp / expert.name)
        manifest = {"format": MANIFEST_FORMAT, "base_model": lib.base_model,
                    "experts": lib.names()}  # fmt: skip
        write_new_file(tmp / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
        fsync_dir(tmp)
        _swap_in(tmp, out)
    finally:
        if tmp.exists():
            remove_tree(tmp)
    return [out / n for n in lib.names()]


def export_expert(expert: Expert, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``expert`` as a plain PEFT dir at ``out`` (files verified on the way)."""
    out = Path(out)
    _check_out(out, expert.path.parent.parent, overwrite, _is_expert_export)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.urandom(6).hex()}"
    try:
        _write_expert(expert, tmp)
        _swap_in(tmp, out)
    finally:
        if tmp.exists():
            remove_tree(tmp)
    return out


def _write_expert(expert: Expert, dest: Path) -> None:
    dest.mkdir()
    for fn in (CONFIG_FILE, WEIGHTS_FILE):
        write_new_file(dest / fn, expert.read_file(fn))
    write_new_file(dest / CARD_FILE, (expert.path / CARD_FILE).read_bytes())
    fsync_dir(dest)


def _check_out(out: Path, library_root: Path, overwrite: bool, ours: Any) -> None:
    """Refuse to write over anything an export did not write (see the module doc)."""
    lib, target = library_root.resolve(), out.resolve()
    if target == lib or lib in target.parents or target in lib.parents:
        raise LorashelfError(
            f"{out} is the library {library_root}, inside it or above it; export to a path "
            "outside the library"
        )
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if not overwrite:
        raise LorashelfError(f"{out} exists and is not empty; pick another path or --overwrite")
    if out.is_symlink() or not ours(out):
        raise LorashelfError(
            f"{out} is not an export lorashelf wrote; --overwrite replaces only those, so "
            "pick another path (nothing was changed)"
        )


def _is_expert_export(path: Path) -> bool:
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    return CARD_FILE in names and CONFIG_FILE in names and names <= EXPORTED_FILES


def _is_library_export(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    entries = [p for p in path.iterdir() if p.name != MANIFEST_FILE]
    return manifest.get("format") == MANIFEST_FORMAT and all(
        p.is_dir() and not p.is_symlink() and _is_expert_export(p) for p in entries
    )


def _swap_in(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an old ``out`` is renamed aside first, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.urandom(6).hex()}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        remove_tree(old)
