"""The served model: one base model with every expert of its libraries attached.

A :class:`Bank` reads its libraries (kept open: SQLite readers see each new commit,
and a library add renames the finished expert into place before its index row is
committed, so a half-written expert is never listed; its files are checked against
their sha256 when read), attaches all experts plus the virtual ones with
:func:`lorashelf.lora.attach` and one :class:`~lorashelf.serve.plan.BatchRouter` per
module, and turns each request's :class:`~lorashelf.serve.compositions.Composition`
into a :class:`~lorashelf.serve.plan.RowSpec`. Merges (any of lorashelf.merge.registry)
and routers are built on first use and cached (a few variants each: per-request
settings, top-k, temperature, subsets); a low-rank merge is attached as a virtual
expert, a dense one (TIES, DARE, ...) is added as a per-row delta. A router that
rewrites its experts first (Arrow with GenKnowSub: each task expert minus the mean of
the general-knowledge experts) has the rewritten experts attached as virtual experts
and routes over those. Retrieval routing picks each request's experts once, from its
prompt: :meth:`retrieve` embeds the prompts with the plain base model (the plan's
``off`` switch) as eval's retrieval router does, and turns each row into fixed weights
over the retrieved experts, or into Arrow among them (``then_arrow``).
Routers' options and per-module routers are built in lorashelf.serve.routing, the
retrieval step in lorashelf.serve.retrieval. Only the engine's worker thread calls
:meth:`prepare`, :meth:`retrieve` and :meth:`refresh`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorashelf.errors import LorashelfError, did_you_mean
from lorashelf.library import Library
from lorashelf.serve.compositions import Composition, UnknownModel, merge_kinds, routed_kinds
from lorashelf.serve.plan import BatchPlan, BatchRouter, DeltaLinear, RowSpec
from lorashelf.serve.retrieval import can_retrieve
from lorashelf.serve.routing import build_routers, rewrite_column, router_config, settings_tag

log = logging.getLogger("lorashelf.serve")
CACHED_VARIANTS = 8  # router groups / TIES deltas / virtual experts kept per kind
GATED = ("phatgoose", "retrieval")  # listed only where their derived inputs can be had


@dataclass(frozen=True)
class Snapshot:
    """The experts of each library at the last refresh: ``{library: {expert: sha256}}``."""

    experts: Mapping[str, Mapping[str, str]]
    gates: Mapping[str, bool]  # library -> every expert has PHATGOOSE gates


class Bank:
    """The base model, its libraries and the attached mixture (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        libraries: Mapping[str, Library],
        lora_dtype: torch.dtype | None = None,
        *,
        tokenizer: Any = None,
        home: Path | None = None,
    ) -> None:
        self.model = model
        self.libraries = dict(libraries)
        # what retrieval routing embeds the experts' training prompts with
        self.tokenizer, self.home = tokenizer, home
        p = next(model.parameters())
        self.device = p.device
        # the LoRA branch's precision: the model's (None), or float32 as PEFT computes
        # adapters on a bf16 base
        self.lora_dtype = lora_dtype
        self.dtype = lora_dtype or p.dtype
        self.plan = BatchPlan(self.device)
        self.snapshot = Snapshot({}, {})  # what is served
        self._seen = Snapshot({}, {})  # what the libraries listed at the last refresh
        self.unserved: dict[str, str] = {}  # column -> why it is left out (damaged files)
        self.factors: dict[str, dict[str, Any]] = {}  # column name -> {module: LoraFactors}
        # virtual experts: key -> [(column name, {module: LoraFactors})]
        self.virtual: OrderedDict[Hashable, list[tuple[str, dict[str, Any]]]] = OrderedDict()
        self.columns: dict[str, int] = {}
        self.layout = 0  # counts re-attachments: a running batch then re-prepares its plan
        self._routers: OrderedDict[Hashable, dict] = OrderedDict()
        self._rewrites: OrderedDict[Hashable, Any] = OrderedDict()  # routed key -> experts
        self._retrievers: OrderedDict[Hashable, Any] = OrderedDict()
        self._merges: OrderedDict[Hashable, Any] = OrderedDict()
        self._deltas: OrderedDict[Hashable, dict] = OrderedDict()
        self._handle = None
        self._wrapped: dict[str, DeltaLinear] = {}
        self._loaded = False
        self.refresh()

    # ------------------------------------------------------------ library state
    def read_snapshot(self) -> Snapshot:
        """Every listed expert's weights sha256 and which libraries have all their gates."""
        experts = {
            lib_name: {e.name: e.files.get("adapter_model.safetensors", "") for e in lib}
            for lib_name, lib in self.libraries.items()
        }
        return self._with_gates(experts)

    def _with_gates(self, experts: Mapping[str, Mapping[str, str]]) -> Snapshot:
        from lorashelf.route.gate_store import gates_dir, gates_path

        gates = {}
        for lib_name, sums in experts.items():
            d = gates_dir(self.libraries[lib_name].path)
            gates[lib_name] = bool(sums) and all(
                gates_path(d, s).is_file() for s in sums.values() if s
            )
        return Snapshot(experts, gates)

    def refresh(self) -> bool:
        """Re-read the libraries; re-attach if an expert came, went or changed.

        An expert whose files fail their sha256 (or do not parse) is left out, with a
        warning naming it and the fix: the server answers every other model, and a
        request for the damaged one gets a 404, never its weights.
        """
        seen = self.read_snapshot()
        if seen == self._seen and self._loaded:
            return False
        old = self.snapshot.experts
        served: dict[str, dict[str, str]] = {}
        self.unserved = {}
        for lib_name, experts in seen.experts.items():
            served[lib_name] = {}
            for name, sha in experts.items():
                col = f"{lib_name}/{name}"
                if col not in self.factors or old.get(lib_name, {}).get(name) != sha:
                    try:
                        factors = (
                            self.libraries[lib_name].get(name).lora_factors(self.device, self.dtype)
                        )
                    except LorashelfError as e:
                        log.warning("not serving %s: %s", col, e)
                        self.factors.pop(col, None)
                        self.unserved[col] = str(e)
                        continue
                    self.factors[col] = factors
                served[lib_name][name] = sha
        live = {f"{lib}/{n}" for lib, ex in served.items() for n in ex}
        self.factors = {c: f for c, f in self.factors.items() if c in live}
        self._seen, self.snapshot = seen, self._with_gates(served)
        for cache in (self.virtual, self._merges, self._routers, self._deltas, self._rewrites,
                      self._retrievers):  # fmt: skip
            cache.clear()
        self._attach()
        self._loaded = True
        return True

    def compositions(self) -> list[Composition]:
        """Every composition a model id names: base, each expert, merges, routers."""
        out = []
        for lib, experts in self.snapshot.experts.items():
            out.append(Composition(lib))
            out += [Composition(lib, "expert", (n,)) for n in experts]
            if experts:
                out += [Composition(lib, k) for k in merge_kinds()]
                out += [Composition(lib, k) for k in routed_kinds() if k not in GATED]
            if experts and can_retrieve(self, lib):
                out.append(Composition(lib, "retrieval"))
            if experts and self.snapshot.gates.get(lib):
                out.append(Composition(lib, "phatgoose"))
        return out

    def model_ids(self) -> list[str]:
        return [c.model_id() for c in self.compositions()]

    # ------------------------------------------------------------ attachment
    def _attach(self) -> None:
        from lorashelf.lora import attach

        self._detach()
        self.layout += 1  # column indices changed: a running batch must re-prepare its plan
        experts = [(c, f) for c, f in self.factors.items()]
        experts += [col for cols in self.virtual.values() for col in cols]
        self.columns = {name: i for i, (name, _) in enumerate(experts)}
        for key in [k for k in self._routers if self.rewritten(k) is not None]:
            del self._routers[key]  # their columns may have moved
        if not experts:
            return
        modules = sorted({m for _, f in experts for m in f})
        for m in modules:
            base = self.model.get_submodule(m)
            self._wrapped[m] = DeltaLinear(base, m, self.plan)
            _set_module(self.model, m, self._wrapped[m])
        self._handle = attach(self.model, experts, routers={}, lora_dtype=self.lora_dtype)
        self._handle.set_routers(
            {
                m: BatchRouter(m, layer.members, self.plan)
                for m, layer in self._handle.layers.items()
            }
        )

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.detach()
            self._handle = None
        for m, wrapped in self._wrapped.items():
            _set_module(self.model, m, wrapped.original())
        self._wrapped = {}

    def close(self) -> None:
        self._detach()

    @staticmethod
    def _virtual_column(key: Hashable) -> str:
        """A merge's column name: ``LIB:METHOD[a,b]{density=0.3}``."""
        kind, lib, subset, settings = key
        return f"{lib}:{kind}" + (f"[{subset}]" if subset else "") + settings_tag(settings)

    @contextmanager
    def base_pass(self) -> Iterator[None]:
        """Forwards inside run the plain base model, whatever the plan's rows."""
        self.plan.off = True
        try:
            yield
        finally:
            self.plan.off = False

    # ------------------------------------------------------------ requests
    def resolve(self, comp: Composition) -> RowSpec:
        """The row spec of ``comp``; unknown experts raise (UnknownModel for a model id's)."""
        experts = self.snapshot.experts.get(comp.library)
        if experts is None:
            raise UnknownModel(comp.library, self.model_ids())
        names = comp.experts
        for n in names or ():
            if n not in experts:
                col = f"{comp.library}/{n}"
                if comp.kind == "expert":
                    raise UnknownModel(col, self.model_ids(), self.unserved.get(col))
                raise LorashelfError(
                    f"no expert {n!r} in library {comp.library}{did_you_mean(n, experts)}"
                )
        if comp.kind == "base":
            return RowSpec()
        if comp.kind in ("expert", "weights"):
            ws = comp.weights or (1.0,)
            return RowSpec(fixed=tuple((f"{comp.library}/{n}", w) for n, w in zip(names, ws)))
        if not experts:
            raise LorashelfError(f"library {comp.library} has no experts to {comp.kind}")
        subset = tuple(sorted(names)) if names else None
        if comp.merged:
            key = (comp.kind, comp.library, ",".join(subset) if subset else None, comp.settings)
            if self._merge(key).is_low_rank:
                return RowSpec(fixed=((self._virtual_column(key), 1.0),), virtual=key)
            return RowSpec(dense=key)
        if comp.kind == "phatgoose" and not self.snapshot.gates.get(comp.library):
            raise LorashelfError(
                f"library {comp.library} has experts without PHATGOOSE gates; train them "
                f"with `lorashelf gates train {self.libraries[comp.library].path}`"
            )
        key = (comp.kind, comp.library, subset, comp.top_k, comp.temperature, comp.settings)
        router_config(self, key)  # bad settings fail here, as the request's 400
        if comp.kind == "retrieval":
            return RowSpec(retrieve=key)
        if self.rewritten(key) is not None:
            return RowSpec(routed=key, virtual=("rewrite", key))
        return RowSpec(routed=key)

    def ready(self, spec: RowSpec) -> None:
        """Build (and cache) the routers or merge delta ``spec`` needs, before its batch
        runs: a damaged derived file (PHATGOOSE gates) then fails only the requests
        that use it, with its LorashelfError, not every row of the batch."""
        if spec.virtual is not None:
            self._ensure_virtual([spec.virtual])
        if spec.routed is not None:
            self._cached(self._routers, spec.routed, self._build_routers)
        if spec.dense is not None:
            self._cached(self._deltas, spec.dense, self._build_delta)

    def prepare(self, specs: Sequence[RowSpec], record: bool) -> None:
        """Make what ``specs`` need (virtual experts, routers, deltas) and set the plan."""
        assert all(s.retrieve is None for s in specs), "the engine retrieves before prefill"
        self._ensure_virtual([s.virtual for s in specs if s.virtual is not None])
        self.plan.set_rows(specs, self.columns, record)
        self.plan.routers = {
            k: self._cached(self._routers, k, self._build_routers) for k, _ in self.plan.routed
        }
        self.plan.deltas = {
            k: self._cached(self._deltas, k, self._build_delta) for k, _ in self.plan.dense
        }

    @staticmethod
    def _cached(cache: OrderedDict, key: Hashable, build) -> Any:
        if key not in cache:
            cache[key] = build(key)
            while len(cache) > CACHED_VARIANTS:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]

    def members(self, lib: str, subset: tuple[str, ...] | None) -> list[str]:
        return list(subset) if subset else list(self.snapshot.experts[lib])

    def _merge(self, key: Hashable) -> Any:
        """The :class:`~lorashelf.merge.Merged` of ``(method, lib, subset, settings)``."""
        from lorashelf.merge import merge
        from lorashelf.methods import check_settings, get_method, make_config

        def build(key: Hashable) -> Any:
            kind, lib, subset, settings = key
            method = get_method(kind)
            check_settings([method], dict(settings))
            names = self.members(lib, tuple(subset.split(",")) if subset else None)
            factors = [self.factors[f"{lib}/{n}"] for n in names]
            return merge(factors, kind, make_config(method, dict(settings)))

        return self._cached(self._merges, key, build)

    def _ensure_virtual(self, keys: Sequence[Hashable]) -> None:
        """Attach the virtual experts of ``keys`` (evicting the oldest others beyond
        CACHED_VARIANTS, never one of ``keys``)."""
        missing = [k for k in dict.fromkeys(keys) if k not in self.virtual]
        for key in missing:
            self.virtual[key] = self._virtual_experts(key)
        old = [k for k in self.virtual if k not in set(keys)]
        while len(self.virtual) > CACHED_VARIANTS and old:
            del self.virtual[old.pop(0)]
        if missing:
            self._attach()

    def _virtual_experts(self, key: Hashable) -> list[tuple[str, dict[str, Any]]]:
        """A low-rank merge's factors as one column, or a router's rewritten experts."""
        if key[0] == "rewrite":
            experts, _ = self.rewritten(key[1])
            return [(rewrite_column(key[1], n), fs) for n, fs in experts]
        return [(self._virtual_column(key), self._merge(key).modules)]

    def rewritten(self, key: Hashable) -> tuple[list, list[str] | None] | None:
        """The experts (and checksums) router ``key`` routes over if its method rewrites
        them (GenKnowSub); None when it routes over the library's experts as they are."""
        from lorashelf.route import ROUTERS

        def build(key: Hashable) -> Any:
            spec = ROUTERS.get(key[0])
            if spec.experts is None:
                return None
            experts, sums = self.library_experts(key)
            rewritten = spec.experts(router_config(self, key), experts, sums)
            return None if rewritten[0] is experts else rewritten

        return self._cached(self._rewrites, key, build)

    def library_experts(self, key: Hashable) -> tuple[list, list[str]]:
        _, lib, subset, *_ = key
        names = self.members(lib, subset)
        experts = [(n, self.factors[f"{lib}/{n}"]) for n in names]
        return experts, [self.snapshot.experts[lib][n] for n in names]

    def _build_delta(self, key: Hashable) -> dict[str, torch.Tensor]:
        merged = self._merge(key)
        return {m: merged.delta(m).to(self.device, self.dtype) for m in merged.names()}

    def layer(self, module: str) -> Any:
        """The attached mixture layer of ``module`` (its ``members``: bank columns)."""
        return self._handle.layers[module]

    def _build_routers(self, key: Hashable) -> dict[str, tuple[Any, torch.Tensor]]:
        return build_routers(self, key)

    # ------------------------------------------------------------ retrieval
    def retrieve(self, key: Hashable, prompts: Sequence[Sequence[int]]) -> list[RowSpec]:
        """The rows of retrieval router ``key`` for ``prompts`` (lorashelf.serve.retrieval)."""
        from lorashelf.serve.retrieval import build_retriever, rows_for

        retriever = self._cached(self._retrievers, key, lambda k: build_retriever(self, k))
        return rows_for(self, retriever, prompts)

    def expert_label(self, column: int) -> str:
        """The column's name as a user sees it (``LIB/EXPERT`` or a virtual expert)."""
        return next(n for n, i in self.columns.items() if i == column)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
