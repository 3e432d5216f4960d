"""The registry of weight-space merges: one line per method, imported on first use.

Every consumer (``merge run``, ``eval --method``, ``fewshot``, ``serve``, the contract
tests) looks merges up here. To add one, write ``lorashelf/merge/NAME.py`` with a frozen
options dataclass, the function and ``NAME = MergeMethod(...)``, then add its line below.
"""

from __future__ import annotations

from lorashelf.registry import Registry

MERGES: Registry = Registry(
    "merge method",
    {
        "uniform": "lorashelf.merge.uniform:UNIFORM",
        "uniform-delta": "lorashelf.merge.uniform:UNIFORM_DELTA",
        "ties": "lorashelf.merge.ties:TIES",
        "task-arithmetic": "lorashelf.merge.task_arithmetic:TASK_ARITHMETIC",
        "dare-linear": "lorashelf.merge.dare:DARE_LINEAR",
        "dare-ties": "lorashelf.merge.dare:DARE_TIES",
        "wudi": "lorashelf.merge.wudi:WUDI",
        "core-space": "lorashelf.merge.core_space:CORE_SPACE",
        "knots": "lorashelf.merge.knots:KNOTS",
    },
)
