"""Fixtures for cluster tests: LoRA experts with a planted cluster structure.

Every expert shares one "initialisation" (as experts trained from one init seed do),
plus its family's random direction, plus its own noise; a family is a planted cluster.
No training: factors are built directly. ``planted`` holds them in memory;
``planted_library`` is a real :class:`lorashelf.library.Library` of the same experts as
PEFT adapters of a tiny Llama of their shapes (hidden 16), and ``peft_library`` one of
nine experts of the shared tiny model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from lorashelf.library import Library
from lorashelf.lora import LoraFactors

MODULES = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
)


@dataclass
class Planted:
    names: list[str]
    factors: dict[str, dict[str, LoraFactors]]
    truth: list[int]
    cards: dict[str, dict]

    def load(self, name: str) -> dict[str, LoraFactors]:
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
            m: LoraFactors(
                init[m][0] + 0.1 * signal * direction[fam][m][0] + 0.1 * noise * rand(*a),
                init[m][1] + signal * direction[fam][m][1] + noise * rand(*b),
                2.0,
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


@pytest.fixture(scope="session")
def planted_base(tmp_path_factory, tiny_tokenizer, kit):
    """A tiny Llama whose q_proj/v_proj shapes are the planted experts' (hidden 16),
    saved as a local model directory: ``(model, path)``."""
    model = kit.make_model(len(tiny_tokenizer), hidden=16)
    return model, kit.save_model(model, tiny_tokenizer, tmp_path_factory.mktemp("planted-base"))


@pytest.fixture
def new_library(planted_base):
    """``new_library(path)``: an empty Library for the planted experts' base."""
    return lambda path: Library.open(path, create=True, base_model=str(planted_base[1]))


@pytest.fixture
def make_planted_library(planted, planted_base, new_library, tmp_path, kit):
    """``make_planted_library(path, cards=None, factors=None)``: a Library of the
    ``planted`` experts written as PEFT adapters; ``cards``/``factors`` replace those of
    the experts they name (an expert on other modules is added with ``allow_mixed``)."""
    model, base_dir = planted_base

    def make(path=None, *, cards=None, factors=None):
        path = path or tmp_path / "lib"
        lib = new_library(path)
        for name in planted.names:
            f = (factors or {}).get(name, planted.factors[name])
            mixed = sorted(f) != sorted(MODULES)
            targets = sorted(f) if mixed else ["q_proj", "v_proj"]
            src = kit.write_adapter(
                model, path.parent / f"{path.name}-src" / name, f,
                base_id=str(base_dir), target_modules=targets,
            )  # fmt: skip
            card = (cards or {}).get(name, planted.cards[name])
            lib.add(src, name=name, card=card, allow_mixed=mixed)
        return lib

    return make


@pytest.fixture
def planted_library(make_planted_library) -> Library:
    """The ``planted`` experts in a real Library in tmp_path."""
    return make_planted_library()


@pytest.fixture
def peft_library(tmp_path, tiny_model, tiny_model_dir, kit):
    """A real Library of 9 PEFT experts of the tiny Llama in 3 planted families.

    Experts share LoRA's A initialisation (one init seed, B starts at zero); each
    family adds its own direction to A and B, each expert its own noise. Returns
    (library dir, truth).
    """
    base = str(tiny_model_dir)
    lib = Library.open(tmp_path / "lib", create=True, base_model=base)
    init = kit.random_factors(kit.module_shapes(tiny_model), seed=0)  # the shared init seed
    g = torch.Generator().manual_seed(0)

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=g)

    fam_dirs: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(3)]
    truth = {}
    for i in range(9):
        fam = i % 3
        factors = {}
        for m, f in init.items():
            dA, dB = fam_dirs[fam].setdefault(m, (randn(f.A), randn(f.B)))
            A = f.A + 0.1 * dA + 0.03 * randn(f.A)
            B = 0.1 * dB + 0.03 * randn(f.B)
            factors[m] = LoraFactors(A, B, f.scale)
        src = kit.write_adapter(tiny_model, tmp_path / "adapters" / f"e{i}", factors, base_id=base)
        name = f"expert_{i}"
        task = tmp_path / "tasks" / f"fam{fam}_{i}.jsonl"
        task.parent.mkdir(exist_ok=True)
        rows = [{"input": f"{'abc'[fam]} {i} {j} =", "target": f" {'xyz'[fam]}"} for j in range(12)]
        task.write_text("".join(json.dumps(r) + "\n" for r in rows))
        card = {"tasks": [f"jsonl:{task}"], "init_seed": 0, "base_model": base}
        lib.add(src, name=name, card=card)
        truth[name] = fam
    return tmp_path / "lib", truth
