"""Fixtures for cluster tests: synthetic LoRA experts with a planted cluster structure.

Every expert shares one "initialisation" (as experts trained from one init seed do),
plus its family's random direction, plus its own noise; a family is a planted cluster.
No model, no training: factors are built directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch


@dataclass
class Factors:
    """Stand-in for lorashelf.library.factors.LoraFactors (only A and B are read)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 2.0


MODULES = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
)


@dataclass
class Planted:
    names: list[str]
    factors: dict[str, dict[str, Factors]]
    truth: list[int]
    cards: dict[str, dict]

    def load(self, name: str) -> dict[str, Factors]:
        return self.factors[name]

    def vectors(self) -> torch.Tensor:
        """Dense [n, D] flattened vectors in sorted-module order, A then B (the reference)."""
        rows = []
        for n in self.names:
            f = self.factors[n]
            rows.append(torch.cat([t.reshape(-1) for m in sorted(f) for t in (f[m].A, f[m].B)]))
        return torch.stack(rows)


def make_planted(
    families: int = 3,
    per_family: int = 5,
    *,
    r: int = 4,
    d: int = 16,
    noise: float = 0.5,
    signal: float = 1.0,
    seed: int = 0,
    shuffle: bool = True,
) -> Planted:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    shapes = {m: ((r, d), (d if "q_proj" in m else d // 2, r)) for m in MODULES}
    init = {m: (rand(*a), torch.zeros(*b)) for m, (a, b) in shapes.items()}
    direction = [{m: (rand(*a), rand(*b)) for m, (a, b) in shapes.items()} for _ in range(families)]
    truth = [f for f in range(families) for _ in range(per_family)]
    if shuffle:
        perm = torch.randperm(len(truth), generator=g).tolist()
        truth = [truth[i] for i in perm]
    names, factors, cards = [], {}, {}
    for i, fam in enumerate(truth):
        name = f"expert_{i:02d}"
        names.append(name)
        factors[name] = {
            m: Factors(
                init[m][0] + 0.1 * signal * direction[fam][m][0] + 0.1 * noise * rand(*a),
                init[m][1] + signal * direction[fam][m][1] + noise * rand(*b),
            )
            for m, (a, b) in shapes.items()
        }
        cards[name] = {"tasks": [f"jsonl:family{fam}_task{i}.jsonl"], "init_seed": 0}
    return Planted(names, factors, truth, cards)


@pytest.fixture
def planted() -> Planted:
    return make_planted()


@pytest.fixture
def make_experts():
    """The factory itself, for tests that need other sizes, noise or seeds."""
    return make_planted


class FakeExpert:
    def __init__(self, name: str, card: dict, factors: dict, path=None) -> None:
        self.name, self.card, self._factors, self.path = name, card, factors, path

    def lora_factors(self) -> dict:
        return self._factors


class FakeLibrary:
    """The planned Library interface (names/get/add/path) over a dict, for logic tests."""

    def __init__(self, path, experts: dict[str, FakeExpert] | None = None) -> None:
        self.path = path
        self.experts = dict(experts or {})
        self.added: list[str] = []

    def names(self) -> list[str]:
        return sorted(self.experts)

    def get(self, name: str) -> FakeExpert:
        return self.experts[name]

    def add(self, adapter_dir, name: str, card: dict) -> None:
        from safetensors.torch import load_file

        sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
        assert (adapter_dir / "adapter_config.json").exists() and sd
        self.experts[name] = FakeExpert(name, card, {}, adapter_dir)
        self.added.append(name)


@pytest.fixture
def fake_library(planted, tmp_path) -> FakeLibrary:
    experts = {n: FakeExpert(n, planted.cards[n], planted.factors[n]) for n in planted.names}
    return FakeLibrary(tmp_path / "lib", experts)


@pytest.fixture
def peft_library(tmp_path, tiny_model, tiny_tokenizer):
    """A real Library of 9 PEFT experts of the tiny Llama in 3 planted families.

    Experts share LoRA's A initialisation (one init seed); each family adds its own
    direction to A and B, each expert its own noise. Returns (library dir, truth).
    """
    import copy

    from peft import LoraConfig, get_peft_model

    from lorashelf.library import Library

    tiny_model.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    lib = Library.open(tmp_path / "lib", create=True, base_model=str(tmp_path / "base"))
    g = torch.Generator().manual_seed(0)
    fam_dirs: list[dict[str, torch.Tensor]] = [{} for _ in range(3)]
    truth = {}
    for i in range(9):
        fam = i % 3
        torch.manual_seed(0)  # the shared init seed
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(copy.deepcopy(tiny_model), cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    d = fam_dirs[fam].setdefault(name, torch.randn(p.shape, generator=g))
                    p.add_(0.1 * d + 0.03 * torch.randn(p.shape, generator=g))
        model.save_pretrained(tmp_path / "adapters" / f"e{i}")
        name = f"expert_{i}"
        task = tmp_path / "tasks" / f"fam{fam}_{i}.jsonl"
        task.parent.mkdir(exist_ok=True)
        rows = [{"input": f"{'abc'[fam]} {i} {j} =", "target": f" {'xyz'[fam]}"} for j in range(12)]
        task.write_text("".join(json.dumps(r) + "\n" for r in rows))
        lib.add(
            tmp_path / "adapters" / f"e{i}",
            name=name,
            card={
                "tasks": [f"jsonl:{task}"],
                "init_seed": 0,
                "base_model": str(tmp_path / "base"),
            },
        )
        truth[name] = fam
    return tmp_path / "lib", truth
