"""``export_adapter``: resolve a method spec and write it as a PEFT dir or a GGUF LoRA.

The output appears at ``out`` in one rename or not at all: it is written into a
temporary sibling and moved into place at the end, so a failure (a refused rank, a
module llama.cpp has no tensor for, a full disk) leaves nothing half-written. An
existing ``out`` is replaced only with ``overwrite`` and only when it is something an
export wrote (a PEFT dir carrying ``export.json``, or a GGUF carrying our record): an
overwrite never deletes a library, a model or an unrelated directory.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorashelf.config import write_json_atomic
from lorashelf.errors import LorashelfError
from lorashelf.export.peft import check_target, for_vllm, vllm_problems
from lorashelf.export.resolve import Resolved, resolve
from lorashelf.library import Library

FORMATS = ("peft", "gguf")
RECORD_FILE = "export.json"


@dataclass(frozen=True)
class Exported:
    """Where the export went and what it holds."""

    path: Path
    format: str
    rank: int
    modules: int
    resolved: Resolved = field(repr=False)
    changes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "rank": self.rank,
            "modules": self.modules,
            "changes": self.changes,
            **self.resolved.record(),
        }


def export_adapter(
    lib: Library,
    method: str,
    fmt: str,
    out: str | os.PathLike[str],
    *,
    target: str | None = None,
    rank: int | None = None,
    experts: list[str] | None = None,
    density: float = 0.2,
    mix: str = "output",
    base: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Exported:
    """Write the adapter ``method`` reduces to as ``fmt`` ("peft" or "gguf") at ``out``.

    ``target="vllm"`` (peft) pads the rank to one vLLM accepts; ``base`` (gguf) is the
    base model's GGUF file or model dir (default: the library's base, when it is a known
    model with an embedded GGUF).
    """
    if fmt not in FORMATS:
        raise LorashelfError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    check_target(target)
    if target is not None and fmt != "peft":
        raise LorashelfError(f"--target {target} applies to --format peft; drop it for {fmt}")
    out = Path(out)
    check_out(out, lib, overwrite, fmt)
    gguf_base = _gguf_base(lib, base) if fmt == "gguf" else None  # fail before the math
    resolved = resolve(lib, method, experts=experts, rank=rank, density=density, mix=mix)
    factors, changes = resolved.factors, []
    if target == "vllm":
        fixed = for_vllm(factors)
        factors, changes = fixed.factors, fixed.changes
    top = max(f.rank for f in factors.values())
    record = {"format": "lorashelf.export", "base_model": lib.base_model, "target": target,
              "rank": top, "changes": changes, **resolved.record()}  # fmt: skip
    tmp = out.parent / f".{out.name}.export-{os.urandom(6).hex()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "peft":
            from lorashelf.lora import write_peft_adapter

            config = write_peft_adapter(factors, tmp, lib.base_model)
            problems = vllm_problems(config) if target == "vllm" else []
            if problems:  # for_vllm makes this impossible; never hand vLLM a broken dir
                raise LorashelfError(f"vLLM would reject {out}: {'; '.join(problems)}")
            write_json_atomic(tmp / RECORD_FILE, record)
        else:
            from lorashelf.export.gguf import write_gguf_lora

            assert gguf_base is not None
            write_gguf_lora(factors, tmp, gguf_base, record=record, name=method)
        _replace(tmp, out)
    finally:
        _remove(tmp)
    return Exported(out, fmt, top, len(factors), resolved, changes)


def check_out(out: Path, lib: Library, overwrite: bool, fmt: str) -> None:
    """Refuse an ``out`` that exists, unless ``overwrite`` and it is a previous export."""
    if _inside(out, lib.path) or _inside(lib.path, out):
        raise LorashelfError(
            f"{out} is inside (or holds) the library {lib.path}; write the export elsewhere"
        )
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if not overwrite:
        raise LorashelfError(f"{out} already exists; pick another path or pass --overwrite")
    if not _is_export(out, fmt):
        raise LorashelfError(
            f"{out} exists and is not a {fmt} export lorashelf wrote; --overwrite replaces "
            "only those, so pick another path (nothing was changed)"
        )


def _is_export(path: Path, fmt: str) -> bool:
    if path.is_symlink():
        return False
    if fmt == "peft":
        return path.is_dir() and (path / RECORD_FILE).is_file()
    from lorashelf.export.gguf import is_our_gguf

    return path.is_file() and is_our_gguf(path)


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def _gguf_base(lib: Library, base: str | os.PathLike[str] | None) -> Any:
    from lorashelf.export.gguf import read_base
    from lorashelf.models import same_base

    if base is None:
        from lorashelf.models.known import KNOWN

        known = next((k for k in KNOWN.values() if same_base(k.hub_id, lib.base_model)), None)
        if known is None:
            raise LorashelfError(
                f"the library's base {lib.base_model} has no embedded GGUF; pass --base "
                "with the base model's .gguf file (or its model dir)"
            )
        from lorashelf.models.load import _locate_gguf

        return read_base(_locate_gguf(known))
    path = Path(base).expanduser()
    if not path.exists():
        raise LorashelfError(f"--base {base} does not exist; pass the base model's .gguf file")
    return read_base(path)


def _replace(tmp: Path, out: Path) -> None:
    if out.is_dir() and not out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.urandom(6).hex()}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
