"""Train PHATGOOSE gates: one sigmoid gate per adapted module, after the expert is trained.

PHATGOOSE (Muqeeth et al. 2024, arXiv 2402.05859, section 3) is post-hoc: once an
expert exists, it is attached alone, frozen with the base, behind a gate per module,
``base(x) + sigmoid(<g, x>) * scale * B A x``, and only the gate vectors ``g`` are
trained, on the expert's own data with the expert's loss. The gates start at zero
(every token half-open) and train briefly; the defaults (100 steps, AdamW at 5e-3,
constant rate after a 6% warm-up, no weight decay) are the authors' gate-training
settings (r-three/phatgoose, ``train_gate.sh`` + ``train.gin``). Here the single
expert is attached with :func:`lorashelf.route.attach` and a :class:`SigmoidGate`
router per module (E = 1), so gradients reach the gates and nothing else; batching,
the target-only loss with the LM head at target positions only, autocast and the
learning-rate schedule are the trainer's (lorashelf.train).
:func:`train_library_gates` does this for every expert of a library that has no
gates yet, on each expert's card tasks, cut with the split seed it was trained with,
through the resumable job runner (:func:`lorashelf.jobs.run_jobs`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorashelf.config import to_dict
from lorashelf.data.task import Example
from lorashelf.errors import LorashelfError
from lorashelf.jobs import Output, pending, run_jobs
from lorashelf.library.factors import LoraFactors
from lorashelf.lora.mixture import attach
from lorashelf.train.config import TrainConfig
from lorashelf.train.trainer import data_fingerprint, optimize, seeded, training_examples

if TYPE_CHECKING:
    from lorashelf.library import Expert, Library


@dataclass(frozen=True)
class GateTrainConfig:
    """How the gates of one expert are trained (checked like a TrainConfig).

    ``max_length`` and ``chat`` shape the examples as the trainer does; the library
    runner takes ``chat`` from each expert's own training config.
    """

    steps: int = 100
    lr: float = 5e-3
    batch_size: int = 8
    max_length: int = 512
    warmup: float = 0.06
    schedule: str = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    chat: bool = False
    bucket: bool = True

    def __post_init__(self) -> None:
        self.as_train_config()  # raises LorashelfError on a bad value

    def as_train_config(self) -> TrainConfig:
        """The same options as a TrainConfig, for the trainer's batching and schedule."""
        return TrainConfig(
            steps=self.steps, lr=self.lr, batch_size=self.batch_size,
            max_length=self.max_length, warmup=self.warmup, schedule=self.schedule,
            weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm,
            seed=self.seed, dtype=self.dtype, chat=self.chat, bucket=self.bucket,
        )  # fmt: skip


class SigmoidGate(nn.Module):
    """``sigmoid(<g, x>)``: the training-time router of one expert at one module (E = 1)."""

    top_k = None  # dense: the mixture layer never gathers

    def __init__(self, d_in: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_in, device=device))  # zero init: sigmoid 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x @ self.weight.to(x.dtype)).unsqueeze(-1)  # [..., 1]


