"""The server's routers: a routed composition's options, and its routers per module.

A routed request names a router group ``(kind, library, subset, top_k, temperature,
settings)``. :func:`router_config` turns it into the method's options dataclass (the
request's top-level top-k and temperature first, then its settings, then the
defaults; bad settings raise, the request's 400). :func:`build_routers` builds the
method's routers over the group's experts, the library's or the ones the method
rewrote (GenKnowSub: attached by the bank as virtual columns named by
:func:`rewrite_column`), and pairs each module's router with the positions of those
columns in that module's stack, where the batch router writes its weights.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorashelf.errors import LorashelfError

if TYPE_CHECKING:
    from lorashelf.serve.bank import Bank


def settings_tag(settings: Sequence[tuple[str, Any]]) -> str:
    """A composition's settings as they appear in a column name: ``{density=0.3}``."""
    return "{" + ",".join(f"{k}={v}" for k, v in settings) + "}" if settings else ""


def rewrite_column(key: Hashable, expert: str) -> str:
    """A rewritten expert's column: ``LIB:arrow{gks=delta,...}/EXPERT``."""
    kind, lib, _, _, _, settings = key
    return f"{lib}:{kind}{settings_tag(settings)}/{expert}"


def router_config(bank: Bank, key: Hashable) -> Any:
    """The router's options: its dataclass with the request's top-k, temperature and
    settings (unknown or bad ones raise)."""
    from lorashelf.methods import check_settings, get_method, make_config

    kind, lib, subset, top_k, temp, settings = key
    method = get_method(kind)
    fields = dict(settings)
    check_settings([method], fields)
    names = bank.members(lib, subset)
    # the request's top-level top_k / temperature, else its settings', else the default
    fields["top_k"] = min(top_k or fields.get("top_k") or method.config_cls().top_k, len(names))
    if kind == "arrow" and (temp != 1.0 or "temperature" not in fields):
        fields["temperature"] = temp
    if kind == "phatgoose":
        from lorashelf.route.gate_store import gates_dir

        fields["gates_dir"] = str(gates_dir(bank.libraries[lib].path))
    config = make_config(method, fields)
    if getattr(config, "mix", "output") != "output":
        raise LorashelfError(
            f"the server mixes the experts' outputs; mix={config.mix!r} (parameter "
            f"mixing) is not served: evaluate it with `lorashelf eval LIB --method {kind} "
            f"--set mix={config.mix}`, or drop the setting"
        )
    return config


def build_routers(bank: Bank, key: Hashable) -> dict[str, tuple[Any, torch.Tensor]]:
    """One router per adapted module for group ``key``, with the bank columns it weighs
    (the library's experts, or the ones its method rewrote)."""
    from lorashelf.route import ROUTERS, RouterContext

    kind, lib, *_ = key
    rewritten = bank.rewritten(key)
    if rewritten is None:
        experts, sums = bank.library_experts(key)
        columns = {n: f"{lib}/{n}" for n, _ in experts}
    else:
        experts, sums = rewritten
        columns = {n: rewrite_column(key, n) for n, _ in experts}
    spec = ROUTERS.get(kind)
    library = bank.libraries[lib]
    ctx = RouterContext(
        experts, checksums=sums, cache_dir=library.path / "cache", device=bank.device
    )
    routers = spec.build(router_config(bank, key), ctx)
    out = {}
    for m, router in routers.items():
        layer = bank.layer(m)
        position = {int(c): j for j, c in enumerate(layer.members.tolist())}
        present = [n for n, fs in experts if m in fs]
        cols = [position[bank.columns[columns[n]]] for n in present]
        if isinstance(router, nn.Module):
            router.to(bank.device)
        out[m] = (router, torch.tensor(cols, device=bank.device))
    return out
