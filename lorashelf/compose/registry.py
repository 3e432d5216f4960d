"""The registry of few-shot methods ``lorashelf fewshot`` compares, one line each.

Every zero-shot method (lorashelf.methods: merges, routers) joins this table in
``fewshot`` as a method that ignores the shots, so only methods that use the shots
are listed here. To add one, write its ``build(ctx) -> Built`` and
``NAME = FewShotMethod(...)`` in a module and add its line below.
"""

from __future__ import annotations

from lorashelf.registry import Registry

FEWSHOT_METHODS: Registry = Registry(
    "few-shot method",
    {
        "zero-shot": "lorashelf.compose.baselines:ZERO_SHOT",
        "icl": "lorashelf.compose.baselines:ICL",
        "lorahub": "lorashelf.compose.baselines:LORAHUB",
        "gradient": "lorashelf.compose.baselines:GRADIENT",
        "cat": "lorashelf.compose.cat:CAT",
        "lora": "lorashelf.compose.baselines:LORA",
    },
)