@contextmanager
def gated(
    model: nn.Module,
    factors: Mapping[str, LoraFactors],
    gates: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[dict[str, SigmoidGate]]:
    """``model`` with one expert behind a sigmoid gate per module (zero, or ``gates``)."""
    device = next(model.parameters()).device
    routers = {m: SigmoidGate(f.A.shape[1], device) for m, f in factors.items()}
    if gates is not None:
        with torch.no_grad():
            for m, r in routers.items():
                r.weight.copy_(gates[m].to(device))
    handle = attach(model, [("expert", factors)], routers=routers)
    try:
        yield routers
    finally:
        handle.detach()


@dataclass
class TrainedGates:
    """The gates of one expert (``{module: [d_in]}``, CPU float32) and how training went."""

    gates: dict[str, torch.Tensor]
    loss_curve: list[float]
    seconds: float
    tokens: int
    n_train: int

    def stats(self) -> dict[str, Any]:
        head, tail = self.loss_curve[:10], self.loss_curve[-10:]
        return {
            "steps": len(self.loss_curve),
            "loss_first": sum(head) / len(head),
            "loss_last": sum(tail) / len(tail),
            "loss_curve": self.loss_curve,
            "seconds": round(self.seconds, 3),
            "tokens": self.tokens,
            "n_train": self.n_train,
        }


def train_gates(
    model: nn.Module,
    tokenizer: Any,
    factors: Mapping[str, LoraFactors],
    examples: Sequence[Example],
    config: GateTrainConfig,
    *,
    progress: bool = False,
    desc: str = "gates",
) -> TrainedGates:
    """Train one expert's gates on ``examples`` with the expert and ``model`` frozen.

    ``model`` (a ``*ForCausalLM``) is used in place and restored: its modules,
    ``requires_grad`` flags and train/eval mode are as before.
    """
    if not examples:
        raise LorashelfError("no examples to train PHATGOOSE gates on; the expert's data is empty")
    if not factors:
        raise LorashelfError("the expert adapts no module; there is nothing to gate")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    device = next(model.parameters()).device
    start = time.perf_counter()
    try:
        model.requires_grad_(False)
        with gated(model, factors) as routers, seeded(config.seed, device):
            params = [r.weight for r in routers.values()]
            curve, tokens = _optimize(model, tokenizer, params, examples, config, progress, desc)
            gates = {m: r.weight.detach().float().cpu().clone() for m, r in routers.items()}
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        model.train(was_training)
    seconds = time.perf_counter() - start
    return TrainedGates(gates, curve, seconds, tokens, len(examples))


def _optimize(model, tokenizer, params, examples, config, progress, desc):
    tc = config.as_train_config()
    curve, tokens, _ = optimize(
        model, tokenizer, params, examples, tc, tc.steps, progress=progress, desc=desc
    )
    return curve, sum(tokens)


# ---------------------------------------------------------------- a library's experts
@dataclass
class GateReport:
    """What :func:`train_library_gates` did for one expert."""

    name: str
    status: str  # "trained" or "skipped" (gates already there)
    stats: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def expert_data_config(card: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig carrying how the expert's data was cut and rendered (split seed,
    split, chat template), as its card records them; the trainer's defaults otherwise."""
    recorded = card.get("training") or {}
    kept = {k: recorded[k] for k in ("split_seed", "train_on", "chat") if k in recorded}
    return TrainConfig(**kept)


def expert_examples(
    card: Mapping[str, Any], data: TrainConfig, *, home: Path, max_examples: int | None = None
) -> tuple[list[Example], str]:
    """The examples the expert was trained on (its card's tasks, ``data``'s split), and a
    note, non-empty when they differ from the card's record (data fingerprint)."""
    from lorashelf.data import load_task

    tasks = [load_task(t, home=home, max_examples=max_examples) for t in card["tasks"]]
    train, _ = training_examples(tasks, data)
    recorded = card.get("data_fingerprint")
    note = ""
    if recorded and recorded != data_fingerprint(tasks, data):
        note = "its data differs from what the expert was trained on (fingerprint mismatch)"
    return list(train), note


def train_library_gates(
    library: Library,
    config: GateTrainConfig,
    *,
    home: Path,
    device: torch.device | str,
    dtype: torch.dtype,
    names: Sequence[str] | None = None,
    model: str | None = None,
    overwrite: bool = False,
    max_examples: int | None = None,
    progress: bool = True,
) -> list[GateReport]:
    """Train the gates of every (named) expert that has none; resumable, one by one.

    Each expert's gates are saved as soon as they are trained
    (``LIBRARY/derived/phatgoose/<adapter sha256>.safetensors``), so an interrupted
    run continues where it stopped. ``model`` overrides the library's base model.
    """
    from lorashelf.route.gate_store import GATES_FILE, GateShelf, adapter_checksum, gates_dir

    experts = [library.get(n) for n in (names if names else library.names())]
    if not experts:
        raise LorashelfError(f"library {library.path} has no experts; add some first")
    sums = {e.name: adapter_checksum(e) for e in experts}
    shelf = GateShelf(gates_dir(library.path), sums, overwrite=overwrite, library=library)
    todo = pending(experts, shelf)
    no_tasks = [e.name for e in todo if not e.card.get("tasks")]
    if no_tasks:
        raise LorashelfError(
            f"PHATGOOSE gates train on an expert's own data, but these experts' cards list no "
            f"tasks: {', '.join(no_tasks)}; leave them out with --experts"
        )
    if not todo:
        return [GateReport(e.name, "skipped") for e in experts]
    from lorashelf.models import load_base

    base = load_base(model or library.base_model, home=home, dtype=dtype, device=device)

    def work(e: Expert, out_dir: Path) -> Output[GateReport]:
        from safetensors.torch import save_file

        data = expert_data_config(e.card)
        examples, note = expert_examples(e.card, data, home=home, max_examples=max_examples)
        cfg = dataclasses.replace(config, chat=data.chat)
        factors = e.lora_factors(device=device)
        trained = train_gates(
            base.model, base.tokenizer, factors, examples, cfg, progress=progress, desc=e.name
        )
        meta = {
            "expert": e.name,
            "base_model": library.base_model,
            "config": to_dict(cfg),
            "data": {
                "tasks": list(e.card["tasks"]),
                "split_seed": data.split_seed,
                "train_on": data.train_on,
                "max_examples": max_examples,
            },
            "stats": trained.stats(),
        }
        out_dir.mkdir(parents=True)
        save_file(trained.gates, str(out_dir / GATES_FILE))
        return Output(meta, GateReport(e.name, "trained", trained.stats(), note))

    done = run_jobs(todo, work, shelf, desc="PHATGOOSE gates", progress=progress)
    return [done.get(e.name) or GateReport(e.name, "skipped") for e in experts]
