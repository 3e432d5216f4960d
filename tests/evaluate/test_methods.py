"""Every reuse method builds, evaluates and restores the base model; numeric checks of
the single-expert and oracle paths against PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from lorashelf.cli import main
from lorashelf.data.task import Example, Task
from lorashelf.evaluate.runner import EvalConfig, evaluate
from lorashelf.methods import MethodContext, method_names, prepare

EXPERTS = {"alpha": ["t:alpha"], "beta": ["t:beta"], "gamma": ["t:gamma"]}


def toy_task(tid: str) -> Task:
    exs = tuple(
        Example(
            prompt=f"Q: item {i} of {tid}?\nA:", target=" yes", options=(" yes", " no"), answer=0
        )
        for i in range(6)
    )
    return Task(id=tid, examples=exs, kind="mc")


def logits(model, tok):
    ids = tok(["Q: item 1?\nA: yes"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def add_random_gates(lib) -> None:
    """PHATGOOSE needs trained gates; random ones exercise the same code path."""
    from lorashelf.route.gate_store import adapter_checksum, gates_dir, save_gates

    g = torch.Generator().manual_seed(0)
    for name in lib.names():
        exp = lib.get(name)
        gates = {m: torch.randn(f.A.shape[1], generator=g) for m, f in exp.lora_factors().items()}
        save_gates(gates_dir(lib.path), adapter_checksum(exp), gates, {"test": True})


SPECS = {"expert": ["expert:beta"], "best-expert": ["best-expert:test", "best-expert:shots"]}


@pytest.mark.parametrize("method", [s for m in method_names() for s in SPECS.get(m, [m])])
def test_every_method_evaluates_and_restores(method, tiny_library, tiny_model, tiny_tokenizer,
                                            kit):  # fmt: skip
    import copy

    lib = tiny_library(EXPERTS)
    add_random_gates(lib)
    kit.add_random_retrieval_embeddings(lib, tiny_model)
    model = copy.deepcopy(tiny_model)
    before = logits(model, tiny_tokenizer)
    cfg = EvalConfig(split="all", batch_size=4)
    ctx = MethodContext(lib, oracle={"t:new": "t:gamma"}, tokenizer=tiny_tokenizer, evaluation=cfg)
    prepared = prepare(method, model, ctx, {"top_k": 2, "n_shots": 2})
    try:
        during = logits(model, tiny_tokenizer)
        res = evaluate(model, tiny_tokenizer, [toy_task("t:new")], cfg, method=method,
                       on_task=prepared.on_task, show_progress=False)  # fmt: skip
    finally:
        prepared.close()
    assert res.tasks["t:new"].n == 6
    if method not in ("base", "oracle") and not method.startswith("best-expert"):
        # the oracle and the best expert pick their expert per task
        assert not torch.allclose(before, during), f"{method} did not change the model"
    assert torch.equal(before, logits(model, tiny_tokenizer)), f"{method} did not restore the base"


def test_expert_equals_peft_from_pretrained(tiny_library, tiny_model, tiny_tokenizer):
    import copy

    from peft import PeftModel

    lib = tiny_library(EXPERTS)
    model = copy.deepcopy(tiny_model)
    prepared = prepare("expert:beta", model, MethodContext(lib))
    ours = logits(model, tiny_tokenizer)
    prepared.close()
    peft = PeftModel.from_pretrained(copy.deepcopy(tiny_model), str(lib.get("beta").path))
    assert torch.allclose(ours, logits(peft, tiny_tokenizer), atol=1e-5)


def test_oracle_switches_expert_per_task(tiny_library, tiny_model, tiny_tokenizer):
    import copy

    from lorashelf.methods import oracle_expert

    lib = tiny_library(EXPERTS)
    names = lib.names()
    assert oracle_expert(lib, names, "t:beta", {}) == "beta"
    assert oracle_expert(lib, names, "t:new", {"t:new": "t:alpha"}) == "alpha"
    from lorashelf.errors import LorashelfError

    with pytest.raises(LorashelfError, match="--oracle-map"):
        oracle_expert(lib, names, "t:unknown", {})
    # the oracle's score on a task equals that expert's score
    model = copy.deepcopy(tiny_model)
    cfg = EvalConfig(split="all")
    prep = prepare("oracle", model, MethodContext(lib))
    r_oracle = evaluate(
        model, tiny_tokenizer, [toy_task("t:gamma")], cfg, on_task=prep.on_task, show_progress=False
    )
    prep.close()
    prep = prepare("expert:gamma", model, MethodContext(lib))
    r_expert = evaluate(model, tiny_tokenizer, [toy_task("t:gamma")], cfg, show_progress=False)
    prep.close()
    assert r_oracle.tasks["t:gamma"].nll == pytest.approx(r_expert.tasks["t:gamma"].nll, abs=1e-5)


def test_cli_eval_library_methods_and_routing_report(
    tiny_library, tiny_model_dir, tmp_path, capsys
):
    lib = tiny_library(EXPERTS)
    jl = tmp_path / "t.jsonl"
    jl.write_text(
        "".join(
            json.dumps({"input": f"Q{i}:", "options": [" a", " b"], "answer": i % 2}) + "\n"
            for i in range(8)
        )
    )
    out = tmp_path / "res.json"
    report = tmp_path / "routing.json"
    argv = ["--home", str(tmp_path), "eval", "--library", str(lib.path), "--dtype", "fp32",
            "--tasks", f"jsonl:{jl}", "--split", "all", "--method", "base,arrow,uniform",
            "--top-k", "2", "--json", str(out), "--routing-report", str(report)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert [m["method"] for m in data["methods"]] == ["base", "arrow", "uniform"]
    rep = json.loads(report.read_text())
    assert report.with_suffix(".png").stat().st_size > 1000
    weights = next(iter(rep["tasks"].values()))["overall"]
    assert len(weights) == 3 and sum(weights) == pytest.approx(1.0, abs=1e-4)


def test_phatgoose_without_gates_names_the_fix(tiny_library, tiny_model):
    import copy

    from lorashelf.errors import LorashelfError

    lib = tiny_library(EXPERTS)
    with pytest.raises(LorashelfError, match="lorashelf gates train"):
        prepare("phatgoose", copy.deepcopy(tiny_model), MethodContext(lib))


def test_cli_eval_errors(tiny_library, tmp_path, capsys):
    lib = tiny_library(EXPERTS)
    base = [
        "--home",
        str(tmp_path),
        "eval",
        "--library",
        str(lib.path),
        "--tasks",
        "jsonl:/nope.jsonl",
    ]
    assert main(base + ["--method", "arow"]) == 2
    assert (
        main(base[:-2] + ["--tasks", "bigbench:x", "--method", "arrow", "--experts", "alpha,zeta"])
        == 2
    )
    err = capsys.readouterr().err
    assert "did you mean" in err


def test_best_expert_test_is_the_lowest_expert_nll_and_shots_is_fair(
    tiny_library, tiny_model, tiny_tokenizer
):
    """best-expert:test scores like the expert with the lowest eval NLL on those very
    examples; best-expert:shots chooses on train shots (the test examples it never sees)."""
    import copy

    from lorashelf.compose.shots import draw_shots

    lib = tiny_library(EXPERTS)
    model = copy.deepcopy(tiny_model)
    task = Task(id="t:mix", kind="mc", examples=tuple(
        Example(prompt=f"Q: is {i} odd?\nA:", target=[" no", " yes"][i % 2],
                options=(" no", " yes"), answer=i % 2)
        for i in range(20)
    ))  # fmt: skip
    cfg = EvalConfig(split="test", seed=1)
    per_expert = {}
    for n in lib.names():
        prep = prepare(f"expert:{n}", model, MethodContext(lib))
        per_expert[n] = evaluate(model, tiny_tokenizer, [task], cfg, show_progress=False)
        prep.close()
    ctx = MethodContext(lib, tokenizer=tiny_tokenizer, evaluation=cfg)
    got = {}
    for sel in ("test", "shots"):
        prep = prepare(f"best-expert:{sel}", model, ctx)
        got[sel] = evaluate(model, tiny_tokenizer, [task], cfg, on_task=prep.on_task,
                            show_progress=False)  # fmt: skip
        got[sel].meta.update(prep.info)
        prep.close()
    nll = {n: r.tasks["t:mix"].nll for n, r in per_expert.items()}
    best = min(nll, key=nll.get)
    assert len(set(nll.values())) == 3  # the experts differ
    assert got["test"].meta["best_expert"] == {"t:mix": best}
    assert "upper bound" in got["test"].meta["selection"]
    assert got["test"].tasks["t:mix"].nll == pytest.approx(nll[best], abs=1e-5)
    chosen_nll = got["test"].meta["selection_nll"]["t:mix"]
    for n in nll:  # the selection's NLL is eval's NLL of that expert
        assert chosen_nll[n] == pytest.approx(nll[n], abs=1e-4)
    # :shots: chosen on the 5 train shots fewshot would draw with seed 1
    shots = draw_shots(task, 5, seed=1, split_seed=1)
    assert not set(shots) & set(task.splits(seed=1).test)
    from lorashelf.best_expert import expert_nlls

    on_shots = expert_nlls(model, tiny_tokenizer, MethodContext(lib).factors(model, lib.names()),
                           shots)  # fmt: skip
    want = lib.names()[min(range(3), key=lambda i: on_shots[i])]
    assert got["shots"].meta["best_expert"] == {"t:mix": want}
    assert got["shots"].tasks["t:mix"].nll == pytest.approx(nll[want], abs=1e-5)


def test_best_expert_needs_its_selection(tiny_library, tiny_model):
    import copy

    from lorashelf.errors import LorashelfError

    lib = tiny_library(EXPERTS)
    with pytest.raises(LorashelfError, match="best-expert:test"):
        prepare("best-expert", copy.deepcopy(tiny_model), MethodContext(lib))
