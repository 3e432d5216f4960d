"""The corruption matrix: each kind of library file x flipped byte / truncated / garbage /
missing, and what ``library verify``, ``library ls``, an Arrow ``eval`` and ``serve`` then do.

The rule every cell checks: nothing prints a traceback; ``verify`` exits 1 naming the
damage (0 only when the damage is harmless, and then eval's scores are the intact
ones); ``ls`` lists the experts or exits 2 with one line; ``eval`` gives exactly the
intact library's scores or exits 2 with one line; never a wrong score. Damage that
lorashelf can read around (the index, the Arrow cache) never stops eval. The server
(in process, beside an intact library) starts unless the library itself is unreadable
(then ``lorashelf serve`` exits 2 with one line); every model it lists answers exactly
as over the intact library (without the damaged expert, when it left that out) or
with an OpenAI-shaped error, never NaN; and the intact library keeps answering.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from lorashelf.library import Library

FILES = {
    "library.json": "library.json",
    "index": "index.sqlite",
    "card": "experts/e0/card.json",
    "config": "experts/e0/adapter_config.json",
    "weights": "experts/e0/adapter_model.safetensors",
    "arrow-cache": "cache/arrow_prototypes.safetensors",
    "gates": "derived/phatgoose/*.safetensors",
}
DAMAGE = ("flip", "truncate", "garbage", "missing")
READ_AROUND = {"index", "arrow-cache", "gates"}  # eval --method arrow still scores right
ALWAYS_FOUND = {"card", "config", "weights", "arrow-cache", "gates"}  # verify exits 1
_INTACT: dict[str, dict] = {}


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes([data[mid] ^ 0x40]) + data[mid + 1 :])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x8f garbage \x00" * 64)
    else:
        path.unlink()


@pytest.fixture(scope="module")
def intact(tmp_path_factory, tiny_model_dir, tiny_model, adapter_writer):
    """A library with two experts, PHATGOOSE gates for e0 and an Arrow cache; a task."""
    import torch

    from lorashelf.library import Library
    from lorashelf.route.gate_store import adapter_checksum, gates_dir, save_gates

    root = tmp_path_factory.mktemp("corruption")
    shapes = {
        n: (m.in_features, m.out_features)
        for n, m in tiny_model.named_modules()
        if n.endswith(("q_proj", "v_proj"))
    }
    lib = Library.open(root / "lib", create=True, base_model=str(tiny_model_dir))
    for i in range(2):
        src = adapter_writer(root / f"src{i}", shapes, seed=i, base=str(tiny_model_dir))
        lib.add(src, f"e{i}", {"tasks": [f"t{i}"]})
    gates = {m: torch.randn(d_in) for m, (d_in, _) in shapes.items()}
    save_gates(gates_dir(lib.path), adapter_checksum(lib.get("e0")), gates, {"steps": 1})
    lib.close()
    task = root / "mc.jsonl"
    rows = [{"input": f"Q{i}:", "options": [" a", " b"], "answer": i % 2} for i in range(4)]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "lib", f"jsonl:{task}"


def arrow_eval(run, lib, task, out):
    """(exit code, {task: (accuracy, nll)} or None) of an Arrow eval over ``lib``."""
    argv = ["eval", "--library", lib, "--method", "arrow", "--tasks", task, "--split", "all"]
    rc, _, _ = run(*argv, "--dtype", "fp32", "--json", out)
    if rc != 0:
        return rc, None
    data = json.loads(out.read_text())
    return rc, {t: (r["accuracy"], r["nll"]) for t, r in data["tasks"].items()}


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("kind", list(FILES))
def test_corruption_matrix(kind, how, intact, tmp_path, capsys, cli_runner):
    def run(*argv):
        return cli_runner(capsys, tmp_path / "home", *argv)

    src, task = intact
    if not _INTACT:  # the intact scores, and the Arrow cache the cells damage
        rc, scores = arrow_eval(run, src, task, tmp_path / "intact.json")
        assert rc == 0 and run("library", "verify", src)[0] == 0
        _INTACT["scores"] = scores
    lib = tmp_path / "lib"
    shutil.copytree(src, lib)
    Library.open(lib).repair()  # a copy has new inodes: index them, as its first write does
    (target,) = lib.glob(FILES[kind])
    damage(target, how)

    rc_verify, out, _ = run("library", "verify", lib)
    rc_ls, _, _ = run("library", "ls", lib)
    rc_eval, scores = arrow_eval(run, lib, task, tmp_path / "res.json")

    assert rc_verify in (0, 1, 2) and rc_ls in (0, 2) and rc_eval in (0, 2)
    derived_missing = kind in ("arrow-cache", "gates") and how == "missing"  # not trained yet
    if (kind in ALWAYS_FOUND and not derived_missing) or (kind == "index" and how != "flip"):
        assert rc_verify == 1 and "problem" in out, out
    if kind != "library.json":
        assert rc_ls == 0
    if kind in READ_AROUND:
        assert rc_eval == 0
    if kind in ("config", "weights"):
        assert rc_eval == 2  # a corrupt expert is refused, never scored
    if rc_eval == 0:
        assert scores == _INTACT["scores"], "a damaged library gave different scores"
    if rc_verify == 0:
        assert rc_eval == 0  # damage verify calls harmless really is harmless
    if kind in READ_AROUND and how != "missing":  # --repair clears what it can rebuild
        assert run("library", "verify", lib, "--repair")[0] == 0


def test_invalid_expert_dir_is_skipped_loudly(intact, tmp_path, capsys, cli_runner, caplog):
    """A copied library (every inode new) with a broken expert dir: readers list the
    valid experts, log why the other is not one, and verify exits 1 naming it."""
    src, _ = intact
    lib = tmp_path / "lib"
    shutil.copytree(src, lib)
    (lib / "experts/e0/adapter_model.safetensors").unlink()
    assert Library.open(lib).names() == ["e1"]
    assert "experts/e0 is not a valid expert" in caplog.text
    rc, out, _ = cli_runner(capsys, tmp_path / "home", "library", "verify", lib)
    assert rc == 1 and "problem (invalid): e0" in out


# ---------------------------------------------------------------- the serve column
PROMPT = {"prompt": "Q1:", "max_tokens": 4, "temperature": 0, "logprobs": 1}
_SERVED: dict[str, dict[str, str]] = {}  # "full" / "without-e0": {model id: greedy text}


@pytest.fixture(scope="module")
def serve_src(intact, tmp_path_factory):
    """The intact library with gates for both experts (so ``lib:phatgoose`` is served),
    beside ``other``: an intact library served next to every damaged one."""
    import torch

    from lorashelf.route.gate_store import adapter_checksum, gates_dir, save_gates

    root = tmp_path_factory.mktemp("serve")
    lib = root / "lib"
    shutil.copytree(intact[0], lib)
    with Library.open(lib) as opened:
        opened.repair()
        e1 = opened.get("e1")
        gates = {m: torch.randn(f.A.shape[1]) for m, f in e1.lora_factors().items()}
        save_gates(gates_dir(lib), adapter_checksum(e1), gates, {"steps": 1})
    other = root / "other"
    shutil.copytree(lib, other)
    with Library.open(other) as opened:
        opened.repair()
    return lib, other


def start_server(libs, model, tokenizer):
    """The in-process server over ``libs``: (TestClient, engine, bank); raises what
    ``lorashelf serve`` would refuse to start with."""
    import copy

    from fastapi.testclient import TestClient

    from lorashelf.serve.app import create_app
    from lorashelf.serve.bank import Bank
    from lorashelf.serve.engine import Engine
    from lorashelf.serve.loading import open_libraries

    bank = Bank(copy.deepcopy(model), open_libraries(libs))
    engine = Engine(bank, tokenizer, max_batch=8).start()
    return TestClient(create_app(engine)), engine, bank


def serve_all(client, prefix: str) -> tuple[list[str], dict[str, object]]:
    """(model ids, {model id under ``prefix``: greedy text or the error response})."""
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    out: dict[str, object] = {}
    for model in ids:
        if model.split("/")[0].split(":")[0] != prefix:
            continue
        r = client.post("/v1/completions", json=PROMPT | {"model": model})
        if r.status_code != 200:
            out[model] = r
            continue
        choice = r.json()["choices"][0]
        lps = choice["logprobs"]["token_logprobs"]
        assert all(isinstance(x, float) and math.isfinite(x) for x in lps), (model, lps)
        out[model] = choice["text"]
    return ids, out


@pytest.fixture(scope="module")
def served_refs(serve_src, tiny_model, tiny_tokenizer, tmp_path_factory):
    """Each model's greedy answer from the intact library, and from it without e0 (what
    a server that drops a damaged e0 must answer); the Arrow cache the cells damage."""
    lib, other = serve_src
    client, engine, bank = start_server([lib, other], tiny_model, tiny_tokenizer)
    with client:
        _, _SERVED["full"] = serve_all(client, "lib")
    engine.stop()
    bank.close()
    assert (lib / FILES["arrow-cache"]).is_file()  # lib:arrow cached its prototypes
    assert all(isinstance(t, str) for t in _SERVED["full"].values()), _SERVED["full"]
    assert {"lib/e0", "lib:arrow", "lib:phatgoose"} <= set(_SERVED["full"])
    without = tmp_path_factory.mktemp("without-e0") / "lib"
    shutil.copytree(lib, without)
    with Library.open(without) as opened:
        opened.remove("e0")
    client, engine, bank = start_server([without], tiny_model, tiny_tokenizer)
    with client:
        _, _SERVED["without-e0"] = serve_all(client, "lib")
    engine.stop()
    bank.close()
    return _SERVED


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("kind", list(FILES))
def test_corruption_matrix_serve(
    kind, how, serve_src, served_refs, tiny_model, tiny_tokenizer, tmp_path, capsys, cli_runner
):
    """The server over a damaged library (beside an intact one): it starts, or refuses
    with one line when the library itself is unreadable; every answer it gives is the
    intact library's (without e0 when it dropped e0), anything else is an OpenAI-shaped
    error; a damaged expert is never served; the other library keeps answering."""
    from lorashelf.errors import LorashelfError

    src, other = serve_src
    lib = tmp_path / "lib"
    shutil.copytree(src, lib)
    Library.open(lib).repair()
    target = sorted(lib.glob(FILES[kind]))[0]
    damage(target, how)
    try:
        client, engine, bank = start_server([lib, other], tiny_model, tiny_tokenizer)
    except LorashelfError as e:
        assert kind == "library.json", f"the server refused a usable library: {e}"
        rc, _, err = cli_runner(capsys, tmp_path / "home", "serve", lib, other)
        assert rc == 2 and str(lib) in err  # `lorashelf serve` says which library, in one line
        return
    try:
        with client:
            ids, answers = serve_all(client, "lib")
            ref = served_refs["full" if "lib/e0" in ids else "without-e0"]
            for model, got in answers.items():
                if isinstance(got, str):
                    assert got == ref[model], f"{model} answered differently: {got!r}"
                else:
                    assert 400 <= got.status_code < 600, got.text
                    assert isinstance(got.json()["error"]["message"], str), got.text
            if kind in ("config", "weights"):  # sha256 catches every damage to these
                assert "lib/e0" not in ids
                r = client.post("/v1/completions", json=PROMPT | {"model": "lib/e0"})
                assert r.status_code == 404 and ("corrupt" in r.text or "missing" in r.text), r.text
            for model in ("other/e0", "other:arrow", "lib/e1", "lib"):
                r = client.post("/v1/completions", json=PROMPT | {"model": model})
                assert r.status_code == 200, (model, r.text)
                name = model.replace("other", "lib")
                assert r.json()["choices"][0]["text"] == served_refs["full"][name]
    finally:
        engine.stop()
        bank.close()


def test_damaged_gates_fail_only_their_requests(
    serve_src, served_refs, tiny_model, tiny_tokenizer, tmp_path
):
    """One batch asks for PHATGOOSE over damaged gates and for an intact expert: the
    first request gets the gates' error, the second its intact answer."""
    from lorashelf.serve.compositions import Composition
    from lorashelf.serve.engine import Request
    from lorashelf.serve.sampling import SamplingParams

    src, other = serve_src
    lib = tmp_path / "lib"
    shutil.copytree(src, lib)
    Library.open(lib).repair()
    damage(sorted(lib.glob(FILES["gates"]))[0], "flip")
    _, engine, bank = start_server([lib], tiny_model, tiny_tokenizer)
    engine.stop()  # run_batch below batches exactly these two requests
    try:
        ids = tiny_tokenizer(PROMPT["prompt"])["input_ids"]
        params = SamplingParams(max_tokens=PROMPT["max_tokens"])
        comps = [Composition("lib", "phatgoose"), Composition("lib", "expert", ("e1",))]
        events: list[list] = [[], []]
        engine.run_batch([Request(ids, c, params, events[i].append) for i, c in enumerate(comps)])
    finally:
        bank.close()
    (error,) = events[0]
    assert error.kind == "error" and error.status == 500 and "gates" in error.text
    text = "".join(e.text for e in events[1] if e.kind in ("token", "done"))
    assert text == served_refs["full"]["lib/e1"]
