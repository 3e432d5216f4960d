"""The LoRA core every reuse method stands on.

One factors type per module (:class:`LoraFactors`, ``delta W = scale * B @ A``), one
expert-set type (:data:`Experts`, a list of ``(name, {module path: LoraFactors})``),
the stacks that lay many experts out for one matmul, one weighted combination
(:func:`combine`), one SVD truncation and one PEFT writer (:mod:`lorashelf.lora.peft`),
and the mixture-of-LoRA layer that attaches many experts to a base model with fixed,
per-sequence or per-token weights (:func:`attach`). Routers, merges and few-shot
composition (lorashelf.route, .merge, .compose) import from here and never from each
other.
"""

from lorashelf.library.factors import LoraFactors, read_lora_factors
from lorashelf.lora.combine import combine
from lorashelf.lora.mixture import MixtureHandle, MixtureLinear, attach
from lorashelf.lora.peft import truncate, truncate_all, write_peft_adapter
from lorashelf.lora.router import Router
from lorashelf.lora.stack import Experts, ExpertStack, check_experts, stack_experts

__all__ = [
    "ExpertStack",
    "Experts",
    "LoraFactors",
    "MixtureHandle",
    "MixtureLinear",
    "Router",
    "attach",
    "check_experts",
    "combine",
    "read_lora_factors",
    "stack_experts",
    "truncate",
    "truncate_all",
    "write_peft_adapter",
]
