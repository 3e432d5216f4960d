"""The library: LoRA experts stored as PEFT adapter dirs with cards, indexed in SQLite.

Every later method (MBC clustering, Arrow routing, LoraHub, merges) reads its experts
from here, as in Ostapenko et al. 2024 (arXiv 2405.11157), where a library of per-task
LoRA experts is the unit that routing and composition work over.

    lib = Library.open("lib", create=True, base_model="smollm2-135m")
    lib.add("peft_dir", name=safe_name("bigbench:logical_deduction/three_objects"),
            card={"tasks": ["bigbench:logical_deduction/three_objects"], "source": "train"})
    factors = lib.get(name).lora_factors()  # {"model.layers.0.self_attn.q_proj": LoraFactors}

Importing this package does not import torch (``lorashelf library ls`` stays fast).
"""

from __future__ import annotations

from lorashelf.library.expert import Expert, Problem
from lorashelf.library.factors import LoraFactors, read_lora_factors
from lorashelf.library.names import check_name, safe_name
from lorashelf.library.store import Library
from lorashelf.library.transfer import export_expert, export_library, import_adapter, import_all

__all__ = [
    "Expert",
    "Library",
    "LoraFactors",
    "Problem",
    "check_name",
    "export_expert",
    "export_library",
    "import_adapter",
    "import_all",
    "read_lora_factors",
    "safe_name",
]
