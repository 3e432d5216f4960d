"""Route tokens over a library of LoRA experts: the mixture-of-LoRA layer, Arrow, reports.

    from lorashelf.route import ArrowConfig, build_routed_model
    routed = build_routed_model(model, experts, "arrow", ArrowConfig(top_k=4))
    with routed.record() as stats:
        logits = routed(input_ids=ids, attention_mask=mask).logits
    routed.detach()

``attach(model, experts, weights=...)`` gives fixed or per-sequence mixtures (merges,
LoraHub); ``ROUTERS`` lists routing methods (one module + one registry entry each).
"""

from lorashelf.lora import ExpertStack, MixtureHandle, MixtureLinear, attach, stack_experts
from lorashelf.route.arrow import ArrowConfig, ArrowRouter, build_arrow_routers
from lorashelf.route.prototypes import arrow_prototypes, top_right_singular_vectors
from lorashelf.route.registry import ROUTERS
from lorashelf.route.report import save_routing_report
from lorashelf.route.routed import RoutedModel, build_routed_model
from lorashelf.route.router import Router, RouterContext, RouterMethod
from lorashelf.route.stats import RoutingStats

__all__ = [
    "ROUTERS",
    "ArrowConfig",
    "ArrowRouter",
    "ExpertStack",
    "MixtureHandle",
    "MixtureLinear",
    "RoutedModel",
    "Router",
    "RouterContext",
    "RouterMethod",
    "RoutingStats",
    "arrow_prototypes",
    "attach",
    "build_arrow_routers",
    "build_routed_model",
    "save_routing_report",
    "stack_experts",
    "top_right_singular_vectors",
]
