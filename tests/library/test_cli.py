"""``lorashelf library ...`` end to end: each verb, what it wrote, and exit 2 on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lorashelf.cli import main
from lorashelf.library import Library

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich reads the terminal width from it

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop whatever was printed before (e.g. warnings)
        rc = main(["--home", str(tmp_path / "home"), "library", *map(str, argv)])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def test_every_verb(tmp_path, run, make_adapter):
    lib = tmp_path / "lib"
    rc, out, _ = run("init", lib, "--base", "smollm2-135m")
    assert rc == 0 and "created" in out
    assert json.loads((lib / "library.json").read_text())["base_model"] == HUB_BASE
    assert run("init", lib, "--base", HUB_BASE)[1].count("already exists") == 1

    src = make_adapter("cli", seed=7)
    rc, out, _ = run("import", lib, src, "--name", "logic", "--task", "bigbench:logic")
    assert rc == 0 and "imported logic (rank 4, q_proj,v_proj)" in out
    expert = Library.open(lib).get("logic")
    assert expert.tasks == ["bigbench:logic"] and expert.card["source"] == "import"
    assert (
        expert.read_file("adapter_model.safetensors")
        == (src / "adapter_model.safetensors").read_bytes()
    )
    run("import", lib, make_adapter("cli", seed=8), "--name", "other")

    rc, out, _ = run("ls", lib)
    assert rc == 0 and "logic" in out and "bigbench:logic" in out and "other" in out
    rc, out, _ = run("ls", lib, "--json", "-", "--task", "bigbench:logic")
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["logic"]
    assert rows[0] | {"created": ""} == {  # JSON types: a list of tasks, an int rank
        "name": "logic", "tasks": ["bigbench:logic"], "rank": 4, "modules": ["q_proj", "v_proj"],
        "source": "import", "derived": {}, "created": "",
    }  # fmt: skip
    # the old bare --json still prints to stdout, with a deprecation line on stderr
    rc, out, err = run("ls", lib, "--json", "--task", "bigbench:logic")
    assert json.loads(out) == rows and "deprecated" in err

    rc, out, _ = run("show", lib, "logic", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["name"] == "logic" and doc["adapter_config"]["r"] == 4
    assert doc["files"] == expert.files
    rc, out, _ = run("show", lib, "logic")
    assert rc == 0 and "base_model_exact" in out

    rc, out, _ = run("export", lib, "logic", tmp_path / "out")
    assert (
        rc == 0
        and (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
        == (src / "adapter_model.safetensors").read_bytes()
    )

    rc, out, _ = run("verify", lib)
    assert rc == 0 and "ok: 2 experts" in out

    rc, out, _ = run("rm", lib, "other")
    assert rc == 0 and Library.open(lib).names() == ["logic"]

    weights = lib / "experts" / "logic" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    rc, out, err = run("verify", lib)
    assert rc == 1 and "problem (corrupt)" in out and "adapter_model.safetensors" in out


def test_bad_input_exits_2(tmp_path, run, make_adapter, edit_config):
    lib = tmp_path / "lib"
    assert run("ls", lib)[0] == 2  # no library yet
    run("init", lib, "--base", "smollm2-135m")
    rc, _, err = run("import", lib, make_adapter("o", base="gpt2"))
    assert rc == 2 and "trained on 'gpt2'" in err and "\n" == err[-1] and err.count("\n") == 1
    assert Library.open(lib).names() == []
    assert run("show", lib, "nope")[0] == 2
    assert run("rm", lib, "nope")[0] == 2
    assert run("export", lib, "nope", tmp_path / "o")[0] == 2
    assert run("init", lib, "--base", "gpt2")[0] == 2
    assert run("import", lib, tmp_path / "missing")[0] == 2
    with pytest.raises(SystemExit) as e:
        run("init", tmp_path / "x")  # --base is required
    assert e.value.code == 2


def test_ls_path_imports_no_torch(tmp_path, make_adapter):
    """The handler behind `lorashelf library ls` never imports torch or transformers."""
    lib = Library.open(tmp_path / "lib", create=True, base_model=HUB_BASE)
    lib.add(make_adapter("a"), "a", {"tasks": ["t"]})
    code = (
        "import sys\n"
        "from lorashelf.cli import build_parser\n"
        f"args = build_parser('library').parse_args(['library', 'ls', {str(lib.path)!r}])\n"
        "assert args.func(args) == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "print('heavy:', heavy)\n"
    )
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "heavy: []" in out.stdout and "a" in out.stdout


def _jsonl(path, word: str) -> str:
    rows = [{"input": f"{word} {word} item {i}:", "target": " ok"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{path}"


def test_ls_and_show_list_derived_artefacts(tmp_path, run, tiny_library, kit, tiny_model):
    """Arrow prototypes, retrieval embeddings and PHATGOOSE gates made by the ordinary
    commands appear in ``ls`` and ``show`` (text and JSON), and turn stale when the
    expert is replaced by another adapter under the same name."""
    lib = tiny_library({n: [_jsonl(tmp_path / f"{n}.jsonl", n)] for n in ("alpha", "beta")})
    home = ["--home", str(tmp_path), "--device", "cpu"]
    query = tmp_path / "q.jsonl"
    query.write_text("".join(json.dumps({"input": f"Q{i}:", "options": [" a", " b"], "answer": 0})
                             + "\n" for i in range(2)))  # fmt: skip
    base = [*home, "eval", str(lib.path), "--dtype", "fp32", "--tasks", f"jsonl:{query}",
            "--split", "all", "--json", str(tmp_path / "r.json"), "--method"]  # fmt: skip
    assert run("ls", lib.path)[0] == 0
    assert json.loads(run("ls", lib.path, "--json", "-")[1])[0]["derived"] == {}
    assert "derived: none" in run("show", lib.path, "alpha")[1]

    assert main([*base, "arrow", "--top-k", "1"]) == 0
    assert (
        main([*base, "arrow", "--top-k", "1", "--set", "gks=delta", "--set", "gks_experts=beta"])
        == 0
    )
    assert main([*base, "retrieval", "--top-k", "1", "--set", "n_prompts=2"]) == 0
    gates = ["gates", "train", str(lib.path), "--experts", "alpha", "--steps", "1",
             "--batch-size", "2", "--max-length", "32", "--dtype", "fp32"]  # fmt: skip
    assert main([*home, *gates]) == 0

    rows = {r["name"]: r for r in json.loads(run("ls", lib.path, "--json", "-")[1])}
    assert rows["alpha"]["derived"] == {
        "arrow": "ok", "arrow+gks": "ok", "phatgoose": "ok", "retrieval": "ok"
    }  # fmt: skip
    assert rows["beta"]["derived"] == {"arrow": "ok", "retrieval": "ok"}  # beta: the general one
    rc, out, _ = run("ls", lib.path)
    assert rc == 0 and "arrow,arrow+gks,phatgoose,retrieval" in out

    doc = json.loads(run("show", lib.path, "alpha", "--json")[1])
    sha = Library.open(lib.path).get("alpha").files["adapter_model.safetensors"]
    by_label = {a["label"]: a for a in doc["derived"]}
    assert by_label["phatgoose"]["file"] == f"derived/phatgoose/{sha}.safetensors"
    assert by_label["arrow"]["file"] == "cache/arrow_prototypes.safetensors"
    assert by_label["retrieval"]["file"] == "cache/retrieval_embeddings.safetensors"
    assert by_label["arrow+gks"]["variant"].startswith("gks-")
    assert {a["status"] for a in doc["derived"]} == {"ok"}
    assert {a["adapter_sha256"] for a in doc["derived"]} == {sha}
    hidden = tiny_model.config.hidden_size  # one float32 embedding: hidden * 4 bytes
    assert by_label["retrieval"]["bytes"] == hidden * 4
    n_modules = len(Library.open(lib.path).get("alpha").lora_factors())
    assert by_label["arrow"]["bytes"] == n_modules * hidden * 4  # one [d_in] row per module
    gate_file = lib.path / by_label["phatgoose"]["file"]
    assert by_label["phatgoose"]["bytes"] == gate_file.stat().st_size
    out = run("show", lib.path, "alpha")[1]
    assert "derived: 4 artefact(s)" in out and f"derived/phatgoose/{sha}.safetensors" in out

    # alpha replaced by another adapter: what was made for the old one is stale
    src = kit.write_adapter(tiny_model, tmp_path / "new-alpha", seed=42, base_id=lib.base_model)
    Library.open(lib.path).add(src, name="alpha", card={"tasks": ["t"]}, overwrite=True)
    rows = {r["name"]: r for r in json.loads(run("ls", lib.path, "--json", "-")[1])}
    assert set(rows["alpha"]["derived"].values()) == {"stale"}
    assert "arrow(stale)" in run("ls", lib.path)[1]
    assert "stale (made for adapter" in run("show", lib.path, "alpha")[1]
    # a sidecar that no longer matches its file is not trusted: the header is read
    sidecar = lib.path / "cache" / "arrow_prototypes.safetensors.json"
    sidecar.write_text(sidecar.read_text().replace('"file_bytes": ', '"file_bytes": 1'))
    rows = {r["name"]: r for r in json.loads(run("ls", lib.path, "--json", "-")[1])}
    assert rows["beta"]["derived"]["arrow"] == "ok"
    assert "arrow" not in rows["alpha"]["derived"]  # unnamed in the header: not attributed
