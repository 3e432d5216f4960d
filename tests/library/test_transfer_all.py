"""Whole libraries in and out (``library import --all``, ``library export --all``), from
a local dir and an offline Hub cache, and exports that never replace what they did not
write (``library export LIB NAME LIB --overwrite`` once replaced the whole library)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from lorashelf.cli import main
from lorashelf.errors import LorashelfError
from lorashelf.library import Library, import_all

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
REV = "89abcdef0123456789abcdef0123456789abcdef"
ADAPTER = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture
def run(tmp_path, capsys):
    def run(*argv) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main(["--home", str(tmp_path / "home"), "library", *map(str, argv)])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty HF hub cache in tmp_path, with the hub offline (this test only)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def lay_out(root: Path, adapters: dict[str, Path]) -> Path:
    """``root/SUB/{adapter files}`` for each subfolder name -> adapter dir."""
    for sub, src in adapters.items():
        (root / sub).mkdir(parents=True)
        for fn in ADAPTER:
            shutil.copy(src / fn, root / sub / fn)
    return root


def new_lib(path: Path) -> Library:
    return Library.open(path, create=True, base_model="smollm2-135m")


def test_import_all_from_a_dir_of_adapter_subfolders(tmp_path, run, make_adapter):
    subs = {f"ts_expert_{i}": make_adapter(f"t{i}", seed=10 + i) for i in range(3)}
    root = lay_out(tmp_path / "repo", subs)
    new_lib(tmp_path / "lib").close()
    rc, out, _ = run("import", tmp_path / "lib", root, "--all")
    assert rc == 0 and "imported 3 experts" in out
    lib = Library.open(tmp_path / "lib")
    assert lib.names() == sorted(subs)
    e = lib.get("ts_expert_1")
    assert e.card["source"] == "import" and e.card["origin"]["subfolder"] == "ts_expert_1"
    assert e.read_file(ADAPTER[1]) == (subs["ts_expert_1"] / ADAPTER[1]).read_bytes()
    rc, _, err = run("import", tmp_path / "lib", subs["ts_expert_0"], "--all")
    assert rc == 2 and "without --all" in err


def test_import_all_from_an_offline_hub_cache(tmp_path, offline_hub, make_adapter):
    snap = offline_hub / "models--someone--clustered-flan" / "snapshots" / REV
    lay_out(
        snap, {"cluster_0": make_adapter("h0", seed=20), "cluster_1": make_adapter("h1", seed=21)}
    )
    (offline_hub / "models--someone--clustered-flan" / "refs").mkdir()
    (offline_hub / "models--someone--clustered-flan" / "refs" / "main").write_text(REV)
    lib = new_lib(tmp_path / "lib")
    experts = import_all(lib, "someone/clustered-flan")
    assert [e.name for e in experts] == ["cluster_0", "cluster_1"]
    assert experts[0].card["origin"] == {
        "type": "hub", "repo_id": "someone/clustered-flan", "revision": REV,
        "subfolder": "cluster_0",
    }  # fmt: skip
    with pytest.raises(LorashelfError, match="not in the Hugging Face cache"):
        import_all(lib, "someone/absent")


def test_import_all_checks_every_adapter_before_adding_any(tmp_path, make_adapter, edit_config):
    good = make_adapter("g", seed=30)
    other = edit_config(good, tmp_path / "other-base", base_model_name_or_path="gpt2")
    root = lay_out(tmp_path / "repo", {"a_good": good, "b_other": other})
    lib = new_lib(tmp_path / "lib")
    with pytest.raises(LorashelfError, match="trained on 'gpt2'"):
        import_all(lib, str(root))
    assert lib.names() == []
    lay_out(tmp_path / "repo2", {"a_good": good})
    import_all(lib, str(tmp_path / "repo2"))
    with pytest.raises(LorashelfError, match="already in"):
        import_all(lib, str(tmp_path / "repo2"))


def test_export_all_round_trips_names_tasks_and_bytes_and_loads_in_peft(
    tmp_path, run, make_adapter, tiny_model
):
    from peft import PeftModel

    lib = new_lib(tmp_path / "lib")
    for i, task in enumerate(("bigbench:a", "bigbench:b")):
        lib.add(make_adapter(f"x{i}", seed=40 + i), f"exp{i}", {"tasks": [task], "source": "train"})
    rc, out, _ = run("export", lib.path, "--all", "--out", tmp_path / "shared")
    assert rc == 0 and "exported 2 experts" in out
    shared = tmp_path / "shared"
    manifest = json.loads((shared / "lorashelf_export.json").read_text())
    assert manifest["experts"] == ["exp0", "exp1"] and manifest["base_model"] == HUB_BASE
    PeftModel.from_pretrained(copy.deepcopy(tiny_model), str(shared), subfolder="exp1")
    back = new_lib(tmp_path / "lib2")
    assert [e.name for e in import_all(back, str(shared))] == ["exp0", "exp1"]
    for name in ("exp0", "exp1"):
        a, b = lib.get(name), back.get(name)
        assert (a.tasks, a.card["source"]) == (b.tasks, b.card["source"])
        assert all(a.read_file(fn) == b.read_file(fn) for fn in ADAPTER)
    # a second export needs --overwrite, and then replaces the earlier export
    assert run("export", lib.path, "--all", "--out", shared)[0] == 2
    lib.remove("exp0")
    assert run("export", lib.path, "--all", "--out", shared, "--overwrite")[0] == 0
    assert sorted(p.name for p in shared.iterdir()) == ["exp1", "lorashelf_export.json"]


def test_overwrite_never_replaces_the_library_or_an_unrelated_dir(
    tmp_path, run, make_adapter, snapshot
):
    lib = new_lib(tmp_path / "lib")
    lib.add(make_adapter("o", seed=50), "one")
    before = snapshot(lib.path)
    for out in (lib.path, lib.path / "experts" / "one", tmp_path):
        rc, _, err = run("export", lib.path, "one", out, "--overwrite")
        assert rc == 2 and "library" in err and len(err.strip().splitlines()) == 1
        rc, _, err = run("export", lib.path, "--all", "--out", out, "--overwrite")
        assert rc == 2 and "library" in err
    assert snapshot(lib.path) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for argv in (("one", mine), ("--all", "--out", mine)):
        rc, _, err = run("export", lib.path, *argv, "--overwrite")
        assert rc == 2 and "not an export lorashelf wrote" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    out = tmp_path / "one-out"
    assert run("export", lib.path, "one", out)[0] == 0
    assert run("export", lib.path, "one", out, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "card.json",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
