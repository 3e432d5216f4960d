"""Open the libraries to serve and load their base model once: a ready :class:`Bank`.

Every served library must share one base model (one set of weights answers all of
them); each is named by its directory's name in model ids (``LIB``, ``LIB/EXPERT``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lorashelf.errors import LorashelfError
from lorashelf.library import Library
from lorashelf.serve.bank import Bank


def open_libraries(paths: Sequence[Path]) -> dict[str, Library]:
    """``{name: Library}``, named by directory; refuses two names alike or mixed bases."""
    libraries: dict[str, Library] = {}
    for path in paths:
        name = Path(path).resolve().name
        if name in libraries:
            raise LorashelfError(
                f"two libraries are named {name!r} ({libraries[name].path} and {path}); "
                "model ids use the directory name, so rename one directory"
            )
        if not (Path(path) / "library.json").exists():
            raise LorashelfError(
                f"{path} is not a library (no library.json); make one with "
                "`lorashelf library init` or train into it"
            )
        libraries[name] = Library.open(path)
    bases = {lib.base_model for lib in libraries.values()}
    if len(bases) > 1:
        raise LorashelfError(
            f"the libraries have different base models ({', '.join(sorted(bases))}); one "
            "server runs one base model: serve each base from its own `lorashelf serve`"
        )
    return libraries


def load_bank(
    paths: Sequence[Path],
    *,
    home: Path,
    device: torch.device,
    dtype: str | None = None,
    model: str | None = None,
    lora_dtype: str = "model",
) -> tuple[Bank, Any]:
    """The bank over ``paths`` on the libraries' base model (or ``model``), and its tokenizer.

    ``lora_dtype`` is ``model`` (the LoRA branch computes in the model's dtype, the
    fastest) or a dtype name (``fp32``: PEFT's numerics on a bf16 model)."""
    from lorashelf.models import load_base
    from lorashelf.runtime import resolve_dtype

    libraries = open_libraries(paths)
    name = model or next(iter(libraries.values())).base_model
    base = load_base(name, home=home, dtype=resolve_dtype(dtype, device), device=device)
    lora = None if lora_dtype == "model" else resolve_dtype(lora_dtype, device)
    bank = Bank(base.model, libraries, lora_dtype=lora, tokenizer=base.tokenizer, home=home)
    return bank, base.tokenizer
