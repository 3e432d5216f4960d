"""PHATGOOSE: gate training (only the gates move, and they learn), the routing rule
against an independent computation, gate storage, errors, the router inside the
mixture layer, and ``lorashelf gates train|ls`` on a real library."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from lorashelf.config import to_dict
from lorashelf.data.task import Example
from lorashelf.errors import LorashelfError
from lorashelf.route import ROUTERS, MixtureLinear, build_routed_model
from lorashelf.route.gate_store import gates_dir, load_gates, load_library_gates, save_gates
from lorashelf.route.gates import GateTrainConfig, gated, train_gates
from lorashelf.route.phatgoose import PhatgooseConfig, PhatgooseRouter
from lorashelf.train.config import TrainConfig
from lorashelf.train.trainer import mean_target_nll

FAST = GateTrainConfig(steps=6, batch_size=4, lr=5e-2, max_length=48, dtype="fp32", warmup=0.0)
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "rock"]


def echo_examples(n: int = 24, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [
        Example(prompt=f"Say {w}:", target=f" {w}", targets=(f" {w}",))
        for w in (rng.choice(WORDS) for _ in range(n))
    ]


def reference_weights(x: torch.Tensor, gates: torch.Tensor, k: int) -> torch.Tensor:
    """PHATGOOSE routing written out token by token in float64 (no LayerNorm call)."""

    def std(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        mu = v.mean()
        return (v - mu) / torch.sqrt(((v - mu) ** 2).mean() + 1e-5)

    d = gates.shape[1]
    g = torch.stack([std(row) for row in gates])
    flat = x.reshape(-1, d)
    out = torch.zeros(flat.shape[0], gates.shape[0], dtype=torch.float64)
    for t, token in enumerate(flat):
        scores = [float(g[e] @ std(token)) / math.sqrt(d) for e in range(gates.shape[0])]
        chosen = sorted(range(len(scores)), key=lambda e: -scores[e])[:k]
        z = sum(math.exp(scores[e]) for e in chosen)
        for e in chosen:
            out[t, e] = math.exp(scores[e]) / z
    return out.reshape(*x.shape[:-1], gates.shape[0])


def save_random_gates(directory, experts, keep=None, seed=0) -> list[str]:
    """Random gates for the experts (or those named in ``keep``) keyed c0, c1, ..."""
    g = torch.Generator().manual_seed(seed)
    sums = [f"c{i}" for i in range(len(experts))]
    for key, (name, factors) in zip(sums, experts):
        if keep is None or name in keep:
            gates = {m: torch.randn(f.A.shape[1], generator=g) for m, f in factors.items()}
            save_gates(directory, key, gates, {"expert": name})
    return sums


# ---------------------------------------------------------------- gate training
def test_gate_training_moves_only_the_gates(tiny_model, tiny_tokenizer, kit):
    model = copy.deepcopy(tiny_model)
    factors = kit.random_factors(kit.module_shapes(model), seed=1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ab = {m: (f.A.clone(), f.B.clone()) for m, f in factors.items()}
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a flag to restore
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    trained = train_gates(model, tiny_tokenizer, factors, echo_examples(), FAST)

    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(
        torch.equal(f.A, ab[m][0]) and torch.equal(f.B, ab[m][1]) for m, f in factors.items()
    )
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training
    assert not any(isinstance(m, MixtureLinear) for m in model.modules())
    assert set(trained.gates) == set(factors)
    for m, gate in trained.gates.items():
        assert gate.shape == (factors[m].A.shape[1],) and gate.dtype == torch.float32
        assert gate.abs().sum() > 0  # moved from the zero initialisation
    assert len(trained.loss_curve) == FAST.steps


def test_gate_training_lowers_the_loss_of_a_harmful_expert(tiny_model, tiny_tokenizer, kit):
    """A random expert hurts the task; its trained gates recover more than its harm."""
    model = copy.deepcopy(tiny_model)
    factors = kit.random_factors(kit.module_shapes(model), seed=2, size=3.0)
    examples = echo_examples(32)
    cfg = GateTrainConfig(steps=30, batch_size=8, lr=5e-2, max_length=48, dtype="fp32")
    scoring = TrainConfig(max_length=48, dtype="fp32")
    base_loss = mean_target_nll(model, tiny_tokenizer, examples, scoring)
    zero = {m: torch.zeros(f.A.shape[1]) for m, f in factors.items()}
    with gated(model, factors, zero):
        before = mean_target_nll(model, tiny_tokenizer, examples, scoring)
    trained = train_gates(model, tiny_tokenizer, factors, examples, cfg)
    with gated(model, factors, trained.gates):
        after = mean_target_nll(model, tiny_tokenizer, examples, scoring)
    assert before > base_loss + 0.05  # the expert hurts at sigmoid(0) = 0.5
    assert after < before - 0.1
    assert trained.stats()["loss_last"] < trained.stats()["loss_first"]


# ---------------------------------------------------------------- routing rule
def test_routing_matches_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    gates = torch.randn(5, 64, generator=g) * 0.3 + torch.linspace(-1, 1, 64)
    x = torch.randn(3, 7, 64, generator=g) * 2.0 + 0.7
    router = PhatgooseRouter(gates, top_k=2)
    w = router(x)
    ref = reference_weights(x, gates, 2)
    torch.testing.assert_close(w.double(), ref, atol=1e-5, rtol=1e-5)
    assert ((w > 0).sum(-1) == 2).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 7))
    # standardisation: an affine change of a token (or a gate) changes nothing
    torch.testing.assert_close(router(3.0 * x - 2.0), w, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(PhatgooseRouter(5 * gates + 1, 2)(x), w, atol=1e-5, rtol=1e-4)


def test_top_k_of_all_experts_with_equal_gates_is_uniform():
    gate = torch.randn(32, generator=torch.Generator().manual_seed(1))
    router = PhatgooseRouter(gate.repeat(4, 1), top_k=4)
    w = router(torch.randn(2, 5, 32))
    torch.testing.assert_close(w, torch.full((2, 5, 4), 0.25))


def test_top_k_is_capped_by_the_experts_and_config_is_checked():
    assert PhatgooseRouter(torch.randn(3, 8), top_k=5).top_k == 3
    assert ROUTERS.get("phatgoose").config_cls is PhatgooseConfig
    with pytest.raises(LorashelfError, match="top_k"):
        PhatgooseConfig(top_k=0)
    with pytest.raises(LorashelfError, match="mix"):
        PhatgooseConfig(mix="both")


# ---------------------------------------------------------------- storage and errors
def test_storage_round_trip_and_corruption(tmp_path):
    gates = {"model.layers.0.self_attn.q_proj": torch.randn(64), "a.b": torch.randn(32)}
    meta = {"expert": "e0", "config": to_dict(FAST), "stats": {"steps": 6, "loss_last": 1.5}}
    key = "ab" * 32
    path = save_gates(tmp_path, key, gates, meta)
    assert path == tmp_path / f"{key}.safetensors" and not list(tmp_path.glob(".*"))
    stored = load_gates(tmp_path, key, expert="e0")
    assert stored.gates.keys() == gates.keys()
    assert all(torch.equal(stored.gates[m], g) for m, g in gates.items())
    assert stored.meta["config"] == to_dict(FAST) and stored.meta["stats"]["steps"] == 6
    assert stored.meta["adapter_sha256"] == key
    # a file copied to another adapter's key is refused
    other = tmp_path / f"{'cd' * 32}.safetensors"
    other.write_bytes(path.read_bytes())
    with pytest.raises(LorashelfError, match="another adapter"):
        load_gates(tmp_path, "cd" * 32, expert="e1")
    # a flipped byte in the tensor data is caught by the recorded sha256
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LorashelfError, match="sha256.*lorashelf gates train"):
        load_gates(tmp_path, key, expert="e0")


def test_missing_gates_name_the_experts_and_the_command(tmp_path, model, experts):
    d = gates_dir(tmp_path / "lib")
    sums = save_random_gates(d, experts, keep={"e0", "e1"})
    cfg = PhatgooseConfig(gates_dir=str(d))
    with pytest.raises(LorashelfError) as err:
        build_routed_model(model, experts, "phatgoose", cfg, checksums=sums)
    msg = str(err.value)
    assert "e2, e3" in msg and "e0" not in msg
    assert f"lorashelf gates train {tmp_path / 'lib'} --experts e2,e3" in msg
    assert not any(isinstance(m, MixtureLinear) for m in model.modules())  # left untouched
    with pytest.raises(LorashelfError, match="gates_dir"):
        build_routed_model(model, experts, "phatgoose", PhatgooseConfig(), checksums=sums)
    with pytest.raises(LorashelfError, match="checksums"):
        build_routed_model(model, experts, "phatgoose", cfg)


def test_gates_of_another_adapter_are_refused(tmp_path, model, experts, kit):
    sums = save_random_gates(tmp_path, experts)
    extra = {"model.layers.0.self_attn.k_proj": kit.random_factors({"x": (32, 64)})["x"]}
    changed = [(experts[0][0], {**experts[0][1], **extra}), *experts[1:]]
    with pytest.raises(LorashelfError, match="e0.*no gate for model.layers.0.self_attn.k_proj"):
        build_routed_model(
            model, changed, "phatgoose", PhatgooseConfig(gates_dir=str(tmp_path)), checksums=sums
        )


# ---------------------------------------------------------------- inside the mixture layer
def test_router_in_the_mixture_layer_forward_and_generate(tmp_path, model, experts, ids):
    sums = save_random_gates(tmp_path, experts)
    base_logits = model(input_ids=ids).logits
    cfg = PhatgooseConfig(top_k=2, gates_dir=str(tmp_path))
    routed = build_routed_model(model, experts, "phatgoose", cfg, checksums=sums)
    name = "model.layers.1.self_attn.v_proj"
    layer = routed.handle.layers[name]
    seen = {}
    hook = layer.register_forward_hook(
        lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach())
    )
    with routed.record() as stats:
        logits = routed(input_ids=ids).logits
    hook.remove()

    # the layer's output, recomputed from the stored gates and the plain factors
    x = seen["x"]
    gates = torch.stack([load_gates(tmp_path, s).gates[name] for s in sums])
    w = reference_weights(x, gates, 2).float()
    expected = layer.base_layer(x)
    for e, (_, factors) in enumerate(experts):
        f = factors[name]
        expected = expected + w[..., e : e + 1] * f.scale * (x @ f.A.T @ f.B.T)
    torch.testing.assert_close(seen["y"], expected, atol=1e-5, rtol=1e-4)

    assert torch.isfinite(logits).all() and not torch.allclose(logits, base_logits)
    assert sum(stats.overall()) == pytest.approx(1.0, abs=1e-5)
    out = routed.generate(input_ids=ids[:, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (3, 9)
    assert routed.describe()["config"]["top_k"] == 2
    routed.detach()
    torch.testing.assert_close(model(input_ids=ids).logits, base_logits)


# ---------------------------------------------------------------- library + CLI
@pytest.fixture
def library(tmp_path, tiny_model_dir, tiny_model, kit):
    """A library of two experts (q_proj, v_proj) on the tiny model, each with a jsonl task."""
    from lorashelf.library import Library

    lib = Library.open(tmp_path / "lib", create=True, base_model=str(tiny_model_dir))
    shapes = kit.module_shapes(tiny_model)
    for i, name in enumerate(["alpha", "beta"]):
        task = tmp_path / f"{name}.jsonl"
        rows = [{"input": f"Say {w}:", "target": w} for w in WORDS[i::2] * 3]
        task.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = kit.write_adapter(
            tiny_model, tmp_path / name, kit.random_factors(shapes, seed=i),
            base_id=str(tiny_model_dir),
        )  # fmt: skip
        card = {"tasks": [f"jsonl:{task}"], "source": "train", "training": {"split_seed": i + 3}}
        lib.add(out, name=name, card=card)
    return lib


def hand_routed_logits(base, experts, gates, ids, k: int) -> torch.Tensor:
    """The base model's logits with every gated module's output plus
    ``sum_e w_e scale_e B_e A_e x``, ``w`` from :func:`reference_weights`: forward hooks
    on a copy of the plain model, no mixture layer."""
    model = copy.deepcopy(base)

    def hook(name):
        def add_experts(module, args, out):
            x = args[0]
            w = reference_weights(x, gates[name], k).to(out.dtype)
            for e, (_, factors) in enumerate(experts):
                f = factors[name]
                out = out + w[..., e : e + 1] * f.scale * (x @ f.A.T @ f.B.T)
            return out

        return add_experts

    for name, module in model.named_modules():
        if name in gates:
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        return model(input_ids=ids).logits


def run_cli(monkeypatch, tmp_path, *argv: str) -> int:
    import lorashelf.cli as cli

    if "gates" not in cli.VERB_MODULES:  # until the lead lists the verb module
        monkeypatch.setattr(cli, "VERB_MODULES", (*cli.VERB_MODULES, "gates"))
    return cli.main(["--home", str(tmp_path / "home"), "--device", "cpu", *argv])


def test_cli_trains_missing_gates_resumably(library, monkeypatch, tmp_path, capsys, tiny_model):
    from lorashelf.library import Library

    opts = ["--steps", "3", "--batch-size", "4", "--max-length", "48"]
    opts += ["--dtype", "fp32", "--compute-dtype", "fp32"]
    lib_dir = str(library.path)
    assert (
        run_cli(monkeypatch, tmp_path, "gates", "train", lib_dir, "--experts", "alpha", *opts) == 0
    )
    with pytest.raises(LorashelfError, match="beta.*lorashelf gates train"):
        load_library_gates(library, ["alpha", "beta"])

    assert run_cli(monkeypatch, tmp_path, "gates", "train", lib_dir, *opts) == 0
    out = capsys.readouterr().out
    assert "trained gates for 1 expert(s), 1 already had them" in out
    files = sorted(gates_dir(library.path).glob("*.safetensors"))
    expected = sorted(library.get(n).files["adapter_model.safetensors"] for n in ("alpha", "beta"))
    assert [f.stem for f in files] == expected
    stamps = [f.stat().st_mtime_ns for f in files]
    assert Library.open(library.path).verify() == []

    assert run_cli(monkeypatch, tmp_path, "gates", "train", lib_dir, *opts) == 0
    assert "trained gates for 0 expert(s), 2 already had them" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in files] == stamps

    # trained on the expert's train split, cut with the split seed its card records
    from lorashelf.data import load_task

    beta = library.get("beta")
    stored = load_gates(gates_dir(library.path), beta.files["adapter_model.safetensors"])
    assert stored.meta["config"]["steps"] == 3 and len(stored.meta["stats"]["loss_curve"]) == 3
    assert stored.meta["data"]["split_seed"] == 4 and stored.meta["expert"] == "beta"
    split = load_task(beta.tasks[0], home=tmp_path).splits(seed=4)
    assert stored.meta["stats"]["n_train"] == len(split.train) < len(split.train + split.test)
    assert run_cli(monkeypatch, tmp_path, "gates", "ls", lib_dir) == 0
    assert "2 of 2 experts have gates" in capsys.readouterr().out

    # the stored gates route the library's experts: the routed logits are the hand
    # computation of the top-2 mixture with the gates the CLI trained
    model = copy.deepcopy(tiny_model)
    names = library.names()
    experts = [(n, library.get(n).lora_factors()) for n in names]
    sums = [library.get(n).files["adapter_model.safetensors"] for n in names]
    trained = [load_gates(gates_dir(library.path), s).gates for s in sums]
    gates = {m: torch.stack([g[m] for g in trained]) for m in experts[0][1]}
    ids = torch.tensor([[5, 6, 7, 8]])
    cfg = PhatgooseConfig(gates_dir=str(gates_dir(library.path)))
    with build_routed_model(model, experts, "phatgoose", cfg, checksums=sums) as routed:
        with torch.no_grad():
            logits = routed(input_ids=ids).logits
    want = hand_routed_logits(tiny_model, experts, gates, ids, cfg.top_k)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert (logits - tiny_model(input_ids=ids).logits).abs().max() > 1e-3


def test_cli_refuses_experts_without_tasks(library, monkeypatch, tmp_path, capsys, kit, tiny_model):
    src = kit.write_adapter(tiny_model, tmp_path / "imported", seed=5, base_id=library.base_model)
    library.add(src, name="imported")
    rc = run_cli(monkeypatch, tmp_path, "gates", "train", str(library.path), "--steps", "1")
    assert rc == 2
    assert "list no tasks: imported" in capsys.readouterr().err
    assert not gates_dir(library.path).exists()


def test_expert_examples_follow_the_card_split(library, tmp_path):
    from lorashelf.data import load_task
    from lorashelf.route.gates import expert_data_config, expert_examples

    card = library.get("beta").card
    data = expert_data_config(card)
    examples, note = expert_examples(card, data, home=tmp_path)
    task = load_task(card["tasks"][0], home=tmp_path)
    assert data.split_seed == 4 and data.train_on == "train"
    assert examples == list(task.splits(4).train) != list(task.splits(0).train)
    assert note == ""  # the card records no fingerprint to compare with
    _, note = expert_examples({**card, "data_fingerprint": "0" * 16}, data, home=tmp_path)
    assert "fingerprint" in note
